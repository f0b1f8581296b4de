"""Pure maths of the MANO model: rotations, blend shapes, the kinematic chain and linear blend skinning,
and the best similarity transform between two point sets.

Nothing here knows about files or model containers; every function takes arrays and broadcasts over
leading batch axes `(*, ...)`. Lengths are in whatever unit the inputs use (metres in mano-jax).

Rotations are kept as (R, t) pairs instead of 4x4 matrices: the homogeneous row is dead weight in every
product, and skinning with (3, 4) blocks is a quarter cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Below this squared angle the Taylor series of sin(t)/t and (1 - cos t)/t^2 are exact to float64
# precision (the next term is t^6 / 5040 < 2e-16), and the closed forms would divide by ~0.
_SMALL_ANGLE_SQ = 1e-4


def axis_angle_to_matrix(axis_angle: jax.Array) -> jax.Array:
    """Rodrigues' formula: (*, 3) axis-angle (radians) -> (*, 3, 3) rotation matrix.

    Exact and with finite derivatives of every order at the zero rotation, in float32 and float64:
    R = I + a K + b K^2 with a = sin(t)/t, b = (1 - cos t)/t^2 = 2 (sin(t/2)/t)^2, and their Taylor
    series near t = 0 (the "double where" keeps NaN out of the unused branch's gradient).
    """
    theta_sq = jnp.sum(axis_angle**2, axis=-1)
    small = theta_sq < _SMALL_ANGLE_SQ
    theta = jnp.sqrt(jnp.where(small, 1.0, theta_sq))
    half_sinc = jnp.sin(0.5 * theta) / theta
    a = jnp.where(small, 1.0 - theta_sq / 6.0 + theta_sq**2 / 120.0, jnp.sin(theta) / theta)
    b = jnp.where(small, 0.5 - theta_sq / 24.0 + theta_sq**2 / 720.0, 2.0 * half_sinc**2)
    # R = c I + a K + b v v^T with c = 1 - b t^2 (using K^2 = v v^T - t^2 I), written out entry by
    # entry: no matrix products, no broadcasting of I.
    c = 1.0 - b * theta_sq
    x, y, z = axis_angle[..., 0], axis_angle[..., 1], axis_angle[..., 2]
    bxy, bxz, byz = b * x * y, b * x * z, b * y * z
    return jnp.stack(
        [
            jnp.stack([c + b * x * x, bxy - a * z, bxz + a * y], axis=-1),
            jnp.stack([bxy + a * z, c + b * y * y, byz - a * x], axis=-1),
            jnp.stack([bxz - a * y, byz + a * x, c + b * z * z], axis=-1),
        ],
        axis=-2,
    )


def matrix_to_axis_angle(rotmat: jax.Array) -> jax.Array:
    """(*, 3, 3) rotation matrix -> (*, 3) axis-angle with angle in [0, pi].

    The angle is atan2 of the antisymmetric and trace parts (accurate at every angle); the axis comes
    from the antisymmetric part, except beyond ~154 degrees, where that part shrinks towards zero and
    the symmetric part (1 - cos t) a a^T gives a well-conditioned axis. Gradients are finite at the
    identity.
    """
    w = jnp.stack(
        [
            rotmat[..., 2, 1] - rotmat[..., 1, 2],
            rotmat[..., 0, 2] - rotmat[..., 2, 0],
            rotmat[..., 1, 0] - rotmat[..., 0, 1],
        ],
        axis=-1,
    )  # = 2 sin(t) a
    trace = rotmat[..., 0, 0] + rotmat[..., 1, 1] + rotmat[..., 2, 2]
    w_sq = jnp.sum(w**2, axis=-1)
    tiny = w_sq < _SMALL_ANGLE_SQ**2
    w_norm = jnp.sqrt(jnp.where(tiny, 1.0, w_sq))
    # Exact |w| for the angle (it matters within 1e-4 of pi), gradient-safe at w = 0.
    positive = w_sq > 0
    exact_norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, w_sq, 1.0)), 0.0)
    theta = jnp.arctan2(0.5 * exact_norm, 0.5 * (trace - 1.0))
    # t / (2 sin t) = t / |w|, whose limit at t -> 0 is 1/2 + t^2/12 with t^2 ~ 3 - trace.
    factor = jnp.where(tiny, 0.5 + (3.0 - trace) / 12.0, theta / w_norm)
    regular = w * factor[..., None]

    eye = jnp.broadcast_to(jnp.eye(3, dtype=rotmat.dtype), rotmat.shape)
    sym = 0.5 * (rotmat + jnp.swapaxes(rotmat, -1, -2)) + eye * (0.5 * (1.0 - trace))[..., None, None]
    diag = jnp.diagonal(sym, axis1=-2, axis2=-1)
    col = jnp.take_along_axis(sym, jnp.argmax(diag, axis=-1)[..., None, None], axis=-1)[..., 0]
    axis = col / jnp.sqrt(jnp.maximum(jnp.sum(col**2, axis=-1, keepdims=True), 1e-30))
    # The symmetric part fixes the axis only up to sign; the antisymmetric part decides it.
    axis = jnp.where(jnp.sum(axis * w, axis=-1, keepdims=True) < 0, -axis, axis)
    near_pi = trace < -0.8
    return jnp.where(near_pi[..., None], axis * theta[..., None], regular)


def procrustes(source: jax.Array, target: jax.Array, weights: jax.Array | None = None, *, solve_scale=False, scale=1.0):
    """Similarity (R, t, s) minimising sum_n w_n |s R source_n + t - target_n|^2 (weighted Procrustes,
    Umeyama's scale).

    Args:
      source, target: (*, N, 3) point sets; leading axes broadcast.
      weights: (*, N) non-negative weights; None weighs every point 1.
      solve_scale: solve s (a bool, or a 0-d array inside jit); otherwise s = `scale`.
      scale: (*) the scale used when it is not solved.

    Returns rot (*, 3, 3) (a proper rotation), transl (*, 3), scale (*).
    """
    shape = jnp.broadcast_shapes(source.shape[:-1], target.shape[:-1], () if weights is None else weights.shape)
    source, target = jnp.broadcast_to(source, (*shape, 3)), jnp.broadcast_to(target, (*shape, 3))
    weights = jnp.ones(shape, source.dtype) if weights is None else jnp.broadcast_to(weights, shape)
    total = jnp.maximum(jnp.sum(weights, axis=-1), 1e-30)
    x_mean = jnp.sum(weights[..., None] * source, axis=-2) / total[..., None]
    y_mean = jnp.sum(weights[..., None] * target, axis=-2) / total[..., None]
    xc, yc = source - x_mean[..., None, :], target - y_mean[..., None, :]
    cov = jnp.einsum("...n,...ni,...nj->...ij", weights, yc, xc) / total[..., None, None]
    u, sv, vt = jnp.linalg.svd(cov)
    # det(U V^T) in closed form: LAPACK's batched LU can deadlock inside loops on CPU (jaxlib 0.10).
    uv = u @ vt
    det = jnp.sum(uv[..., 0, :] * jnp.cross(uv[..., 1, :], uv[..., 2, :]), axis=-1)
    sign = jnp.where(det < 0, -1.0, 1.0).astype(source.dtype)
    fix = jnp.stack([jnp.ones_like(sign), jnp.ones_like(sign), sign], axis=-1)
    rot = (u * fix[..., None, :]) @ vt
    var_x = jnp.sum(weights * jnp.sum(xc**2, axis=-1), axis=-1) / total
    s = jnp.where(solve_scale, jnp.sum(sv * fix, axis=-1) / jnp.maximum(var_x, 1e-30), jnp.broadcast_to(scale, shape[:-1]))
    return rot, y_mean - s[..., None] * jnp.einsum("...ij,...j->...i", rot, x_mean), s


def blend_shapes(coeffs: jax.Array, directions: jax.Array) -> jax.Array:
    """(*, K) coefficients x (V, 3, K) directions -> (*, V, 3) offsets. K may be smaller than stored."""
    k = coeffs.shape[-1]
    return jnp.einsum("...k,vck->...vc", coeffs, directions[..., :k])


def pose_features(rotmats: jax.Array) -> jax.Array:
    """(*, 15, 3, 3) non-root joint rotations -> (*, 135) pose blend shape features R - I, row-major."""
    eye = jnp.broadcast_to(jnp.eye(3, dtype=rotmats.dtype), rotmats.shape)
    return (rotmats - eye).reshape(*rotmats.shape[:-3], -1)


def chain_levels(parents: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Group the joints of a kinematic tree by depth; each level only depends on the one before."""
    depth = []
    for j, p in enumerate(parents):
        if p >= j:
            raise ValueError(f"parents must list each joint after its parent, got {tuple(parents)}")
        depth.append(0 if p < 0 else depth[p] + 1)
    return tuple(
        tuple(j for j, d in enumerate(depth) if d == level) for level in range(max(depth) + 1)
    )


def _matmul3(a: jax.Array, b: jax.Array) -> jax.Array:
    """(*, 3, 3) @ (*, 3, 3) elementwise: XLA fuses it with its neighbours, where a batch of tiny
    `dot`s would each be a separate kernel call (they dominate the cost of posing one hand)."""
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def _matvec3(a: jax.Array, v: jax.Array) -> jax.Array:
    """(*, 3, 3) @ (*, 3) elementwise (see `_matmul3`)."""
    return jnp.sum(a * v[..., None, :], axis=-1)


def kinematic_chain(
    rotmats: jax.Array, joints: jax.Array, parents: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """Pose the joints: (*, J, 3, 3) local rotations, (*, J, 3) rest joints -> world (R, t).

    Returns `(R, posed_joints)`, each joint's world rotation (*, J, 3, 3) and world position (*, J, 3);
    a joint rotates about its own rest position, carried along by its ancestors. The root rotates about
    its rest position too. Joints are processed a tree level at a time, not one by one.
    """
    parents = tuple(parents)
    levels = chain_levels(parents)
    if len(levels[0]) != 1:
        raise ValueError(f"parents must describe a tree with one root, got {parents}")
    world_r = [rotmats[..., levels[0], :, :]]
    world_t = [joints[..., levels[0], :]]
    for above, level in zip(levels, levels[1:]):
        # Where each joint's parent sits in the level above; a plain slice when they line up.
        slot = [above.index(parents[j]) for j in level]
        parent_r, parent_t = world_r[-1], world_t[-1]
        if slot != list(range(len(above))):
            parent_r, parent_t = parent_r[..., slot, :, :], parent_t[..., slot, :]
        offset = joints[..., level, :] - joints[..., [parents[j] for j in level], :]
        world_r.append(_matmul3(parent_r, rotmats[..., level, :, :]))
        world_t.append(parent_t + _matvec3(parent_r, offset))
    order = [j for level in levels for j in level]
    if order == sorted(order):
        return jnp.concatenate(world_r, axis=-3), jnp.concatenate(world_t, axis=-2)
    back = [order.index(j) for j in range(len(parents))]
    return (
        jnp.concatenate(world_r, axis=-3)[..., back, :, :],
        jnp.concatenate(world_t, axis=-2)[..., back, :],
    )


def skinning_transforms(
    world_r: jax.Array, posed_joints: jax.Array, rest_joints: jax.Array
) -> jax.Array:
    """(*, J, 3, 4) transforms mapping rest-pose points to posed points for each joint."""
    t = posed_joints - _matvec3(world_r, rest_joints)
    return jnp.concatenate([world_r, t[..., None]], axis=-1)


def skin(vertices: jax.Array, weights: jax.Array, transforms: jax.Array) -> jax.Array:
    """Linear blend skinning: (*, V, 3) rest vertices, (V, J) weights, (*, J, 3, 4) -> (*, V, 3).

    Each hand's blended transforms are laid out (3, 4, V), vertex last: blending is then one matrix
    product (* 12, J) @ (J, V) and applying them is elementwise along contiguous vertex rows. With the
    vertex axis anywhere else XLA fuses a strided transpose into the skinning and runs 2-3x slower.
    """
    batch = jnp.broadcast_shapes(vertices.shape[:-2], transforms.shape[:-3])
    num_joints = transforms.shape[-3]
    transforms = jnp.broadcast_to(transforms, batch + transforms.shape[-3:])
    blended = jnp.einsum(
        "...jk,vj->...kv", transforms.reshape(*batch, num_joints, 12), weights
    ).reshape(*batch, 3, 4, -1)
    points = jnp.swapaxes(jnp.broadcast_to(vertices, batch + vertices.shape[-2:]), -1, -2)
    posed = (
        blended[..., 0, :] * points[..., None, 0, :]
        + blended[..., 1, :] * points[..., None, 1, :]
        + blended[..., 2, :] * points[..., None, 2, :]
        + blended[..., 3, :]
    )
    return jnp.swapaxes(posed, -1, -2)
