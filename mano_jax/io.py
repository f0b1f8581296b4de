"""Reading and writing hand model files: official MANO pickles (without chumpy) and mano-jax `.npz`.

Official `MANO_RIGHT.pkl`/`MANO_LEFT.pkl` are Python-2 pickles holding chumpy objects. Unpickling runs
whatever callables the stream names, so they are read with an allowlist unpickler: it resolves only the
numpy/scipy/chumpy/copy_reg references such files contain, maps chumpy and scipy.sparse classes to inert
stand-ins that merely keep their pickled state, and refuses every other reference with `ManoFileError`
before the payload can run. The stand-ins are turned into arrays afterwards.

mano-jax's own format is an `.npz` (no pickles) written reproducibly by `save_model`.
All lengths are metres.
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib.resources
import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from ._atomic import atomic_path
from .conventions import TIP_IDS
from .model import NUM_JOINTS, NUM_POSE_FEATURES, ManoModel

try:  # numpy >= 2 moved the module; the function is the same.
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray

__all__ = ["BUNDLED_MODELS", "ManoFileError", "load_model", "read_mano_pickle", "save_model"]

#: Names `load_model` accepts for the models shipped in `mano_jax/data`.
BUNDLED_MODELS = {
    "open-right": "open_hand_right.npz",
    "open-left": "open_hand_left.npz",
    "open": "open_hand_right.npz",
}
DEFAULT_MODEL = "open-right"
NPZ_FORMAT = "mano-jax-model/1"
#: MANO's mesh; fingertip sets in `conventions.TIP_IDS` refer to this topology.
MANO_NUM_VERTICES = 778
DEFAULT_TIPS = "manopth"

_ARRAY_FIELDS = tuple(f.name for f in dataclasses.fields(ManoModel) if not f.metadata.get("static"))
_REQUIRED_PICKLE_KEYS = (
    "v_template", "f", "weights", "J_regressor", "kintree_table", "shapedirs", "posedirs",
    "hands_components", "hands_mean",
)  # fmt: skip
# A uint32 -1: how the official kintree tables store the root's parent.
_ROOT_PARENT_UINT32 = 2**32 - 1
# Fixed zip entry metadata so the same model always gives the same bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class ManoFileError(ValueError):
    """A model file is unreadable, unsafe or inconsistent. The message names the file and the problem."""


# --- allowlist unpickler ------------------------------------------------------------------------------


class _Stub:
    """An inert stand-in for a class instance in a pickle: it only keeps its pickled state."""

    source = ""
    """`module.name` the file referred to."""

    def __setstate__(self, state):
        self.state = state


class _ChumpyCh(_Stub):
    """chumpy.ch.Ch: a plain array held in the state's `x`."""

    source = "chumpy.ch.Ch"


class _ChumpySelect(_Stub):
    """chumpy.reordering.Select: `a.ravel()[idxs]`, reshaped to `preferred_shape` when present."""

    source = "chumpy.reordering.Select"


class _ChumpyReshape(_Stub):
    """chumpy.reordering.Reshape: `a.reshape(newshape)`."""

    source = "chumpy.reordering.Reshape"


class _SparseCsc(_Stub):
    source = "scipy.sparse.csc_matrix"


class _SparseCsr(_Stub):
    source = "scipy.sparse.csr_matrix"


# Official files only contain Ch and Select (shapedirs); Reshape is what chumpy builds for `.reshape`/
# `.ravel` and shows up in re-saved SMPL-family files. Other chumpy ops (arithmetic, linear algebra) are
# refused: evaluating them would mean re-implementing chumpy.
_STUB_CLASSES = {
    ("chumpy.ch", "Ch"): _ChumpyCh,
    ("chumpy.reordering", "Select"): _ChumpySelect,
    ("chumpy.reordering", "Reshape"): _ChumpyReshape,
    # Python 2 era, SciPy >= 1.8 private, and public paths.
    ("scipy.sparse.csc", "csc_matrix"): _SparseCsc,
    ("scipy.sparse._csc", "csc_matrix"): _SparseCsc,
    ("scipy.sparse", "csc_matrix"): _SparseCsc,
    ("scipy.sparse.csr", "csr_matrix"): _SparseCsr,
    ("scipy.sparse._csr", "csr_matrix"): _SparseCsr,
    ("scipy.sparse", "csr_matrix"): _SparseCsr,
}


class _Refused(Exception):
    """Raised by an allowlisted callable called with arguments a model file never uses."""


class _AllowlistUnpickler(pickle.Unpickler):
    """Resolves only the references MANO-family pickles contain; anything else is refused on sight.

    The allowed callables are bound methods (their attributes cannot be overwritten by a BUILD opcode)
    that check their arguments; the classes are numpy's C types or `_Stub`s, whose `__setstate__` just
    stores the state.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")
        self._path = path
        callables = {
            "_reconstruct": self._reconstruct_array,
            "scalar": self._numpy_scalar,
            "_frombuffer": self._frombuffer,
        }
        self._allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("__builtin__", "object"): object,
            ("builtins", "object"): object,
            ("__builtin__", "set"): set,
            ("builtins", "set"): set,
            ("copy_reg", "_reconstructor"): self._reconstructor,
            ("copyreg", "_reconstructor"): self._reconstructor,
            # Python 3 writes bytes at protocols < 3 as _codecs.encode(text, "latin1").
            ("_codecs", "encode"): self._latin1_bytes,
            ("builtins", "bytes"): self._empty_bytes,
            **_STUB_CLASSES,
        }
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            self._allowed[module, "_reconstruct"] = callables["_reconstruct"]
            self._allowed[module, "scalar"] = callables["scalar"]
        for module in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol-5 arrays
            self._allowed[module, "_frombuffer"] = callables["_frombuffer"]

    def find_class(self, module, name):
        try:
            return self._allowed[module, name]
        except KeyError:
            pass
        if module.split(".")[0] == "chumpy":
            what = (
                f"unsupported chumpy class {module}.{name} (mano-jax reads chumpy Ch, Select and "
                "Reshape objects; re-save the file with plain numpy arrays)"
            )
        else:
            what = (
                f"a reference to {module}.{name}, which a MANO model file never contains (only numpy, "
                "scipy.sparse and chumpy arrays are allowed)"
            )
        raise ManoFileError(f"{self._path}: refused to load: the pickle holds {what}; nothing in it was run")

    # The allowlisted callables.

    def _reconstruct_array(self, subtype, shape, dtype):
        # numpy always pickles an empty (0,) array here and fills it in with BUILD.
        if subtype is not np.ndarray or tuple(shape) != (0,):
            raise _Refused(f"array reconstruction of {subtype!r} with shape {shape!r}")
        return _np_multiarray._reconstruct(np.ndarray, shape, dtype)

    def _numpy_scalar(self, dtype, *data):
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise _Refused(f"numpy scalar of dtype {dtype!r}")
        return _np_multiarray.scalar(dtype, *data)

    def _frombuffer(self, buffer, dtype, shape, order):
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise _Refused(f"array from buffer of dtype {dtype!r}")
        return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()

    def _reconstructor(self, cls, base, state):
        # copy_reg._reconstructor(cls, object, None) is object.__new__(cls); nothing else is needed.
        if not (isinstance(cls, type) and issubclass(cls, _Stub) and base is object and state is None):
            raise _Refused(f"copy_reg._reconstructor{(cls, base, state)!r}")
        return object.__new__(cls)

    def _latin1_bytes(self, text, encoding):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _Refused(f"_codecs.encode with encoding {encoding!r}")
        return codecs.encode(text, "latin1")

    def _empty_bytes(self, *args):
        if args:
            raise _Refused("bytes() with arguments")
        return b""


def _evaluate(obj, where: str, depth: int = 0):
    """Turn stand-ins into arrays (chumpy) or scipy matrices (sparse); anything else is returned as is."""
    if not isinstance(obj, _Stub):
        return obj
    if depth > 32:
        raise _Refused(f"{where}: chumpy objects nested more than 32 deep")
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        raise _Refused(f"{where}: {obj.source} object without a state dictionary")

    def term(name):
        if name not in state:
            raise _Refused(f"{where}: {obj.source} object lacks its '{name}'")
        return _evaluate(state[name], f"{where}.{name}", depth + 1)

    if isinstance(obj, _ChumpyCh):
        return np.asarray(term("x"))
    if isinstance(obj, _ChumpySelect):
        source = np.asarray(term("a")).ravel()
        idxs = np.asarray(term("idxs"))
        if not np.issubdtype(idxs.dtype, np.integer):
            raise _Refused(f"{where}: Select indices are {idxs.dtype}, not integers")
        if idxs.size and (idxs.min() < -source.size or idxs.max() >= source.size):
            raise _Refused(f"{where}: Select indices out of range for {source.size} values")
        result = source[idxs.ravel()]
        if "preferred_shape" in state:
            result = result.reshape(tuple(state["preferred_shape"]))
        return result
    if isinstance(obj, _ChumpyReshape):
        return np.asarray(term("a")).reshape(tuple(np.atleast_1d(term("newshape"))))
    # scipy sparse: old SciPy kept the shape in `_shape`, older still in `shape`.
    shape = state.get("_shape", state.get("shape"))
    if shape is None:
        raise _Refused(f"{where}: {obj.source} object lacks its shape")
    matrix_type = sp.csc_matrix if isinstance(obj, _SparseCsc) else sp.csr_matrix
    return matrix_type((term("data"), term("indices"), term("indptr")), shape=tuple(shape))


def read_mano_pickle(path) -> dict:
    """The raw contents of a MANO-family pickle, safely: chumpy objects become numpy arrays.

    The dictionary is what the file holds (keys as stored); `J_regressor` stays a scipy sparse matrix if
    the file has one. Raises `ManoFileError` for unsafe, corrupt or non-dictionary pickles.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = _AllowlistUnpickler(f, path).load()
    except ManoFileError:
        raise
    except _Refused as e:
        raise ManoFileError(
            f"{path}: refused to load: the pickle calls {e}; nothing else in it was run"
        ) from None
    except OSError as e:
        raise ManoFileError(f"{path}: cannot read the file ({e.strerror or e})") from None
    except Exception as e:  # truncated/corrupt streams fail in many ways inside pickle and numpy
        raise ManoFileError(
            f"{path}: not a readable MANO pickle (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None
    if not isinstance(data, dict):
        raise ManoFileError(
            f"{path}: expected a pickled dictionary of model arrays, got {type(data).__name__}"
        )
    try:
        return {key: _evaluate(value, str(key)) for key, value in data.items()}
    except _Refused as e:
        raise ManoFileError(f"{path}: {e}") from None
    except Exception as e:
        raise ManoFileError(
            f"{path}: cannot rebuild a stored chumpy/sparse object: {type(e).__name__}: {e}"
        ) from None


# --- validation ---------------------------------------------------------------------------------------


def _float_array(path, key, value, ndim_shape: tuple) -> np.ndarray:
    """`value` as a finite float64 array of the given shape (None entries match any length)."""
    if sp.issparse(value):
        value = value.toarray()
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ManoFileError(f"{path}: '{key}' is not a numeric array ({type(value).__name__})") from None
    _check_shape(path, key, a, ndim_shape)
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        where = tuple(int(i) for i in bad)
        raise ManoFileError(f"{path}: '{key}' has NaN or infinite entries (first at index {where})")
    return a


def _check_shape(path, key, a: np.ndarray, shape: tuple):
    expected = "(" + ", ".join("*" if n is None else str(n) for n in shape) + ")"
    if a.ndim != len(shape) or any(n is not None and n != m for n, m in zip(shape, a.shape)):
        raise ManoFileError(f"{path}: '{key}' has shape {a.shape}, expected {expected}")


def _parents_from(path, key, row) -> tuple[int, ...]:
    row = np.asarray(row)
    if not np.issubdtype(row.dtype, np.integer) and not np.all(np.mod(row, 1) == 0):
        raise ManoFileError(f"{path}: '{key}' holds non-integer joint ids")
    parents = [int(p) for p in row]
    parents = [-1 if p in (-1, _ROOT_PARENT_UINT32) else p for p in parents]
    if len(parents) != NUM_JOINTS:
        raise ManoFileError(f"{path}: '{key}' has {len(parents)} joints, expected {NUM_JOINTS}")
    if parents[0] != -1 or any(not 0 <= p < j for j, p in enumerate(parents[1:], start=1)):
        raise ManoFileError(
            f"{path}: '{key}' is not a kinematic tree with the root first and parents before "
            f"children: {parents}"
        )
    return tuple(parents)


def _validated(path, raw: dict) -> dict[str, np.ndarray]:
    """Check and convert model arrays; `raw` uses ManoModel field names. Returns float64/int arrays."""
    v_template = _float_array(path, "v_template", raw["v_template"], (None, 3))
    V = v_template.shape[0]
    if V == 0:
        raise ManoFileError(f"{path}: 'v_template' has no vertices")
    out = {"v_template": v_template}
    out["shapedirs"] = _float_array(path, "shapedirs", raw["shapedirs"], (V, 3, None))
    out["posedirs"] = _float_array(path, "posedirs", raw["posedirs"], (V, 3, NUM_POSE_FEATURES))
    out["J_regressor"] = _float_array(path, "J_regressor", raw["J_regressor"], (NUM_JOINTS, V))
    out["weights"] = _float_array(path, "weights", raw["weights"], (V, NUM_JOINTS))
    out["hands_components"] = _float_array(path, "hands_components", raw["hands_components"], (45, 45))
    out["hands_mean"] = _float_array(path, "hands_mean", raw["hands_mean"], (45,))
    out["hands_var"] = _float_array(path, "hands_var", raw["hands_var"], (45,))
    if np.any(out["hands_var"] < 0):
        raise ManoFileError(f"{path}: 'hands_var' has negative variances")

    faces = np.asarray(raw["faces"])
    _check_shape(path, "faces", faces, (None, 3))
    if not np.issubdtype(faces.dtype, np.integer):
        raise ManoFileError(f"{path}: faces are {faces.dtype}, expected integer vertex ids")
    if faces.size and (faces.min() < 0 or faces.max() >= V):
        raise ManoFileError(f"{path}: faces refer to vertex ids outside 0..{V - 1}")
    out["faces"] = faces.astype(np.int32)
    return out


def _tip_ids(path, tips, num_vertices: int, stored=None) -> tuple[tuple[int, ...], str]:
    """Resolve the `tips` argument to 5 vertex ids, and say where they came from."""
    if tips is None and stored is not None:
        return tuple(int(t) for t in stored), "stored in the file"
    if tips is None:
        if num_vertices != MANO_NUM_VERTICES:
            raise ManoFileError(
                f"{path}: the mesh has {num_vertices} vertices, not MANO's {MANO_NUM_VERTICES}: pass "
                "tips=(thumb, index, middle, ring, pinky vertex ids) for its fingertips"
            )
        tips = DEFAULT_TIPS
    if isinstance(tips, str):
        if tips not in TIP_IDS:
            raise ValueError(
                f"tips: unknown fingertip set {tips!r}; known: {sorted(TIP_IDS)} or 5 vertex ids"
            )
        if num_vertices != MANO_NUM_VERTICES:
            raise ValueError(
                f"tips={tips!r} refers to MANO's {MANO_NUM_VERTICES}-vertex mesh, but {path} has "
                f"{num_vertices} vertices: pass 5 vertex ids"
            )
        return TIP_IDS[tips], f"'{tips}' fingertip set"
    ids = tuple(int(t) for t in tips)
    if len(ids) != 5 or any(not 0 <= t < num_vertices for t in ids):
        raise ValueError(f"tips: expected 5 vertex ids in 0..{num_vertices - 1} (thumb..pinky), got {tips!r}")
    return ids, "given fingertip ids"


# --- official pickles ---------------------------------------------------------------------------------


def _side_from_name(path: Path) -> str | None:
    stem = path.stem.lower()
    left, right = "left" in stem, "right" in stem
    return "left" if left and not right else "right" if right and not left else None


def _sibling_right_file(path: Path) -> Path | None:
    """MANO_LEFT.pkl's companion MANO_RIGHT.pkl (same folder, LEFT->RIGHT in the name), if present."""
    name = re.sub("LEFT", "RIGHT", re.sub("Left", "Right", re.sub("left", "right", path.name)))
    sibling = path.with_name(name)
    return sibling if name != path.name and sibling.is_file() else None


def _fix_left_shapedirs(path: Path, shapedirs: np.ndarray) -> tuple[np.ndarray, str]:
    """Negate x of a left model's shape blend shapes unless the file is known to be fixed already.

    The released MANO_LEFT.pkl holds MANO_RIGHT.pkl's shapedirs unchanged; a correct left model has them
    with x negated. Whether a left file has the bug can only be told by comparing with its right
    counterpart, so that is done when MANO_RIGHT.pkl lies beside it; otherwise the bug is assumed.
    """
    sibling = _sibling_right_file(path)
    if sibling is not None:
        try:
            right = np.asarray(read_mano_pickle(sibling).get("shapedirs"), dtype=np.float64)
        except (ManoFileError, TypeError, ValueError):
            right = None
        if right is not None and right.shape == shapedirs.shape and np.any(right[:, 0] != 0):
            if np.allclose(shapedirs[:, 0], -right[:, 0], rtol=0, atol=1e-12):
                return shapedirs, f"left shapedirs already mirrored (compared with {sibling.name}): kept"
            if np.allclose(shapedirs, right, rtol=0, atol=1e-12):
                how = f"the released bug confirmed by comparing with {sibling.name}"
            else:
                how = f"could not confirm the bug against {sibling.name}, fixed as the released files need"
        else:
            how = f"{sibling.name} beside it is unreadable or differs in size, so the released bug is assumed"
    else:
        how = "no MANO_RIGHT file beside it to check against, so the released bug is assumed"
    fixed = shapedirs.copy()
    fixed[:, 0] *= -1
    return fixed, f"shapedirs[:, 0, :] negated to fix the left model ({how})"


def _model_from_pickle(path: Path, *, side, fix_left_shapedirs, dtype, tips) -> ManoModel:
    raw = read_mano_pickle(path)
    missing = [k for k in _REQUIRED_PICKLE_KEYS if k not in raw]
    if missing:
        raise ManoFileError(f"{path}: missing model entries {missing} (has {sorted(map(str, raw))})")
    notes = [f"official-format MANO pickle {path}"]

    kintree = np.asarray(raw["kintree_table"])
    _check_shape(path, "kintree_table", kintree, (2, NUM_JOINTS))
    if not np.array_equal(kintree[1], np.arange(NUM_JOINTS)):
        raise ManoFileError(
            f"{path}: 'kintree_table' row 1 should list joints 0..15 in order, got {kintree[1]}"
        )
    parents = _parents_from(path, "kintree_table", kintree[0])

    if "hands_coeffs" in raw:
        coeffs = _float_array(path, "hands_coeffs", raw["hands_coeffs"], (None, 45))
        if coeffs.shape[0] < 2:
            raise ManoFileError(f"{path}: 'hands_coeffs' needs at least 2 poses to give a variance")
        hands_var = coeffs.var(axis=0)
        notes.append(f"hands_var from the {coeffs.shape[0]} training poses' hands_coeffs")
    else:
        hands_var = np.ones(45)
        notes.append("no hands_coeffs in the file: hands_var set to ones")

    arrays = _validated(
        path,
        {**{k: raw[k] for k in _REQUIRED_PICKLE_KEYS}, "faces": raw["f"], "hands_var": hands_var},
    )
    if side is None:
        side = _side_from_name(path)
        notes.append(
            f"side '{side}' from the file name" if side else "side 'right' assumed (file name says neither)"
        )
        side = side or "right"
    if side == "left":
        if fix_left_shapedirs:
            arrays["shapedirs"], note = _fix_left_shapedirs(path, arrays["shapedirs"])
        else:
            note = "shapedirs as stored (fix_left_shapedirs=False reproduces fits made with the released bug)"
        notes.append(note)
    tip_ids, tip_note = _tip_ids(path, tips, arrays["v_template"].shape[0])
    notes.append(tip_note)
    return _make_model(arrays, dtype, parents=parents, tip_ids=tip_ids, side=side, name=path.stem,
                       provenance="; ".join(notes))  # fmt: skip


def _make_model(arrays: dict, dtype, **static) -> ManoModel:
    fields = {
        k: jnp.asarray(v) if k == "faces" else jnp.asarray(v, dtype=dtype)
        for k, v in arrays.items()
    }
    return ManoModel(**fields, **static)


# --- mano-jax .npz ------------------------------------------------------------------------------------


def _npz_text(path, npz, key) -> str:
    value = npz[key]
    if value.shape != () or value.dtype.kind != "U":
        raise ManoFileError(f"{path}: '{key}' should be a text scalar, got {value.dtype} {value.shape}")
    return str(value[()])


def _model_from_npz(path: Path, *, side, dtype, tips) -> ManoModel:
    try:
        # Our own file handle: np.load leaks its own when the zip directory is truncated.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            keys = set(npz.files)
            if "format" not in keys or _npz_text(path, npz, "format") != NPZ_FORMAT:
                raise ManoFileError(f"{path}: not a mano-jax model file (no format = {NPZ_FORMAT!r} entry)")
            needed = {*_ARRAY_FIELDS, "parents", "tip_ids", "side", "name", "provenance"}
            missing = sorted(needed - keys)
            if missing:
                raise ManoFileError(f"{path}: missing model entries {missing}")
            raw = {k: npz[k] for k in _ARRAY_FIELDS}
            parents = _parents_from(path, "parents", npz["parents"])
            stored_tips = npz["tip_ids"]
            stored_side = _npz_text(path, npz, "side")
            name = _npz_text(path, npz, "name")
            provenance = _npz_text(path, npz, "provenance")
    except ManoFileError:
        raise
    except Exception as e:  # bad zip members, truncated data, object arrays, ...
        raise ManoFileError(
            f"{path}: not a readable model .npz (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None
    if stored_side not in ("right", "left"):
        raise ManoFileError(f"{path}: 'side' is {stored_side!r}, expected 'right' or 'left'")
    if side is not None and side != stored_side:
        raise ValueError(
            f"side={side!r}, but {path} holds a {stored_side} hand (mano_jax.mirror_model gives the "
            "other hand)"
        )
    arrays = _validated(path, raw)
    _check_shape(path, "tip_ids", np.asarray(stored_tips), (5,))
    tip_ids, _ = _tip_ids(path, tips, arrays["v_template"].shape[0], stored=stored_tips)
    return _make_model(arrays, dtype, parents=parents, tip_ids=tip_ids, side=stored_side, name=name,
                       provenance=provenance)  # fmt: skip


def save_model(model: ManoModel, path, *, extras: dict | None = None) -> Path:
    """Write `model` as a mano-jax `.npz` (no pickles), atomically and reproducibly.

    One array per ManoModel array field under its name, plus `parents`, `tip_ids`, `side`, `name`,
    `provenance` and `format` = "mano-jax-model/1". `extras` adds more named arrays (e.g. a rig's
    joints), stored after the model's and ignored by `load_model`. The same model always gives the same
    bytes (fixed zip timestamps and entry order), so generated model files can be rebuilt and compared.
    """
    path = Path(path)
    entries = {"format": np.array(NPZ_FORMAT)}
    entries.update(model.numpy())
    entries["parents"] = np.asarray(model.parents, dtype=np.int64)
    entries["tip_ids"] = np.asarray(model.tip_ids, dtype=np.int64)
    entries["side"] = np.array(model.side)
    entries["name"] = np.array(model.name)
    entries["provenance"] = np.array(model.provenance)
    clash = sorted(set(entries) & set(extras or {}))
    if clash:
        raise ValueError(f"extras: {clash} are model entries; pick other names")
    entries.update({key: np.asarray(value) for key, value in (extras or {}).items()})
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for key, value in entries.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3
                info.external_attr = 0o644 << 16
                zf.writestr(info, buffer.getvalue(), compresslevel=6)
    return path


# --- entry point --------------------------------------------------------------------------------------


def _bundled_model(name: str, *, side, dtype, tips) -> ManoModel:
    resource = importlib.resources.files("mano_jax") / "data" / BUNDLED_MODELS[name]
    with importlib.resources.as_file(resource) as file:
        if not file.is_file():
            raise ManoFileError(
                f"{file}: the bundled model {name!r} is missing from this installation of mano-jax "
                f"(expected mano_jax/data/{BUNDLED_MODELS[name]})"
            )
        return _model_from_npz(file, side=side, dtype=dtype, tips=tips)


def load_model(source=None, *, side=None, fix_left_shapedirs=True, dtype=jnp.float32, tips=None) -> ManoModel:
    """Load a hand model.

    Args:
      source: None for the bundled default ("open-right"); a bundled model's name (`BUNDLED_MODELS`:
        "open-right", "open-left", "open" = "open-right"); a path to an official MANO pickle
        (MANO_RIGHT.pkl / MANO_LEFT.pkl as distributed, chumpy not needed, or a chumpy-free re-save);
        or a path to an `.npz` written by `save_model`. The format is recognised from the content.
      side: "right" or "left". For pickles, default: from the file name ("MANO_LEFT", "...left..."),
        else "right"; the provenance says which. For `.npz` the stored side is used (a contradicting
        `side` is an error).
      fix_left_shapedirs: for left pickles, negate x of the shape blend shapes, which the released
        MANO_LEFT.pkl forgot to mirror (smplx#48). If MANO_RIGHT.pkl lies beside the left file, it is used
        to check whether the file really has the bug (a fixed file is left alone); without it the bug is
        assumed. False keeps shapedirs exactly as stored, which reproduces data sets fitted with the bug.
        Ignored for `.npz` models, saved after the choice was made (their provenance records it).
      dtype: floating dtype of the model arrays (float64 needs `jax_enable_x64`).
      tips: fingertip vertices (thumb, index, middle, ring, pinky) for keypoints: a key of
        `conventions.TIP_IDS` ("manopth", "smplx", "boukhayma"), 5 vertex ids, or None: the ids stored
        in an `.npz`, or "manopth" (745, 317, 444, 556, 673) for a 778-vertex pickle, the same for both
        hands since the left mesh keeps the right's vertex order (manopth itself uses 445 for the left
        middle tip, the neighbouring vertex).

    Raises:
      ManoFileError: unsafe pickle (anything beyond numpy/scipy/chumpy arrays; refused before it runs),
        unreadable/truncated/corrupt file, missing entries, inconsistent shapes, NaN/inf, unknown name.
    """
    if side not in (None, "right", "left"):
        raise ValueError(f"side must be 'right', 'left' or None, got {side!r}")
    if source is None:
        source = DEFAULT_MODEL
    if isinstance(source, str) and source in BUNDLED_MODELS:
        return _bundled_model(source, side=side, dtype=dtype, tips=tips)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be None, a bundled model name or a path, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and not path.suffix and os.sep not in source:
            raise ManoFileError(
                f"{source}: no such bundled model or file; bundled models: {', '.join(BUNDLED_MODELS)}"
            )
        raise ManoFileError(f"{path}: no such file")
    if path.is_dir():
        raise ManoFileError(f"{path}: is a folder; pass the model file (e.g. {path / 'MANO_RIGHT.pkl'})")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ManoFileError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if not magic:
        raise ManoFileError(f"{path}: the file is empty")
    if magic == b"PK\x03\x04":
        return _model_from_npz(path, side=side, dtype=dtype, tips=tips)
    return _model_from_pickle(path, side=side, fix_left_shapedirs=fix_left_shapedirs, dtype=dtype, tips=tips)
