"""Correspondences between scan points and the model surface, and surface normals.

Scan -> model: the closest point on the model's *triangles* (not only its vertices). Once per round a
global search finds each scan point's nearest model vertex (a SciPy KD-tree on the host, or brute force
in the graph; see `registration.pipeline.match`) and `closest_on_candidates` picks the closest of the
triangles around it; during the round's Gauss-Newton steps the point keeps that triangle and
`closest_on_triangles` slides the closest point over it as the model moves. Model -> scan: each model
vertex's nearest scan point.

bench/registration.py measures both nearest-neighbour searches and how often the one-ring candidates
miss the true closest triangle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree


def vertex_faces(faces: np.ndarray, num_vertices: int) -> np.ndarray:
    """(V, K) ids of the triangles around each vertex, padded with -1 (K = the largest valence)."""
    faces = np.asarray(faces)
    corner_vertex = faces.reshape(-1)
    corner_face = np.repeat(np.arange(len(faces)), 3)
    order = np.argsort(corner_vertex, kind="stable")
    counts = np.bincount(corner_vertex, minlength=num_vertices)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(order)) - np.repeat(start, counts)
    table = np.full((num_vertices, max(int(counts.max()), 1)), -1, dtype=np.int32)
    table[corner_vertex[order], slot] = corner_face[order]
    return table


def vertex_neighbours(faces: np.ndarray, num_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges of the mesh as (E, 2) vertex ids and each vertex's degree (V,)."""
    faces = np.asarray(faces)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = np.unique(np.sort(edges, axis=1), axis=0)
    degree = np.bincount(edges.reshape(-1), minlength=num_vertices)
    return edges.astype(np.int32), degree


def closest_on_segment(p, a, b):
    """Closest point to p (*, 3) on segment ab: parameter t in [0, 1] and squared distance (*,)."""
    ab = b - a
    t = jnp.sum((p - a) * ab, axis=-1) / jnp.maximum(jnp.sum(ab * ab, axis=-1), 1e-30)
    t = jnp.clip(t, 0.0, 1.0)
    d = a + t[..., None] * ab - p
    return t, jnp.sum(d * d, axis=-1)


def closest_on_triangles(p: jax.Array, a: jax.Array, b: jax.Array, c: jax.Array):
    """Closest point to p (*, 3) on triangles (a, b, c) (*, 3) each: (squared distance (*,), bary (*, 3)).

    The answer is the plane projection when it falls inside the triangle, else the closest of the three
    edges; degenerate triangles fall back to their edges.
    """
    ab, ac, ap = b - a, c - a, p - a
    d00 = jnp.sum(ab * ab, -1)
    d01 = jnp.sum(ab * ac, -1)
    d11 = jnp.sum(ac * ac, -1)
    d20 = jnp.sum(ap * ab, -1)
    d21 = jnp.sum(ap * ac, -1)
    denom = d00 * d11 - d01 * d01
    ok = denom > 1e-12 * jnp.maximum(d00 * d11, 1e-30)
    safe = jnp.where(ok, denom, 1.0)
    v = (d11 * d20 - d01 * d21) / safe
    w = (d00 * d21 - d01 * d20) / safe
    u = 1.0 - v - w
    inside = ok & (u >= 0) & (v >= 0) & (w >= 0)
    proj = u[..., None] * a + v[..., None] * b + w[..., None] * c - p
    d_in = jnp.where(inside, jnp.sum(proj * proj, -1), jnp.inf)

    t_ab, d_ab = closest_on_segment(p, a, b)
    t_bc, d_bc = closest_on_segment(p, b, c)
    t_ca, d_ca = closest_on_segment(p, c, a)
    zero = jnp.zeros_like(t_ab)
    cands = jnp.stack([d_in, d_ab, d_bc, d_ca], axis=-1)
    barys = jnp.stack(
        [
            jnp.stack([u, v, w], -1),
            jnp.stack([1.0 - t_ab, t_ab, zero], -1),
            jnp.stack([zero, 1.0 - t_bc, t_bc], -1),
            jnp.stack([t_ca, zero, 1.0 - t_ca], -1),
        ],
        axis=-2,
    )
    best = jnp.argmin(cands, axis=-1)
    bary = jnp.take_along_axis(barys, best[..., None, None], axis=-2)[..., 0, :]
    return jnp.min(cands, axis=-1), bary


def closest_on_candidates(points: jax.Array, vertices: jax.Array, faces: jax.Array, candidates: jax.Array):
    """The closest point on the model surface among each point's candidate triangles.

    Args:
      points: (N, 3) query points.
      vertices: (V, 3) model vertices; faces: (F, 3) triangles.
      candidates: (N, K) triangle ids per point, -1 for padding (at least one valid per point).

    Returns (face (N,), bary (N, 3), distance (N,)): the chosen triangle, the barycentric coordinates of the
    closest point on it and the distance to it.
    """
    valid = candidates >= 0
    tri = faces[jnp.where(valid, candidates, 0)]  # (N, K, 3)
    corners = vertices[tri]  # (N, K, 3, 3)
    p = jnp.broadcast_to(points[:, None, :], corners.shape[:2] + (3,))
    d2, bary = closest_on_triangles(p, corners[..., 0, :], corners[..., 1, :], corners[..., 2, :])
    d2 = jnp.where(valid, d2, jnp.inf)
    best = jnp.argmin(d2, axis=-1)
    face = jnp.take_along_axis(candidates, best[:, None], axis=1)[:, 0]
    bary = jnp.take_along_axis(bary, best[:, None, None], axis=1)[:, 0]
    dist = jnp.sqrt(jnp.take_along_axis(d2, best[:, None], axis=1)[:, 0])
    return face, bary, dist


def vertex_normals(vertices: jax.Array, faces: jax.Array) -> jax.Array:
    """(V, 3) unit vertex normals: area-weighted sums of the incident triangles' normals."""
    tri = vertices[faces]
    n = jnp.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    acc = jnp.zeros_like(vertices).at[faces.reshape(-1)].add(jnp.repeat(n, 3, axis=0))
    return acc / jnp.maximum(jnp.linalg.norm(acc, axis=-1, keepdims=True), 1e-12)


def estimate_normals(points: np.ndarray, k: int = 16) -> np.ndarray:
    """(N, 3) unit normals of a point cloud by PCA of each point's k nearest neighbours (sign arbitrary)."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) < 3:
        return np.tile(np.array([0.0, 0.0, 1.0]), (len(points), 1))
    k = min(k, len(points))
    _, nn = cKDTree(points).query(points, k=k, workers=-1)
    nbrs = points[nn]
    centred = nbrs - nbrs.mean(axis=1, keepdims=True)
    cov = np.einsum("nki,nkj->nij", centred, centred)
    _, vecs = np.linalg.eigh(cov)
    return vecs[:, :, 0]
