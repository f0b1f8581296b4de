"""A synthetic MANO-format model of real size, and writers for the pickle flavours found in the wild.

The arrays are random but sane (10 cm hand-sized point cloud, regressor rows and skinning rows summing to
1, 20 stored shape components of which 10 are used, non-orthonormal PCA basis, non-zero mean pose), so a
MANO layer runs on them exactly as on the official files. Three writers:

- `write_plain_pickle`: numpy arrays + a scipy csc `J_regressor`, as re-saved "chumpy-free" files are.
- `write_official_pickle`: the official layout byte for byte in spirit: a Python-2 protocol-2 stream with
  Python-2 class paths (`numpy.core.multiarray._reconstruct`, `scipy.sparse.csc.csc_matrix`,
  `copy_reg._reconstructor`, `__builtin__.set`) and `shapedirs` as a `chumpy.reordering.Select` over a
  `chumpy.ch.Ch` holding 20 components. The opcodes are emitted by hand, so no chumpy is needed.
- `write_malicious_pickle`: pickles whose payload would create a marker file when unpickled unsafely.

Only numpy, scipy and the standard library are used: `tools/make_golden.py` imports this module from a
throwaway environment that has no JAX.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

NUM_VERTICES = 778
NUM_FACES = 1538
NUM_JOINTS = 16
NUM_STORED_SHAPES = 20
NUM_SHAPES = 10
NUM_TRAINING_POSES = 1554
PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)
#: How the official files store the root's parent in the uint32-derived kintree table.
ROOT_PARENT_IN_FILE = 4294967295

#: The names `write_malicious_pickle` accepts.
MALICIOUS_KINDS = (
    "os.system",
    "posix.system",
    "builtins.eval",
    "subprocess.Popen",
    "nested",
    "stack_global",
)


def make_mano_arrays(side: str = "right", seed: int = 0) -> dict:
    """The arrays of a MANO_RIGHT/MANO_LEFT-style file: keys and shapes as in the official pickles.

    `shapedirs` is (778, 3, 10) as the model uses it; `shapedirs_stored` (778, 3, 20) is what the official
    file keeps inside its chumpy object (the first 10 of which are `shapedirs`). The left model is built
    from the right one with the same seed as the released MANO_LEFT.pkl is: template, pose blend shapes and
    pose basis mirrored, faces reversed, but shape blend shapes copied without negating x (the bug).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    rng = np.random.default_rng(seed)
    V = NUM_VERTICES

    # A flattened hand-sized blob: 18 x 8 x 3 cm.
    v_template = rng.uniform(-1.0, 1.0, size=(V, 3)) * np.array([0.09, 0.04, 0.015])

    # Joint regressor: each joint a convex combination of the 8 vertices nearest to an anchor.
    anchors = v_template[rng.choice(V, size=NUM_JOINTS, replace=False)]
    rows, cols, vals = [], [], []
    for j, anchor in enumerate(anchors):
        nearest = np.argsort(np.linalg.norm(v_template - anchor, axis=1))[:8]
        w = rng.dirichlet(np.ones(8))
        rows += [j] * 8
        cols += list(np.sort(nearest))
        vals += list(w[np.argsort(nearest)])
    J_regressor = sp.csc_matrix((np.array(vals), (np.array(rows), np.array(cols))), shape=(NUM_JOINTS, V))
    J = J_regressor @ v_template

    # Skinning weights: softmax of negative squared distances to the joints (rows sum to 1).
    d2 = ((v_template[:, None, :] - J[None, :, :]) ** 2).sum(-1)
    logits = -d2 / (2 * 0.02**2)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)

    component_scale = 0.01 / (1.0 + np.arange(NUM_STORED_SHAPES))
    shapedirs_stored = rng.normal(size=(V, 3, NUM_STORED_SHAPES)) * component_scale
    posedirs = rng.normal(size=(V, 3, 9 * (NUM_JOINTS - 1))) * 1e-3

    # PCA of the hand pose: deliberately not orthonormal (the official basis is not either).
    hands_components = rng.normal(size=(45, 45)) * 0.3
    hands_mean = rng.normal(size=45) * 0.2
    hands_coeffs = rng.normal(size=(NUM_TRAINING_POSES, 45)) * (1.5 / (1.0 + 0.2 * np.arange(45)))

    # Triangles of 3 distinct vertices (connectivity does not matter to a MANO layer).
    faces = np.argpartition(rng.random((NUM_FACES, V)), 3, axis=1)[:, :3].astype(np.uint32)

    kintree_table = np.array(
        [[ROOT_PARENT_IN_FILE, *PARENTS[1:]], list(range(NUM_JOINTS))], dtype=np.int64
    )

    if side == "left":
        mirror = np.array([-1.0, 1.0, 1.0])
        v_template = v_template * mirror
        J = J * mirror
        # A left pose blend shape answers the mirrored rotation M R M with the mirrored displacement:
        # entry (a, [j, r, c]) picks up the signs m_a m_r m_c.
        sign_rc = np.outer(mirror, mirror).reshape(9)
        posedirs = posedirs * mirror[None, :, None] * np.tile(sign_rc, NUM_JOINTS - 1)[None, None, :]
        # Mirroring an axis-angle pose: (x, y, z) -> (x, -y, -z) per joint.
        aa_sign = np.tile([1.0, -1.0, -1.0], 15)
        hands_components = hands_components * aa_sign
        hands_mean = hands_mean * aa_sign
        faces = faces[:, ::-1].copy()
        # The released MANO_LEFT.pkl bug: shape blend shapes copied from the right, x not negated.

    return {
        "v_template": v_template,
        "f": faces,
        "weights": weights,
        "J_regressor": J_regressor,
        "kintree_table": kintree_table,
        "J": J,
        "shapedirs": shapedirs_stored[:, :, :NUM_SHAPES].copy(),
        "shapedirs_stored": shapedirs_stored,
        "posedirs": posedirs,
        "hands_components": hands_components,
        "hands_mean": hands_mean,
        "hands_coeffs": hands_coeffs,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def fixture_fingerprint(arrays: dict) -> str:
    """SHA-256 of the fixture's contents, so stored golden outputs can tell whether the fixture changed."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = arrays[key]
        value = value.toarray() if sp.issparse(value) else np.asarray(value)
        digest.update(f"{key}:{value.dtype.str}:{value.shape}:".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _file_dict(arrays: dict) -> dict:
    """The keys that go into a model file (`shapedirs_stored` is the official file's chumpy payload)."""
    return {k: v for k, v in arrays.items() if k != "shapedirs_stored"}


def write_plain_pickle(path, arrays: dict) -> Path:
    """A chumpy-free MANO pickle: numpy arrays and a scipy csc `J_regressor`, protocol 2."""
    path = Path(path)
    with open(path, "wb") as f:
        pickle.dump(_file_dict(arrays), f, protocol=2)
    return path


# --- a hand-written Python-2 protocol-2 pickle emitter ------------------------------------------------


@dataclass
class _Global:
    """A `module.name` reference, emitted with the GLOBAL opcode."""

    module: str
    name: str


@dataclass
class _Reduce:
    """`callable(*args)`, optionally followed by BUILD with `state`."""

    func: _Global
    args: tuple
    state: object = None


@dataclass
class _Instance:
    """A class instance as Python 2 pickles it: NEWOBJ (protocol 2 default) or copy_reg._reconstructor."""

    cls: _Global
    state: dict
    via: str = "newobj"


@dataclass
class _Py2Set:
    items: list = field(default_factory=list)


class _Py2Emitter:
    """Writes objects as Python 2's cPickle does at protocol 2: byte strings as STRING opcodes, no memo."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")

    def dump(self, obj) -> bytes:
        self.save(obj)
        self.out += b"."
        return bytes(self.out)

    def save(self, obj):
        out = self.out
        if obj is None:
            out += b"N"
        elif obj is True:
            out += b"\x88"
        elif obj is False:
            out += b"\x89"
        elif isinstance(obj, int):
            if 0 <= obj < 256:
                out += b"K" + bytes([obj])
            elif -(2**31) <= obj < 2**31:
                out += b"J" + struct.pack("<i", obj)
            else:
                raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                out += b"\x8a" + bytes([len(raw)]) + raw
        elif isinstance(obj, float):
            out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):  # a Python 2 `str`: bytes on the wire
            self._save_bytes(obj.encode("latin1"))
        elif isinstance(obj, bytes):
            self._save_bytes(obj)
        elif isinstance(obj, tuple):
            if len(obj) == 0:
                out += b")"
            elif len(obj) <= 3:
                for item in obj:
                    self.save(item)
                out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(obj)]
            else:
                out += b"("
                for item in obj:
                    self.save(item)
                out += b"t"
        elif isinstance(obj, list):
            out += b"]"
            if obj:
                out += b"("
                for item in obj:
                    self.save(item)
                out += b"e"
        elif isinstance(obj, dict):
            out += b"}"
            if obj:
                out += b"("
                for key, value in obj.items():
                    self.save(key)
                    self.save(value)
                out += b"u"
        elif isinstance(obj, _Global):
            out += b"c" + f"{obj.module}\n{obj.name}\n".encode("ascii")
        elif isinstance(obj, _Reduce):
            self.save(obj.func)
            self.save(tuple(obj.args))
            out += b"R"
            if obj.state is not None:
                self.save(obj.state)
                out += b"b"
        elif isinstance(obj, _Instance):
            if obj.via == "newobj":
                self.save(obj.cls)
                out += b")\x81"
            elif obj.via == "reconstructor":
                self.save(_Global("copy_reg", "_reconstructor"))
                self.save((obj.cls, _Global("__builtin__", "object"), None))
                out += b"R"
            else:
                raise ValueError(f"unknown instance encoding {obj.via!r}")
            self.save(obj.state)
            out += b"b"
        elif isinstance(obj, _Py2Set):
            self.save(_Reduce(_Global("__builtin__", "set"), (list(obj.items),)))
        elif isinstance(obj, np.ndarray):
            self.save(_py2_array(obj))
        else:
            raise TypeError(f"cannot emit {type(obj).__name__}")

    def _save_bytes(self, raw: bytes):
        if len(raw) < 256:
            self.out += b"U" + bytes([len(raw)]) + raw
        else:
            self.out += b"T" + struct.pack("<I", len(raw)) + raw


def _py2_dtype(dtype: np.dtype) -> _Reduce:
    byteorder = "|" if dtype.itemsize == 1 else "<"
    return _Reduce(
        _Global("numpy", "dtype"),
        (dtype.str[1:], 0, 1),
        state=(3, byteorder, None, None, None, -1, -1, 0),
    )


def _py2_array(a: np.ndarray) -> _Reduce:
    """An ndarray the way numpy under Python 2 pickled it (raw data as a byte string)."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        raise ValueError("big-endian arrays are not emitted")
    return _Reduce(
        _Global("numpy.core.multiarray", "_reconstruct"),
        (_Global("numpy", "ndarray"), (0,), b"b"),
        state=(1, tuple(int(n) for n in a.shape), _py2_dtype(a.dtype), False, a.tobytes()),
    )


def _chumpy_state(**terms) -> dict:
    """A chumpy object's pickled `__dict__` (what `Ch.__getstate__` leaves after dropping caches)."""
    return {
        **terms,
        "_dirty_vars": _Py2Set(sorted(terms)),
        "_itr": None,
        "_depends_on_deps": {},
        "_make_dense": False,
        "_make_sparse": False,
    }


def official_shapedirs(shapedirs_stored: np.ndarray, num_used: int = NUM_SHAPES, via="reconstructor"):
    """`shapedirs` as the official files hold it: a Select of the first `num_used` of the stored ones."""
    flat_ids = np.arange(shapedirs_stored.size).reshape(shapedirs_stored.shape)[:, :, :num_used].ravel()
    ch = _Instance(_Global("chumpy.ch", "Ch"), _chumpy_state(x=shapedirs_stored), via=via)
    return _Instance(
        _Global("chumpy.reordering", "Select"),
        _chumpy_state(
            a=ch, idxs=flat_ids.astype(np.int64), preferred_shape=shapedirs_stored.shape[:2] + (num_used,)
        ),
        via=via,
    )


def _py2_csc(m) -> _Instance:
    """A scipy csc matrix as old SciPy under Python 2 pickled it (instance `__dict__`, NEWOBJ)."""
    m = sp.csc_matrix(m)
    return _Instance(
        _Global("scipy.sparse.csc", "csc_matrix"),
        {
            "_shape": tuple(int(n) for n in m.shape),
            "maxprint": 50,
            "format": "csc",
            "data": m.data,
            "indices": m.indices,
            "indptr": m.indptr,
            "_has_sorted_indices": True,
        },
        via="newobj",
    )


def official_pickle_bytes(arrays: dict, *, chumpy_via: str = "reconstructor", extra: dict | None = None):
    """The bytes of an official-style MANO pickle (see `write_official_pickle`)."""
    content = {}
    for key, value in _file_dict(arrays).items():
        if key == "shapedirs":
            value = official_shapedirs(arrays["shapedirs_stored"], value.shape[-1], via=chumpy_via)
        elif key == "J_regressor":
            value = _py2_csc(value)
        content[key] = value
    content.update(extra or {})
    return _Py2Emitter().dump(content)


def write_official_pickle(path, arrays: dict, *, chumpy_via: str = "reconstructor") -> Path:
    """An official-style MANO pickle: Python 2 class paths, chumpy `shapedirs`, scipy csc regressor.

    `chumpy_via` picks how chumpy instances are created: "reconstructor" (`copy_reg._reconstructor`) or
    "newobj" (the NEWOBJ opcode, what protocol 2 emits for new-style classes); loaders must take both.
    """
    path = Path(path)
    path.write_bytes(official_pickle_bytes(arrays, chumpy_via=chumpy_via))
    return path


class _StackGlobalPayload:
    """Pickled by Python 3 at protocol 4 as STACK_GLOBAL `posix system` + REDUCE."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def write_malicious_pickle(path, marker_file, kind: str = "os.system") -> Path:
    """A pickle whose payload creates `marker_file` if an unsafe loader unpickles it.

    `kind` is one of `MALICIOUS_KINDS`; "nested" hides the payload inside a chumpy object's state in an
    otherwise valid official-style MANO file.
    """
    path = Path(path)
    marker = str(marker_file)
    touch = f"touch '{marker}'"
    if kind == "stack_global":
        path.write_bytes(pickle.dumps({"v_template": _StackGlobalPayload(touch)}, protocol=4))
        return path
    payloads = {
        "os.system": _Reduce(_Global("os", "system"), (touch,)),
        "posix.system": _Reduce(_Global("posix", "system"), (touch,)),
        "builtins.eval": _Reduce(_Global("builtins", "eval"), (f"open({marker!r}, 'w').close()",)),
        "subprocess.Popen": _Reduce(_Global("subprocess", "Popen"), (["touch", marker],)),
    }
    if kind == "nested":
        arrays = make_mano_arrays("right", seed=1)
        select = official_shapedirs(arrays["shapedirs_stored"])
        select.state["a"].state["_itr"] = payloads["posix.system"]
        data = official_pickle_bytes(arrays, extra={"shapedirs": select})
    elif kind in payloads:
        data = _Py2Emitter().dump({"v_template": payloads[kind]})
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {MALICIOUS_KINDS}")
    path.write_bytes(data)
    return path
