"""Pose blend shapes in closed form, with MANO's locality cost.

With the poses fixed, an unposed registration u_n (see `templates.unpose`) is its hand's template plus
the pose correctives: u_n = T_h(n) + P f_n + noise, with f_n the 135 pose features (R - I of joints
1..15). This is linear in the templates and in P, and the model decouples over vertices: vertex v has
its own 135 x 3 block P_v, and every vertex sees the same features. The templates are eliminated by
centring the features and the unposed vertices per hand (they are the per-hand means), and each vertex
solves

    min_{P_v}  1/N sum_n |u_nv - T_h(n),v - P_v f_n|^2 + sum_k C_kv |P_v,k|^2 + ridge |P_v|^2

whose normal matrix is the shared feature covariance plus a per-vertex diagonal. All vertices are solved
by batched solves. The templates follow as the per-hand means minus the mean correctives.
Lengths are metres.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .. import lbs


def pose_features(hand_pose) -> jax.Array:
    """(N, 135) pose blend shape features R - I of (N, 45) axis-angle hand poses."""
    hand_pose = jnp.asarray(hand_pose)
    rot = lbs.axis_angle_to_matrix(hand_pose.reshape(*hand_pose.shape[:-1], 15, 3))
    return lbs.pose_features(rot)


@partial(jax.jit, static_argnames=("num_hands",))
def _solve(unposed, features, hand_index, diag, num_hands):
    n = features.shape[0]
    count = jax.ops.segment_sum(jnp.ones(n, features.dtype), hand_index, num_hands)
    f_mean = jax.ops.segment_sum(features, hand_index, num_hands) / count[:, None]
    u_mean = jax.ops.segment_sum(unposed, hand_index, num_hands) / count[:, None, None]
    fc = features - f_mean[hand_index]
    gram = fc.T @ fc / n
    rhs = jnp.einsum("nf,nvc->vfc", fc, unposed - u_mean[hand_index]) / n
    # One batched solve over all vertices (a loop of smaller batched solves was slow on CPU).
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    p = jnp.linalg.solve(gram[None] + diag[:, :, None] * eye[None], rhs)  # (V, 135, 3)
    posedirs = jnp.swapaxes(p, 1, 2)
    return posedirs, u_mean - jnp.einsum("hf,vcf->hvc", f_mean, posedirs)


def solve_posedirs(unposed, features, hand_index, num_hands: int, cost=None, *, ridge: float = 1e-4):
    """Pose blend shapes and per-hand templates that best explain unposed registrations.

    Args:
      unposed: (N, V, 3) registrations in the rest frame (`templates.unpose`), metres.
      features: (N, 135) their pose features (`pose_features`).
      hand_index: (N,) the hand (template) of each registration, in [0, num_hands).
      num_hands: number of templates.
      cost: (15, V) locality cost (`locality.cost_matrix`); None for none (ridge only).
      ridge: weight of |P|^2, relative to the data term (a mean over registrations).

    Returns:
      (posedirs (V, 3, 135) metres per unit feature, templates (H, V, 3) metres).
    """
    unposed = jnp.asarray(unposed)
    dtype = unposed.dtype
    v = unposed.shape[1]
    cost = np.zeros((15, v)) if cost is None else np.asarray(cost, np.float64)
    if cost.shape != (15, v):
        raise ValueError(f"cost: expected shape (15, {v}), got {cost.shape}")
    diag = jnp.repeat(jnp.asarray(cost, dtype).T, 9, axis=1) + ridge  # (V, 135): joint k's cost on its features
    posedirs, templates = _solve(
        unposed, jnp.asarray(features, dtype), jnp.asarray(hand_index, jnp.int32), diag, num_hands
    )
    return posedirs, templates


def rigid_free(posedirs, vertices, joints, distances, radius: float) -> jax.Array:
    """(V, 3, 135) pose blend shapes with the rigid motion of each joint's neighbourhood removed.

    A pose blend shape that moves the skin around joint k rigidly (a rotation about the joint or a
    shift, proportional to the pose features) has the same effect as a small change of the pose, so
    poses and pose blend shapes could trade one for the other without changing the fit. mano-jax fixes
    this freedom: for each joint, the least-squares rigid motion of its 9 feature columns over the
    vertices within `radius` (metres, geodesic `distances` (15, V) from the joint's skin ring) is
    subtracted there. What remains -- bulges, creases, volume changes -- is what only a corrective can
    explain; rigid motion is the pose's job. `vertices` (V, 3) and `joints` (16, 3): rest pose, metres.
    """
    p = jnp.asarray(posedirs)
    dtype = p.dtype
    v = p.shape[0]
    inside = jnp.asarray(distances, dtype) < radius  # (15, V)
    rel = jnp.asarray(vertices, dtype)[None] - jnp.asarray(joints, dtype)[1:, None]  # (15, V, 3)
    x, y, z = rel[..., 0], rel[..., 1], rel[..., 2]
    zero, one = jnp.zeros_like(x), jnp.ones_like(x)
    # Displacement of a rigid motion (t, w) at x: t + w x rel = B (t, w), B = [I, -[rel]x] (3 x 6).
    basis = jnp.stack([
        jnp.stack([one, zero, zero, zero, z, -y], -1),
        jnp.stack([zero, one, zero, -z, zero, x], -1),
        jnp.stack([zero, zero, one, y, -x, zero], -1),
    ], -2) * inside[..., None, None]  # (15, V, 3, 6)  # fmt: skip
    blocks = jnp.transpose(p.reshape(v, 3, 15, 9), (2, 0, 1, 3))  # (15, V, 3, 9)
    normal = jnp.einsum("kvca,kvcb->kab", basis, basis) + 1e-12 * jnp.eye(6, dtype=dtype)[None]
    rhs = jnp.einsum("kvca,kvcf->kaf", basis, blocks)
    motion = jnp.linalg.solve(normal, rhs)  # (15, 6, 9)
    blocks = blocks - jnp.einsum("kvca,kaf->kvcf", basis, motion)
    return jnp.transpose(blocks, (1, 2, 0, 3)).reshape(v, 3, 135)
