"""Where each joint's pose corrective may live: geodesic distances on the mesh and the cost matrix.

MANO localises its pose blend shapes by penalising a vertex's dependence on joints that are far away
along the surface; the paper does not give the cost. What mano-jax uses, and why:

- Distances are measured from the *skin around the joint*: the ring of vertices nearest to the rest
  joint (within `ring_margin` of the nearest one), i.e. the skin that folds and bulges when the joint
  turns. Not from the whole segment the joint moves: a corrective allowed over the whole segment can
  imitate a rotation of that segment, so poses and pose blend shapes could trade one for the other
  and the learned correctives would not be unique. A cost that grows towards the segment's far end
  pins them: there, only the pose can explain the data.
- Distances are shortest paths along mesh edges (Dijkstra, scipy) from the ring to every vertex,
  metres. On a triangle mesh this overestimates the true geodesic by a few per cent; for a cost that
  only needs to grow with distance that is irrelevant. Vertices unreachable from the ring (a mesh in
  several pieces) get the largest finite distance of that joint, the strongest penalty.
- The cost is zero within `radius` of the ring (the corrective is free to live there) and grows
  quadratically beyond it: C = weight * ((d - radius)_+ / scale)^2. Zero inside avoids shrinking the
  real correctives; quadratic outside makes a corrective's tail decay smoothly instead of being cut.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import dijkstra


def edge_graph(vertices, faces) -> sp.csr_matrix:
    """(V, V) symmetric sparse matrix of mesh edge lengths (metres)."""
    vertices = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = np.unique(np.sort(edges, axis=1), axis=0)
    lengths = np.linalg.norm(vertices[edges[:, 0]] - vertices[edges[:, 1]], axis=1)
    n = vertices.shape[0]
    graph = sp.coo_matrix((lengths, (edges[:, 0], edges[:, 1])), shape=(n, n))
    return (graph + graph.T).tocsr()


def joint_distances(vertices, faces, joints, *, ring_margin: float = 0.003) -> np.ndarray:
    """(15, V) geodesic (mesh-edge) distance in metres from the skin ring of each joint 1..15.

    vertices (V, 3) and joints (16, 3) in the rest pose, metres. A joint's ring is every vertex within
    `ring_margin` of the distance from the joint to its nearest vertex.
    """
    vertices = np.asarray(vertices, np.float64)
    joints = np.asarray(joints, np.float64)
    graph = edge_graph(vertices, faces)
    out = np.empty((joints.shape[0] - 1, vertices.shape[0]))
    for k in range(1, joints.shape[0]):
        near = np.linalg.norm(vertices - joints[k], axis=1)
        ring = np.flatnonzero(near <= near.min() + ring_margin)
        d = dijkstra(graph, directed=False, indices=ring, min_only=True)
        finite = np.isfinite(d)
        out[k - 1] = np.where(finite, d, d[finite].max())
    return out


def cost_matrix(distances, *, radius: float = 0.015, scale: float = 0.01, weight: float = 1.0) -> np.ndarray:
    """(15, V) locality cost C = weight * ((d - radius)_+ / scale)^2 from `joint_distances` (metres).

    `weight` is relative to the data term of `solve_posedirs`, a mean over registrations of squared
    unposed residuals (a pose feature's variance is ~0.1 for everyday hand poses), so with the defaults
    a corrective 1 cm beyond the radius costs about ten times what it could explain.
    """
    excess = np.maximum(np.asarray(distances, np.float64) - radius, 0.0) / scale
    return weight * excess**2


def corrective_energy(posedirs) -> np.ndarray:
    """(15, V) squared norm of each joint's pose blend shape block P[v, :, 9k:9k+9] per vertex."""
    p = np.asarray(posedirs, np.float64)
    v = p.shape[0]
    return np.sum(p.reshape(v, 3, 15, 9) ** 2, axis=(1, 3)).T


def leakage(posedirs, distances, radius: float) -> np.ndarray:
    """(15,) fraction of each joint's corrective energy at vertices farther than `radius` (metres)
    from its joint's ring: 0 for a perfectly local corrective. NaN for a joint without any corrective."""
    energy = corrective_energy(posedirs)
    total = energy.sum(axis=1)
    far = np.where(np.asarray(distances) > radius, energy, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, far / np.where(total > 0, total, 1.0), np.nan)
