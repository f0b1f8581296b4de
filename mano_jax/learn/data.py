"""Registrations: meshes in the model's topology that a hand model is learned from (host data, metres).

A registration is one posed hand mesh whose vertex v corresponds to model vertex v, as the meshes
written by `mano-jax register` are. Left hands are learned as mirrored right hands: `to_right` negates x,
which is exactly how `mano_jax.mirror_model` relates the two models (same vertex order, reflection
across the x = 0 plane), so a left registration mirrored is a right registration of the mirrored hand.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

_MIRROR = np.array([-1.0, 1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class Registrations:
    """N registered hand meshes with who they belong to. Host data (NumPy), not a pytree."""

    vertices: np.ndarray
    """(N, V, 3) float64 vertices in metres, in the model's vertex order; any global pose."""
    subject: np.ndarray
    """(N,) subject identifier of each registration (strings); a subject's left and right hand are
    learned as two templates, see `template_keys`."""
    is_left: np.ndarray
    """(N,) bool, True for a left hand (learned mirrored into the right-hand training set)."""
    names: tuple[str, ...] = ()
    """Where each registration came from (file and frame), for error messages and reports."""

    def __post_init__(self):
        v = np.asarray(self.vertices)
        if v.ndim != 3 or v.shape[-1] != 3:
            raise ValueError(f"registrations: vertices must have shape (N, V, 3), got {v.shape}")
        n = v.shape[0]
        if n == 0:
            raise ValueError("registrations: no registrations given")
        for field in ("subject", "is_left"):
            if np.shape(getattr(self, field)) != (n,):
                raise ValueError(
                    f"registrations: {field} must have shape ({n},) like the vertices, "
                    f"got {np.shape(getattr(self, field))}"
                )
        if self.names and len(self.names) != n:
            raise ValueError(f"registrations: {len(self.names)} names for {n} registrations")
        bad = np.flatnonzero(~np.isfinite(v).all(axis=(1, 2)))
        if bad.size:
            raise ValueError(
                f"registrations: {bad.size} meshes contain NaN or infinite vertices, first: "
                f"{self.name(int(bad[0]))}"
            )

    @property
    def num(self) -> int:
        return self.vertices.shape[0]

    @property
    def num_vertices(self) -> int:
        return self.vertices.shape[1]

    def name(self, i: int) -> str:
        return self.names[i] if self.names else f"registration {i}"

    def template_keys(self) -> tuple[list[str], np.ndarray]:
        """The distinct (subject, side) hands and the index of each registration's hand.

        A person's left hand is not the mirror image of their right, so each hand gets its own template.
        """
        keys = [f"{s}/{'left' if left else 'right'}" for s, left in zip(self.subject, self.is_left)]
        unique, index = np.unique(np.asarray(keys), return_inverse=True)
        return [str(u) for u in unique], index.astype(np.int32)

    def to_right(self) -> np.ndarray:
        """(N, V, 3) all registrations as right hands: left ones reflected across x = 0."""
        sign = np.where(self.is_left[:, None, None], _MIRROR, 1.0)
        return np.asarray(self.vertices, np.float64) * sign

    def subset(self, index) -> Registrations:
        index = np.asarray(index)
        return Registrations(
            vertices=self.vertices[index],
            subject=self.subject[index],
            is_left=self.is_left[index],
            names=tuple(self.names[i] for i in index) if self.names else (),
        )

    @staticmethod
    def from_arrays(vertices, subject=None, is_left=None, names=()) -> Registrations:
        """Registrations from arrays; default: one subject "0", all right hands."""
        vertices = np.asarray(vertices, dtype=np.float64)
        n = vertices.shape[0] if vertices.ndim == 3 else 0
        subject = np.full(n, "0") if subject is None else np.asarray(subject).astype(str)
        is_left = np.zeros(n, bool) if is_left is None else np.asarray(is_left).astype(bool)
        return Registrations(vertices, subject, is_left, tuple(names))


def save_registrations(regs: Registrations, path: str | os.PathLike) -> Path:
    """Write registrations as an `.npz` (`vertices`, `subject`, `is_left`, `names`), atomically."""
    from mano_jax._atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                vertices=regs.vertices,
                subject=np.asarray(regs.subject).astype(str),
                is_left=regs.is_left,
                names=np.asarray(regs.names, dtype=str),
            )
    return path


def _from_npz(path: Path) -> Registrations:
    try:
        # Not a zip, numpy tries a pickle and refuses it with a ValueError that does not name the file.
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in ("vertices", "subject", "is_left", "names") if k in data.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable registrations file, expected an .npz ({e})") from None
    if "vertices" not in arrays:
        raise ValueError(f"{path}: no 'vertices' array (expected (N, V, 3) registrations in metres)")
    vertices = arrays["vertices"].astype(np.float64)
    subject, is_left, names = arrays.get("subject"), arrays.get("is_left"), arrays.get("names")
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"{path}: 'vertices' must have shape (N, V, 3), got {vertices.shape}")
    n = vertices.shape[0]
    if names is None or names.shape != (n,):
        names = [f"{path.name}[{i}]" for i in range(n)]
    try:
        return Registrations.from_arrays(vertices, subject, is_left, tuple(str(s) for s in names))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _from_register_output(path: Path, subject: str) -> Registrations:
    """The meshes of one `mano-jax register` output directory (meshes/ + params.npz)."""
    import trimesh
    from natsort import natsorted

    from registration.result import load_result

    result = load_result(path)
    files = natsorted(p for p in (path / "meshes").iterdir() if p.suffix.lower() in (".ply", ".obj"))
    if len(files) != result.num_frames:
        raise ValueError(
            f"{path}: {len(files)} meshes in meshes/ but params.npz has {result.num_frames} frames"
        )
    skip = set(result.bad_frames)
    vertices, names = [], []
    for t, file in enumerate(files):
        if t in skip:
            continue
        mesh = trimesh.load(file, process=False, force="mesh")
        vertices.append(np.asarray(mesh.vertices, np.float64) / result.scale)
        names.append(f"{path.name}/{file.name}")
    shapes = {v.shape for v in vertices}
    if len(shapes) > 1:
        raise ValueError(f"{path}: meshes have different vertex counts {sorted(shapes)}")
    n = len(vertices)
    return Registrations.from_arrays(
        np.stack(vertices), np.full(n, subject), np.full(n, result.side == "left"), names
    )


def load_registrations(sources, *, subjects=None) -> Registrations:
    """Load registrations from one or more sources and concatenate them.

    Each source is an `.npz` with `vertices` (N, V, 3) metres and optionally `subject` (N,) and
    `is_left` (N,) (see `save_registrations`), a `mano-jax register` output directory (its meshes,
    divided by the fitted scale, bad frames skipped), or a directory of such output directories. The
    subject of a registration directory is its name unless `subjects` maps the directory name to one.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    subjects = subjects or {}
    parts = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such registrations file or directory")
        if path.is_file():
            parts.append(_from_npz(path))
            continue
        dirs = [path] if (path / "params.npz").exists() else sorted(
            d for d in path.iterdir() if (d / "params.npz").exists()
        )
        if not dirs:
            raise ValueError(
                f"{path}: neither a registration output directory (params.npz + meshes/) nor a folder of them"
            )
        parts += [_from_register_output(d, subjects.get(d.name, d.name)) for d in dirs]
    counts = {p.num_vertices for p in parts}
    if len(counts) > 1:
        raise ValueError(f"registrations have different vertex counts {sorted(counts)}: one topology only")
    return Registrations(
        vertices=np.concatenate([p.vertices for p in parts]),
        subject=np.concatenate([p.subject for p in parts]),
        is_left=np.concatenate([p.is_left for p in parts]),
        names=tuple(n for p in parts for n in (p.names or [p.name(i) for i in range(p.num)])),
    )
