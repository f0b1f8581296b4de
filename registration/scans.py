"""Reading scan sequences of one hand: files on disk -> `ScanSequence` (points in metres).

Accepted input (`load_scans`):

- a **directory** of frames, ordered by natural sort of file name (`frame_2` before `frame_10`); hidden files
  are ignored. A frame is one of
  - a mesh (`.ply`, `.obj`, `.stl`): its vertices with vertex normals, because scanner meshes are dense and
    their vertices are the measurements. A *sparse* mesh (mean edge length above 1% of its extent, e.g. a
    decimated or model-made mesh) is instead sampled on its surface: `MESH_SAMPLES` area-weighted points
    with face normals, seeded by the frame index so loading is reproducible;
  - a point cloud (`.ply` without faces; normals kept when the file has `nx, ny, nz`);
  - `.npy`: an (N, 3) array, or (N, 6) with unit normals in the last three columns;
  - `.xyz` (or `.txt`, `.pts`): whitespace-separated text with 3 or 6 columns, `#` comments.
- one **`.npz`** holding a whole sequence, in either layout (loaded without pickle):
  - `points_0`, `points_1`, ... each (N_i, 3), ordered by their index; optional `normals_<i>` (N_i, 3);
  - `points` (T, N, 3) padded, with optional `counts` (T,) valid points per frame and `normals` (T, N, 3).
  It may also carry `keypoints` (T, 21, 3) and `keypoint_confidence` (T, 21), read unless a separate
  keypoints file is given.
- one scan **file** (a one-frame sequence) or a list of files (kept in the given order).

Units: "auto" looks at the size of the scans (median over frames of the diagonal of the 1st-99th percentile
box, so outliers do not count): a hand with part of the forearm spans ~0.1-0.5 m. A size in
[`METRE_RANGE`] means metres, in 1000x that range millimetres; anything else is "unknown": the points are
converted by the unit (m, cm, mm or inch) that brings the size closest to 0.2 m and the sequence is flagged so
that the registration solves a global scale (stage 0). "m" / "mm" force the units.

Bad input raises `ScanError` naming the file and the problem: a missing or empty directory, a file that is
not a scan, an unreadable/corrupt/empty file, too few points (`MIN_POINTS`), mostly non-finite coordinates.
A few non-finite points (at most `MAX_NONFINITE_SHARE` of a frame) are dropped with a `ScanWarning`. With
`skip_bad_frames=True` a bad frame is a `ScanWarning` instead and becomes a gap (an empty point array, its
index in `bad_frames`) that the registration bridges; a file with an unsupported suffix is then ignored
rather than made a gap, since it is not a frame.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

Units = Literal["auto", "m", "mm"]

MESH_SUFFIXES = (".ply", ".obj", ".stl")
ARRAY_SUFFIXES = (".npy",)
TEXT_SUFFIXES = (".xyz", ".txt", ".pts")
SCAN_SUFFIXES = MESH_SUFFIXES + ARRAY_SUFFIXES + TEXT_SUFFIXES

MIN_POINTS = 100
"""Frames with fewer valid points than this are bad."""
MAX_NONFINITE_SHARE = 0.1
"""Up to this share of non-finite points is dropped with a warning; more makes the frame bad."""
MESH_SAMPLES = 10_000
"""Points sampled on the surface of a sparse mesh."""
SPARSE_MESH_EDGE = 0.01
"""A mesh whose mean edge length exceeds this fraction of its extent is sampled rather than read by vertex."""
METRE_RANGE = (0.04, 1.5)
"""Scan sizes (robust bounding-box diagonal) accepted as metres; 1000x this range means millimetres."""
TYPICAL_SIZE = 0.2
"""Size in metres that an "unknown"-units sequence is brought near by its best-guess unit."""


class ScanError(ValueError):
    """A scan file, frame or keypoints file that cannot be used; the message names it and the problem."""


class ScanWarning(UserWarning):
    """A scan problem that was worked around (dropped points, a skipped bad frame, an ignored file)."""


@dataclasses.dataclass(frozen=True)
class ScanSequence:
    """Scans of one hand, in metres: host data (NumPy), one entry per frame. Not a pytree."""

    points: tuple[np.ndarray, ...]
    """Per frame an (N_i, 3) float64 array of scan points, metres; (0, 3) for a skipped bad frame."""
    normals: tuple[np.ndarray | None, ...]
    """Per frame (N_i, 3) unit normals when the file had them (meshes), else None."""
    names: tuple[str, ...]
    """Per frame the source it came from (file name, or `<npz>:points_<i>`)."""
    unit_scale: float = 1.0
    """Factor applied to the file coordinates to get metres (1 for metres, 0.001 for millimetres)."""
    units: str = "m"
    """"m", "mm" or "unknown" (unknown: a best-guess `unit_scale` was applied; stage 0 solves the scale)."""
    bad_frames: tuple[int, ...] = ()
    """Frames skipped as bad (`skip_bad_frames=True`); their `points` are empty."""
    keypoints: np.ndarray | None = None
    """(T, 21, 3) 3D keypoints per frame in MANO keypoint order (16 joints, then tips thumb..pinky), metres."""
    keypoint_confidence: np.ndarray | None = None
    """(T, 21) confidence in [0, 1] of each keypoint (0: missing); None means all 1."""
    unordered: bool = False
    """True when the frames are an unordered set of poses (no temporal order to exploit)."""

    def __post_init__(self):
        t = len(self.points)
        if len(self.normals) != t or len(self.names) != t:
            raise ValueError(
                f"ScanSequence: {t} point arrays but {len(self.normals)} normals and {len(self.names)} names"
            )
        for i, (p, n) in enumerate(zip(self.points, self.normals)):
            if p.ndim != 2 or p.shape[1] != 3:
                raise ValueError(f"ScanSequence frame {i} ({self.names[i]}): points have shape {p.shape}, expected (N, 3)")
            if n is not None and n.shape != p.shape:
                raise ValueError(f"ScanSequence frame {i} ({self.names[i]}): normals {n.shape} != points {p.shape}")
        if self.keypoints is not None and self.keypoints.shape != (t, 21, 3):
            raise ValueError(f"ScanSequence: keypoints have shape {self.keypoints.shape}, expected ({t}, 21, 3)")
        if self.keypoint_confidence is not None and self.keypoint_confidence.shape != (t, 21):
            raise ValueError(
                f"ScanSequence: keypoint_confidence has shape {self.keypoint_confidence.shape}, expected ({t}, 21)"
            )

    @property
    def num_frames(self) -> int:
        return len(self.points)

    @property
    def good_frames(self) -> tuple[int, ...]:
        """Indices of the frames that have points."""
        bad = set(self.bad_frames)
        return tuple(i for i in range(self.num_frames) if i not in bad)

    def replace(self, **changes) -> "ScanSequence":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_arrays(
        cls,
        arrays: Sequence[np.ndarray],
        *,
        units: Literal["auto", "m", "mm", "unknown"] = "m",
        names: Sequence[str] | None = None,
        normals: Sequence[np.ndarray | None] | None = None,
        keypoints: np.ndarray | None = None,
        keypoint_confidence: np.ndarray | None = None,
        skip_bad_frames: bool = False,
        unordered: bool = False,
    ) -> "ScanSequence":
        """A sequence from in-memory (N_i, 3) arrays (and optional normals / keypoints in the same units).

        `units="unknown"` keeps the coordinates as they are and flags them for scale estimation. Frames are
        validated like files (named `frame <i>` unless `names` is given).
        """
        names = [f"frame {i}" for i in range(len(arrays))] if names is None else list(names)
        normals = [None] * len(arrays) if normals is None else list(normals)
        if len(names) != len(arrays) or len(normals) != len(arrays):
            raise ValueError(f"from_arrays: {len(arrays)} arrays but {len(names)} names and {len(normals)} normals")
        frames = []
        for name, p, n in zip(names, arrays, normals):
            try:
                frames.append(_clean_frame(name, np.asarray(p), None if n is None else np.asarray(n)))
            except ScanError as e:
                frames.append(_bad_frame(e, skip_bad_frames))
        return _assemble(frames, names, units, keypoints, keypoint_confidence, None, unordered)


def load_scans(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    units: Literal["auto", "m", "mm"] = "auto",
    skip_bad_frames: bool = False,
    keypoints: str | os.PathLike | None = None,
    keypoint_order: Literal["mano", "openpose"] = "mano",
    unordered: bool = False,
) -> ScanSequence:
    """Load a scan sequence of one hand (see the module docstring for formats, units and bad input).

    `keypoints`: a `.npy` (T, 21, 3) or (T, 21, 4) with confidence last, a `.npz` with `keypoints` and
    optional `keypoint_confidence`, or a `.json` `{"keypoints": ..., "confidence": ...}` (or a bare list),
    in the scans' units, in `keypoint_order` ("openpose" is reordered to MANO order). Non-finite keypoints
    count as missing (confidence 0). `unordered`: the frames are an unordered set of poses of one subject.
    Returns points in metres.
    """
    if units not in ("auto", "m", "mm"):
        raise ScanError(f"units must be 'auto', 'm' or 'mm', got {units!r}")
    npz_keypoints = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ScanError(f"{path}: no such file or directory")
        if path.is_dir():
            frames, names = _load_directory(path, skip_bad_frames)
        elif path.suffix.lower() == ".npz":
            frames, names, npz_keypoints = _load_npz(path, skip_bad_frames)
        else:
            frames, names = _load_files([path], skip_bad_frames, strict_suffix=True)
    else:
        paths = [Path(p) for p in source]
        if not paths:
            raise ScanError("load_scans: empty list of scan files")
        frames, names = _load_files(paths, skip_bad_frames, strict_suffix=True)
    kp, conf, kp_name = None, None, None
    if keypoints is not None:
        kp, conf = _read_keypoints(Path(keypoints))
        kp_name = str(keypoints)
    elif npz_keypoints is not None:
        kp, conf = npz_keypoints
        kp_name = str(source)
    if kp is not None and keypoint_order == "openpose":
        kp, conf = _openpose_to_mano(kp, conf)
    elif keypoint_order not in ("mano", "openpose"):
        raise ScanError(f"keypoint_order must be 'mano' or 'openpose', got {keypoint_order!r}")
    return _assemble(frames, names, units, kp, conf, kp_name, unordered)


def save_scans(path: str | os.PathLike, scans: ScanSequence) -> None:
    """Write `scans` to one `.npz` that `load_scans` reads back: `points_<i>` (metres; an empty array for a
    bad frame), `normals_<i>` where known, `keypoints` and `keypoint_confidence` if any. Atomic."""
    from mano_jax._atomic import atomic_path

    arrays = {f"points_{i}": p for i, p in enumerate(scans.points)}
    arrays.update({f"normals_{i}": n for i, n in enumerate(scans.normals) if n is not None})
    if scans.keypoints is not None:
        arrays["keypoints"] = scans.keypoints
        arrays["keypoint_confidence"] = scans.keypoint_confidence
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


# ----------------------------------------------------------------------------------------------- internals

@dataclasses.dataclass
class _Frame:
    points: np.ndarray
    normals: np.ndarray | None
    bad: bool = False


def _bad_frame(error: ScanError, skip: bool) -> _Frame:
    if not skip:
        raise error
    warnings.warn(f"{error}; skipped (the frame becomes a gap)", ScanWarning, stacklevel=3)
    return _Frame(np.zeros((0, 3)), None, bad=True)


def _clean_frame(name: str, points: np.ndarray, normals: np.ndarray | None) -> _Frame:
    """Validate one frame's points: shape, finiteness, count, extent."""
    if points.ndim != 2 or points.shape[1] != 3 or not np.issubdtype(points.dtype, np.number):
        raise ScanError(f"{name}: not a scan: expected an (N, 3) array of coordinates, got {points.dtype} {points.shape}")
    if points.shape[0] == 0:
        raise ScanError(f"{name}: empty scan (no points)")
    points = points.astype(np.float64)
    finite = np.isfinite(points).all(axis=1)
    if normals is not None:
        normals = normals.astype(np.float64)
        length = np.linalg.norm(normals, axis=1)
        # Normals are optional: bad ones are dropped, they do not make the frame bad.
        if normals.shape != points.shape or not (np.isfinite(length) & (length > 1e-12)).all():
            normals = None
        else:
            normals = normals / length[:, None]
    bad = int((~finite).sum())
    if bad:
        if bad > MAX_NONFINITE_SHARE * len(points):
            raise ScanError(f"{name}: {bad} of {len(points)} points have NaN/inf coordinates")
        warnings.warn(f"{name}: dropped {bad} of {len(points)} points with NaN/inf coordinates", ScanWarning, stacklevel=4)
        points = points[finite]
        normals = None if normals is None else normals[finite]
    if len(points) < MIN_POINTS:
        raise ScanError(f"{name}: too few points ({len(points)} < {MIN_POINTS})")
    if np.ptp(points, axis=0).max() == 0:
        raise ScanError(f"{name}: degenerate scan: all {len(points)} points coincide")
    return _Frame(points, normals)


def _load_directory(path: Path, skip: bool) -> tuple[list[_Frame], list[str]]:
    from natsort import natsorted

    files = natsorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
    if not files:
        raise ScanError(f"{path}: directory holds no scan files")
    frames, names = _load_files(files, skip, strict_suffix=False)
    if not frames:
        raise ScanError(f"{path}: directory holds no scan files (suffixes {', '.join(SCAN_SUFFIXES)})")
    return frames, names


def _load_files(paths: list[Path], skip: bool, *, strict_suffix: bool) -> tuple[list[_Frame], list[str]]:
    frames, names = [], []
    for path in paths:
        if path.suffix.lower() not in SCAN_SUFFIXES:
            error = ScanError(f"{path}: not a scan file (suffix {path.suffix!r}; expected one of {', '.join(SCAN_SUFFIXES)})")
            if strict_suffix or not skip:
                raise error
            warnings.warn(f"{error}; ignored", ScanWarning, stacklevel=3)
            continue
        try:
            if not path.is_file():
                raise ScanError(f"{path}: no such file")
            points, normals = _read_file(path, seed=len(frames))
            frame = _clean_frame(str(path), points, normals)
        except ScanError as e:
            frame = _bad_frame(e, skip)
        frames.append(frame)
        names.append(path.name)
    return frames, names


def _read_file(path: Path, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw (points, normals) of one scan file; ScanError if it cannot be parsed as a scan."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise ScanError(f"{path}: empty file")
    if suffix in ARRAY_SUFFIXES:
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ScanError(f"{path}: cannot read as a .npy array ({e})") from e
        return _split_columns(path, array)
    if suffix in TEXT_SUFFIXES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy warns on an empty text file; we report it below
                array = np.loadtxt(path, comments="#", ndmin=2, dtype=np.float64)
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise ScanError(f"{path}: cannot read as whitespace-separated coordinates ({e})") from e
        return _split_columns(path, array)
    return _read_mesh(path, seed)


def _split_columns(path: Path, array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if array.ndim == 2 and array.shape[1] == 6:
        return array[:, :3], array[:, 3:]
    if array.ndim == 2 and array.shape[1] == 3:
        return array, None
    raise ScanError(f"{path}: not a scan: expected an (N, 3) or (N, 6) array, got shape {array.shape}")


def _read_mesh(path: Path, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    import trimesh

    try:
        loaded = trimesh.load(path, process=False, force=None)
    except Exception as e:  # trimesh raises many types (ValueError, KeyError, struct.error, ...) on bad files
        raise ScanError(f"{path}: cannot read as a {path.suffix.lstrip('.').upper()} file ({type(e).__name__}: {e})") from e
    if isinstance(loaded, trimesh.Scene):
        geometries = list(loaded.dump())  # apply the scene graph's transforms
        meshes = [g for g in geometries if isinstance(g, trimesh.Trimesh)]
        clouds = [g for g in geometries if isinstance(g, trimesh.PointCloud)]
        if meshes:
            loaded = trimesh.util.concatenate(meshes)
        elif clouds:
            loaded = trimesh.PointCloud(np.concatenate([c.vertices for c in clouds]))
        else:
            raise ScanError(f"{path}: file holds no mesh or point cloud")
    if isinstance(loaded, trimesh.PointCloud):
        normals = _ply_point_normals(loaded)
        return np.asarray(loaded.vertices, np.float64), normals
    if not isinstance(loaded, trimesh.Trimesh):
        raise ScanError(f"{path}: not a scan: holds a {type(loaded).__name__}")
    if len(loaded.faces) == 0:
        return np.asarray(loaded.vertices, np.float64), _ply_point_normals(loaded)
    if not np.isfinite(loaded.vertices).all():
        return np.asarray(loaded.vertices, np.float64), None  # _clean_frame reports it
    # STL stores every triangle corner on its own, and other formats split vertices at texture seams:
    # merged, each surface point is one scan point.
    loaded.merge_vertices(merge_tex=True, merge_norm=True)
    vertices = np.asarray(loaded.vertices, np.float64)
    extent = np.linalg.norm(np.ptp(vertices, axis=0))
    edges = loaded.edges_unique_length
    if len(edges) and extent > 0 and edges.mean() > SPARSE_MESH_EDGE * extent:
        samples, face_index = trimesh.sample.sample_surface(loaded, MESH_SAMPLES, seed=seed)
        return np.asarray(samples, np.float64), np.asarray(loaded.face_normals[face_index], np.float64)
    used = np.unique(loaded.faces)  # scanner exports may carry unreferenced vertices
    return vertices[used], np.asarray(loaded.vertex_normals, np.float64)[used]


def _ply_point_normals(cloud) -> np.ndarray | None:
    """Per-point normals a PLY point cloud carried as nx/ny/nz vertex properties, if any."""
    data = cloud.metadata.get("_ply_raw", {}).get("vertex", {}).get("data")
    # trimesh keeps raw PLY vertex properties as a dict of columns (ASCII) or a structured array (binary).
    names = data.keys() if isinstance(data, dict) else getattr(getattr(data, "dtype", None), "names", None) or ()
    if not all(k in names for k in ("nx", "ny", "nz")):
        return None
    return np.stack([np.asarray(data[k]).ravel() for k in ("nx", "ny", "nz")], axis=1).astype(np.float64)


_POINTS_KEY = re.compile(r"^points_(\d+)$")


def _load_npz(path: Path, skip: bool):
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ScanError(f"{path}: cannot read as a .npz archive ({e})") from e
    try:
        with data:
            keys = set(data.files)
            indexed = sorted((int(m.group(1)), k) for k in keys if (m := _POINTS_KEY.match(k)))
            frames, names = [], []
            if indexed:
                for i, key in indexed:
                    name = f"{path.name}:{key}"
                    try:
                        normals = data[f"normals_{i}"] if f"normals_{i}" in keys else None
                        frames.append(_clean_frame(f"{path}:{key}", data[key], normals))
                    except ScanError as e:
                        frames.append(_bad_frame(e, skip))
                    names.append(name)
            elif "points" in keys:
                padded = data["points"]
                if padded.ndim != 3 or padded.shape[2] != 3:
                    raise ScanError(f"{path}: 'points' has shape {padded.shape}, expected (T, N, 3)")
                counts = data["counts"] if "counts" in keys else np.full(len(padded), padded.shape[1])
                if counts.shape != (len(padded),):
                    raise ScanError(f"{path}: 'counts' has shape {counts.shape}, expected ({len(padded)},)")
                normals = data["normals"] if "normals" in keys else None
                if normals is not None and normals.shape != padded.shape:
                    raise ScanError(f"{path}: 'normals' has shape {normals.shape}, expected {padded.shape}")
                for i in range(len(padded)):
                    c = int(counts[i])
                    try:
                        frames.append(
                            _clean_frame(f"{path}:points[{i}]", padded[i, :c], None if normals is None else normals[i, :c])
                        )
                    except ScanError as e:
                        frames.append(_bad_frame(e, skip))
                    names.append(f"{path.name}:points[{i}]")
            else:
                raise ScanError(
                    f"{path}: holds no scan arrays: expected 'points_0', 'points_1', ... or a padded 'points' "
                    f"(T, N, 3) (found keys: {', '.join(sorted(keys)) or 'none'})"
                )
            kp = None
            if "keypoints" in keys:
                conf = data["keypoint_confidence"] if "keypoint_confidence" in keys else None
                kp = _check_keypoints(path, data["keypoints"], conf)
    except ValueError as e:
        if isinstance(e, ScanError):
            raise
        # Object arrays need pickle, which we refuse (a pickle can run code on load).
        raise ScanError(f"{path}: cannot read its arrays ({e}); store plain numeric arrays points_0, points_1, ...") from e
    if not frames:
        raise ScanError(f"{path}: holds no frames")
    return frames, names, kp


def _read_keypoints(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise ScanError(f"{path}: no such keypoints file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.ndim == 3 and array.shape[1:] == (21, 4):
                return _check_keypoints(path, array[..., :3], array[..., 3])
            return _check_keypoints(path, array, None)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "keypoints" not in data.files:
                    raise ScanError(f"{path}: no 'keypoints' array (found: {', '.join(data.files) or 'none'})")
                conf_key = next((k for k in ("keypoint_confidence", "confidence") if k in data.files), None)
                return _check_keypoints(path, data["keypoints"], data[conf_key] if conf_key else None)
        if suffix == ".json":
            content = json.loads(path.read_text())
            if isinstance(content, dict):
                if "keypoints" not in content:
                    raise ScanError(f"{path}: JSON object has no 'keypoints' entry")
                conf = content.get("confidence", content.get("keypoint_confidence"))
                return _check_keypoints(
                    path, np.asarray(content["keypoints"], np.float64), None if conf is None else np.asarray(conf, np.float64)
                )
            return _check_keypoints(path, np.asarray(content, np.float64), None)
    except ScanError:
        raise
    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ScanError(f"{path}: cannot read keypoints ({e})") from e
    raise ScanError(f"{path}: unsupported keypoints file (expected .npy, .npz or .json)")


def _check_keypoints(path, keypoints: np.ndarray, confidence: np.ndarray | None):
    keypoints = np.asarray(keypoints)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (21, 3) or not np.issubdtype(keypoints.dtype, np.number):
        raise ScanError(f"{path}: keypoints must have shape (T, 21, 3), got {keypoints.shape}")
    keypoints = keypoints.astype(np.float64)
    if confidence is None:
        confidence = np.ones(keypoints.shape[:2])
    confidence = np.asarray(confidence, np.float64)
    if confidence.shape != keypoints.shape[:2]:
        raise ScanError(f"{path}: keypoint confidence has shape {confidence.shape}, expected {keypoints.shape[:2]}")
    if not np.isfinite(confidence).all() or (confidence < 0).any():
        raise ScanError(f"{path}: keypoint confidences must be finite and non-negative")
    # A keypoint the detector could not place (NaN) is a missing keypoint, not a bad frame.
    missing = ~np.isfinite(keypoints).all(axis=2)
    keypoints = np.where(missing[..., None], 0.0, keypoints)
    confidence = np.where(missing, 0.0, np.clip(confidence, 0.0, 1.0))
    return keypoints, confidence


def _openpose_to_mano(keypoints, confidence):
    from mano_jax.conventions import OPENPOSE_ORDER

    # OPENPOSE_ORDER[k] is the MANO keypoint shown at OpenPose position k; invert it.
    mano_from_openpose = np.argsort(np.asarray(OPENPOSE_ORDER))
    return keypoints[:, mano_from_openpose], confidence[:, mano_from_openpose]


def _robust_size(points: np.ndarray) -> float:
    lo, hi = np.percentile(points, [1, 99], axis=0)
    return float(np.linalg.norm(hi - lo))


def detect_units(points: Sequence[np.ndarray]) -> tuple[str, float]:
    """("m" | "mm" | "unknown", factor to metres) from the size of the non-empty frames (module docstring)."""
    sizes = [_robust_size(p) for p in points if len(p)]
    if not sizes:
        return "m", 1.0
    size = float(np.median(sizes))
    lo, hi = METRE_RANGE
    if lo <= size <= hi:
        return "m", 1.0
    if 1000 * lo <= size <= 1000 * hi:
        return "mm", 1e-3
    if size <= 0:
        return "unknown", 1.0
    # The unit a scanner might have used (m, cm, mm, inch) that brings the size nearest a hand's.
    factors = np.array([1.0, 1e-2, 1e-3, 0.0254])
    return "unknown", float(factors[np.argmin(np.abs(np.log(factors * size / TYPICAL_SIZE)))])


def _assemble(frames, names, units, keypoints, confidence, keypoints_name, unordered) -> ScanSequence:
    if units == "auto":
        units, factor = detect_units([f.points for f in frames])
    elif units == "m":
        factor = 1.0
    elif units == "mm":
        factor = 1e-3
    elif units == "unknown":
        factor = 1.0
    else:
        raise ScanError(f"units must be 'auto', 'm' or 'mm', got {units!r}")
    if all(f.bad for f in frames):
        raise ScanError(f"no usable frame among {len(frames)} ({names[0]} ... {names[-1]})")
    t = len(frames)
    if keypoints is not None:
        keypoints = np.asarray(keypoints, np.float64)
        if keypoints.shape[0] != t:
            raise ScanError(f"{keypoints_name or 'keypoints'}: keypoints for {keypoints.shape[0]} frames, but the scans have {t}")
        if confidence is None:
            confidence = np.ones((t, 21))
        keypoints, confidence = _check_keypoints(keypoints_name or "keypoints", keypoints, confidence)
        keypoints = keypoints * factor
    return ScanSequence(
        points=tuple(f.points * factor for f in frames),
        normals=tuple(f.normals for f in frames),
        names=tuple(names),
        unit_scale=factor,
        units=units,
        bad_frames=tuple(i for i, f in enumerate(frames) if f.bad),
        keypoints=keypoints,
        keypoint_confidence=confidence if keypoints is not None else None,
        unordered=unordered,
    )
