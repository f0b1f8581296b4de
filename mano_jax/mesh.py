"""Mesh output: closing the open wrist and writing PLY/OBJ/GLB/STL files."""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import trimesh

from ._atomic import atomic_path


def boundary_loops(faces) -> list[np.ndarray]:
    """The closed boundary loops of a triangle mesh, each ordered along its faces' edge direction."""
    faces = np.asarray(faces)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    undirected = defaultdict(int)
    for a, b in edges:
        undirected[(min(a, b), max(a, b))] += 1
    successor = {}
    for a, b in edges:
        if undirected[(min(a, b), max(a, b))] == 1:
            if a in successor:
                raise ValueError(f"the mesh boundary is not manifold at vertex {a}")
            successor[int(a)] = int(b)
    loops = []
    while successor:
        start, loop = next(iter(successor)), []
        v = start
        while True:
            loop.append(v)
            v = successor.pop(v, None)
            if v is None:
                raise ValueError("the mesh boundary does not form closed loops")
            if v == start:
                break
        loops.append(np.asarray(loop))
    return loops


def wrist_cap(faces) -> np.ndarray:
    """(n - 2, 3) triangles that close the mesh's longest boundary loop (the wrist opening).

    A fan from the loop's first vertex, wound against the boundary edges so the cap faces outward
    like the rest of the mesh; no vertex is added, so vertex arrays keep their size. On MANO's
    topology this gives the 14-triangle cap of the closed 1552-face mesh. A closed mesh gets no cap.
    """
    loops = boundary_loops(faces)
    if not loops:
        return np.zeros((0, 3), dtype=np.asarray(faces).dtype)
    loop = max(loops, key=len)
    return np.stack([np.full(len(loop) - 2, loop[0]), loop[2:], loop[1:-1]], axis=1).astype(
        np.asarray(faces).dtype
    )


def export_mesh(path: str | os.PathLike, vertices, faces, *, close_wrist: bool = False) -> None:
    """Write a mesh (vertices in metres) to PLY, OBJ, GLB or STL, chosen by the file suffix.

    `close_wrist=True` adds `wrist_cap` triangles so the mesh is watertight. The file is written
    atomically: readers never see a partial file.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices: expected shape (V, 3), got {vertices.shape} (one mesh at a time)")
    if not np.isfinite(vertices).all():
        raise ValueError(f"vertices for {os.fspath(path)!r} contain NaN or infinite values")
    suffix = os.fspath(path).rsplit(".", 1)[-1].lower()
    if suffix not in ("ply", "obj", "glb", "stl"):
        raise ValueError(f"{os.fspath(path)!r}: unsupported mesh format {suffix!r} (ply, obj, glb, stl)")
    if close_wrist:
        faces = np.concatenate([faces, wrist_cap(faces)])
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    with atomic_path(path) as tmp:
        mesh.export(tmp, file_type=suffix)
