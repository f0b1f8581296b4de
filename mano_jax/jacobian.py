"""The exact Jacobian of the posed vertices with respect to all parameters, in closed form.

`jax.jacfwd(forward)` pushes 61 dense tangents through every product of the model, although a joint's
rotation touches only its own 9 pose-blend-shape features and only the vertices skinned to its subtree.
Written out, the Jacobian needs about 15 times fewer operations:

- Turning joint k by d(theta_k) moves every point skinned to k's subtree about the posed joint c_k with
  world angular velocity w = R_k^world Jr(theta_k) d(theta_k) (Jr: the right Jacobian of SO(3)), so
  dv_i = w x (S_ki - s_ki c_k), where S_ki sums the points' per-joint transforms over the subtree,
  weighted by skinning weights, and s_ki the weights alone.
- It also changes joint k's pose blend shape features (R_k - I) by R_k [Jr d(theta_k)]x, which the blended
  rotation B_i = sum_j w_ij R_j^world carries to the posed vertex.
- betas move the rest vertices (shapedirs) and the joints (J_regressor @ shapedirs), hence the
  translations of the skinning transforms; transl moves everything by itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import lbs
from .model import ManoModel
from .posing import _as_array, _lead


def _right_jacobian(axis_angle: jax.Array) -> jax.Array:
    """(*, 3) -> (*, 3, 3) right Jacobian of SO(3): R(a + da) = R(a) exp([Jr(a) da]x) to first order.

    Jr = I - b K + c K^2 with K = [a]x, b = (1 - cos t)/t^2, c = (t - sin t)/t^3 (Taylor series near 0).
    """
    theta_sq = jnp.sum(axis_angle**2, axis=-1)
    small = theta_sq < lbs._SMALL_ANGLE_SQ
    safe = jnp.where(small, 1.0, theta_sq)
    theta = jnp.sqrt(safe)
    b = jnp.where(small, 0.5 - theta_sq / 24.0, (1.0 - jnp.cos(theta)) / safe)
    c = jnp.where(small, 1.0 / 6.0 - theta_sq / 120.0, (theta - jnp.sin(theta)) / (safe * theta))
    x, y, z = axis_angle[..., 0], axis_angle[..., 1], axis_angle[..., 2]
    zero = jnp.zeros_like(x)
    k = jnp.stack(
        [jnp.stack([zero, -z, y], -1), jnp.stack([z, zero, -x], -1), jnp.stack([-y, x, zero], -1)], -2
    )
    eye = jnp.broadcast_to(jnp.eye(3, dtype=axis_angle.dtype), k.shape)
    return eye - b[..., None, None] * k + c[..., None, None] * (k @ k)


def _subtree_sums(values: jax.Array, parents) -> jax.Array:
    """(J, ...) per-joint values -> (J, ...) sums over each joint's subtree (itself and descendants)."""
    sums = [values[j] for j in range(len(parents))]
    for j in reversed(range(1, len(parents))):
        sums[parents[j]] = sums[parents[j]] + sums[j]
    return jnp.stack(sums)


def _one_hand(model: ManoModel, pose: jax.Array, betas: jax.Array, transl: jax.Array):
    """(16, 3) axis-angle, (S,) betas, (3,) transl -> vertices (V, 3), Jacobian (V, 3, 48 + S + 3)."""
    num_vertices = model.num_vertices
    rot = lbs.axis_angle_to_matrix(pose)
    joint_dirs = jnp.einsum("jv,vcs->jcs", model.J_regressor, model.shapedirs)
    rest_joints = model.J_regressor @ model.v_template + joint_dirs @ betas
    v_posed = (
        model.v_template
        + model.shapedirs @ betas
        + model.posedirs @ lbs.pose_features(rot[1:]).reshape(-1)
    )
    world_r, posed = lbs.kinematic_chain(rot, rest_joints, model.parents)
    posed = posed + transl[None, :]
    transforms = lbs.skinning_transforms(world_r, posed, rest_joints)  # (16, 3, 4)

    # Each vertex transformed by each joint, weighted: (16, V, 3); summed over subtrees.
    per_joint = jnp.einsum("jab,vb->jva", transforms[..., :3], v_posed) + transforms[:, None, :, 3]
    weighted = model.weights.T[:, :, None] * per_joint
    vertices = jnp.sum(weighted, axis=0)
    subtree_points = _subtree_sums(weighted, model.parents)  # (16, V, 3)
    subtree_weights = _subtree_sums(model.weights.T, model.parents)  # (16, V)
    lever = subtree_points - subtree_weights[:, :, None] * posed[:, None, :]

    jr = _right_jacobian(pose)  # (16, 3, 3)
    omega = world_r @ jr  # (16, 3, 3): column a = world angular velocity of d(theta_k)_a
    # w x l for the three columns of w: (16, V, 3 coords, 3 axes).
    d_skin = jnp.cross(
        jnp.swapaxes(omega, -1, -2)[:, None, :, :], lever[:, :, None, :], axisa=-1, axisb=-1
    )
    d_skin = jnp.swapaxes(d_skin, -1, -2)

    # Pose blend shapes: d(R_k - I) = R_k [Jr_k e_a]x for joints 1..15.
    e = jnp.eye(3, dtype=pose.dtype)
    u = jnp.swapaxes(jr[1:], -1, -2)  # (15, 3 axes, 3): u[k, a] = Jr_k e_a
    # Column b of [u]x is u x e_b; stack the columns, then transpose into a matrix.
    skew_u = jnp.swapaxes(jnp.cross(u[:, :, None, :], e[None, None, :, :]), -1, -2)
    d_rot = rot[1:, None] @ skew_u  # (15, 3 axes, 3, 3)
    d_feat = d_rot.reshape(15, 3, 9)
    posedirs = model.posedirs.reshape(num_vertices, 3, 15, 9)
    d_posed = jnp.einsum("vckf,kaf->vcka", posedirs, d_feat)  # (V, 3, 15, 3)
    blended_r = jnp.einsum("vj,jab->vab", model.weights, world_r)  # (V, 3, 3)
    d_blend = jnp.einsum("vcb,vbka->vcka", blended_r, d_posed)

    pose_cols = jnp.concatenate(
        [d_skin[0][:, :, None, :], d_skin[1:].transpose(1, 2, 0, 3) + d_blend], axis=2
    ).reshape(num_vertices, 3, 48)

    # betas: the joints' posed positions and transform translations move with the rest joints.
    d_posed_joints = [joint_dirs[0]]
    for j in range(1, len(model.parents)):
        p = model.parents[j]
        d_posed_joints.append(d_posed_joints[p] + world_r[p] @ (joint_dirs[j] - joint_dirs[p]))
    d_trans = jnp.stack(d_posed_joints) - world_r @ joint_dirs  # (16, 3, S)
    shape_cols = jnp.einsum("vab,vbs->vas", blended_r, model.shapedirs) + jnp.einsum(
        "vj,jas->vas", model.weights, d_trans
    )
    transl_cols = jnp.broadcast_to(e, (num_vertices, 3, 3))
    return vertices, jnp.concatenate([pose_cols, shape_cols, transl_cols], axis=-1)


@jax.jit
def vertex_jacobian(model: ManoModel, *, hand_pose, betas=None, global_orient=None, transl=None):
    """Posed vertices and their exact Jacobian with respect to every parameter, in closed form.

    Inputs as `forward` with `pose_space="axis_angle"` and `flat_hand_mean=True`: hand_pose (*, 45),
    betas (*, S') (the Jacobian covers the model's S components; missing betas are zero),
    global_orient (*, 3), transl (*, 3), metres and radians.

    Returns `(vertices, jacobian)`: (*, V, 3) and (*, V, 3, 3 + 45 + S + 3), the parameters ordered
    global_orient, hand_pose, betas, transl (61 columns for MANO). Equal to `jax.jacfwd` of `forward`
    to rounding, and an order of magnitude faster. For PCA poses chain it with the basis:
    d/d(coeffs) = d/d(hand_pose) @ hands_components[:K].T.
    """
    dtype = model.v_template.dtype
    hand_pose = _as_array("hand_pose", hand_pose, dtype, (45,))
    global_orient = jnp.zeros(3, dtype) if global_orient is None else global_orient
    global_orient = _as_array("global_orient", global_orient, dtype, (3,))
    transl = _as_array("transl", jnp.zeros(3, dtype) if transl is None else transl, dtype, (3,))
    num_betas = model.num_betas
    betas = jnp.zeros(num_betas, dtype) if betas is None else jnp.asarray(betas, dtype)
    if betas.ndim == 0 or not 1 <= betas.shape[-1] <= num_betas:
        raise ValueError(f"betas: expected shape (*, S) with 1 <= S <= {num_betas}, got {betas.shape}")
    betas = jnp.concatenate(
        [betas, jnp.zeros(betas.shape[:-1] + (num_betas - betas.shape[-1],), dtype)], axis=-1
    )
    batch = jnp.broadcast_shapes(
        hand_pose.shape[:-1], global_orient.shape[:-1], betas.shape[:-1], transl.shape[:-1]
    )
    pose = jnp.concatenate([_lead(global_orient, batch, 1), _lead(hand_pose, batch, 1)], axis=-1)
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    one = functools.partial(_one_hand, model)
    vertices, jac = jax.lax.map(
        lambda args: one(args[0].reshape(16, 3), args[1], args[2]),
        (flat(pose), flat(_lead(betas, batch, 1)), flat(_lead(transl, batch, 1))),
        batch_size=4,
    )
    return vertices.reshape(*batch, *vertices.shape[1:]), jac.reshape(*batch, *jac.shape[1:])
