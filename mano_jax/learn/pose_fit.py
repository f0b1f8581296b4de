"""Per-registration pose: closed-form initialisation by per-part Procrustes, then Levenberg-Marquardt.

A registration shares the model's topology, so the fit is vertex-to-vertex with known correspondences:
51 unknowns (global rotation, 15 joint rotations, translation) against 3V residuals. All registrations
are fitted at once (`vmap`, in chunks), compiled once.

The residual is exact (pose blend shapes included); the Jacobian treats the pose blend shapes as constant
over one step. They are millimetres against centimetre lever arms, so the steps are nearly Gauss-Newton
ones, and leaving them out of the Jacobian makes a step three times cheaper, which is what makes
thousands of registrations affordable. Lengths are metres.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from .. import lbs
from ..model import ManoModel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Poses:
    """Poses of N registrations; leading axis N."""

    global_rot: jax.Array
    """(N, 3, 3) rotation of the wrist about the rest wrist joint."""
    hand_pose: jax.Array
    """(N, 45) axis-angle of joints 1..15 relative to their parents, radians (flat-hand convention)."""
    transl: jax.Array
    """(N, 3) translation added after the rotation, metres."""

    @property
    def global_orient(self) -> jax.Array:
        """(N, 3) the global rotation as axis-angle."""
        return lbs.matrix_to_axis_angle(self.global_rot)


def rest_joints(model: ManoModel, templates: jax.Array) -> jax.Array:
    """(*, 16, 3) rest joints of (*, V, 3) templates, by the model's joint regressor."""
    return jnp.einsum("jv,...vc->...jc", model.J_regressor, templates)


def skinning_transforms(model: ManoModel, joints, global_rot, hand_pose, transl) -> jax.Array:
    """(16, 3, 4) transforms taking rest-pose points of one hand with rest `joints` to its posed frame."""
    rot = jnp.concatenate(
        [global_rot[None], lbs.axis_angle_to_matrix(hand_pose.reshape(15, 3))], axis=0
    )
    world_r, posed = lbs.kinematic_chain(rot, joints, model.parents)
    return lbs.skinning_transforms(world_r, posed + transl[None], joints)


def correctives(model: ManoModel, hand_pose: jax.Array) -> jax.Array:
    """(*, V, 3) pose blend shape offsets of (*, 45) hand poses, metres."""
    rot = lbs.axis_angle_to_matrix(hand_pose.reshape(*hand_pose.shape[:-1], 15, 3))
    return lbs.blend_shapes(lbs.pose_features(rot), model.posedirs)


def pose_vertices(model: ManoModel, template, global_rot, hand_pose, transl) -> jax.Array:
    """(V, 3) one hand posed: `forward` of `model` with `template` as its v_template (no betas)."""
    t = skinning_transforms(model, rest_joints(model, template), global_rot, hand_pose, transl)
    return lbs.skin(template + correctives(model, hand_pose), model.weights, t)


def procrustes_init(model: ManoModel, template, target) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Closed-form pose of one registration: each part's world rotation by weighted Procrustes.

    Part k's vertices are weighted by their skinning weight to the fourth power, so the rigid core of the
    segment dominates and blended skin barely counts. Local rotations follow from the world ones along
    the kinematic tree. Returns (global_rot (3,3), hand_pose (45,), transl (3,)): a start for `fit_poses`
    that is good to a few degrees, whatever the global orientation.
    """
    world, trans, _ = lbs.procrustes(template, target, (model.weights**4).T)
    parents = jnp.asarray([max(p, 0) for p in model.parents])
    local = jnp.swapaxes(world[parents], -1, -2) @ world
    hand_pose = lbs.matrix_to_axis_angle(local[1:]).reshape(45)
    j0 = rest_joints(model, template)[0]
    # Global rotation is about J_0: R (x - j0) + j0 + transl = R x + trans.
    transl = trans[0] + world[0] @ j0 - j0
    return world[0], hand_pose, transl


def _descendants(parents) -> jax.Array:
    """(16, 16) D[k, j] = 1 if joint k is joint j or one of its descendants."""
    n = len(parents)
    d = [[0.0] * n for _ in range(n)]
    for k in range(n):
        j = k
        while j >= 0:
            d[k][j] = 1.0
            j = parents[j]
    return jnp.asarray(d)


def _skew(v):
    """(*, 3) -> (*, 3, 3) cross-product matrices [v]x."""
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    zero = jnp.zeros_like(x)
    return jnp.stack(
        [jnp.stack([zero, -z, y], -1), jnp.stack([z, zero, -x], -1), jnp.stack([-y, x, zero], -1)], -2
    )


def _normal_equations(model, template, joints, rot, pose, transl, target):
    """Gauss-Newton normal equations of one registration in world-frame rotation increments.

    Parameters: a rotation increment w_j (world frame, about the posed joint j) for each of the 16
    joints, applied to everything joint j carries, and a translation t. A vertex moves by
    dy_v = sum_j a_vj x w_j + t with a_vj = sum_{k below j} W_vk (y_vk - p_j), y_vk the vertex carried
    by joint k alone: the Jacobian is analytic, and J^T J needs one (48 x V)(V x 48) product instead
    of a (3V x 51) Jacobian. Arrays are laid out (joint, xyz, vertex) so that every step is a plain
    matrix product. Returns (H (51, 51), g (51,), world rotations of the parents (16, 3, 3)).
    """
    dtype = template.dtype
    v = template.shape[0]
    rotmats = jnp.concatenate([rot[None], lbs.axis_angle_to_matrix(pose.reshape(15, 3))], axis=0)
    world_r, posed = lbs.kinematic_chain(rotmats, joints, model.parents)
    posed = posed + transl[None]
    t = lbs.skinning_transforms(world_r, posed, joints)  # (16, 3, 4)
    x = template + correctives(model, pose)
    x_h = jnp.concatenate([x, jnp.ones((v, 1), dtype)], axis=1)
    carried = (t.reshape(48, 4) @ x_h.T).reshape(16, 3, v)
    w = model.weights.T  # (16, V)
    weighted = w[:, None, :] * carried
    residual = jnp.sum(weighted, axis=0) - target.T  # (3, V)
    below = _descendants(model.parents).astype(dtype).T  # [j, k] = 1 if k is j or below j
    a = (below @ weighted.reshape(16, 3 * v)).reshape(16, 3, v) - (below @ w)[:, None, :] * posed[
        :, :, None
    ]
    flat = a.reshape(48, v)
    s = (flat @ flat.T).reshape(16, 3, 16, 3)
    # (-[a_j]x)^T (-[a_l]x) = (a_j . a_l) I - a_l a_j^T, summed over vertices.
    eye = jnp.eye(3, dtype=dtype)
    trace = jnp.einsum("jclc->jl", s)
    h_rr = trace[:, None, :, None] * eye[None, :, None, :] - jnp.transpose(s, (0, 3, 2, 1))
    skew = _skew(jnp.sum(a, axis=2))  # (16, 3, 3): rows w_j, columns t
    h = jnp.zeros((51, 51), dtype)
    h = h.at[:48, :48].set(h_rr.reshape(48, 48))
    h = h.at[:48, 48:].set(skew.reshape(48, 3))
    h = h.at[48:, :48].set(skew.reshape(48, 3).T)
    h = h.at[48:, 48:].set(v * eye)
    torque = jnp.sum(jnp.cross(a, residual[None], axis=1), axis=2)  # sum_v a_vj x r_v
    g = jnp.concatenate([torque.reshape(48), jnp.sum(residual, axis=1)])
    parents = jnp.asarray([max(p, 0) for p in model.parents])
    parent_r = world_r[parents].at[0].set(eye)
    return h, g, parent_r


def _left_jacobians(pose):
    """(15, 3, 3) d vee(R(h + d) R(h)^T) / dd of each joint: how an axis-angle step turns the joint."""

    def one(h):
        r = lbs.axis_angle_to_matrix(h)
        dr = jax.jacfwd(lbs.axis_angle_to_matrix)(h)  # (3, 3, 3): d R / d h_i in the last axis
        m = jnp.einsum("abi,cb->iac", dr, r)  # dR_i R^T, antisymmetric
        return jnp.stack([m[:, 2, 1], m[:, 0, 2], m[:, 1, 0]], axis=-1).T

    return jax.vmap(one)(pose.reshape(15, 3))


def _lm_fit(model, template, target, global_rot, hand_pose, transl, basis, iterations):
    """Levenberg-Marquardt on one registration from a start.

    `basis` None: every joint rotation is free (steps are world-frame rotation increments, composed
    onto the rotation matrices, so no axis-angle singularity is met). `basis` (K, 45): hand-pose steps
    are combinations of its rows, added in axis-angle (the chain rule maps the world-frame normal
    equations onto them).
    """
    joints = rest_joints(model, template)
    dtype = template.dtype
    n = 51 if basis is None else 6 + basis.shape[0]

    def cost(state):
        r = pose_vertices(model, template, *state) - target
        return jnp.sum(r**2)

    def step(_, carry):
        state, lam, current = carry
        rot0, pose0, transl0 = state
        h, g, parent_r = _normal_equations(model, template, joints, rot0, pose0, transl0, target)
        if basis is not None:
            # world increment of joint j = R_parent(j) J_l(h_j) (B^T c)_j
            per_joint = jnp.einsum("jab,jbc->jac", parent_r[1:], _left_jacobians(pose0))
            m_hand = jnp.einsum("jac,kjc->jak", per_joint, basis.reshape(-1, 15, 3)).reshape(45, -1)
            m = jax.scipy.linalg.block_diag(jnp.eye(3, dtype=dtype), m_hand, jnp.eye(3, dtype=dtype))
            h, g = m.T @ h @ m, m.T @ g
        damped = h + lam * jnp.diag(jnp.diag(h)) + 1e-12 * jnp.eye(n, dtype=dtype)
        delta = -jnp.linalg.solve(damped, g)
        rot = lbs.axis_angle_to_matrix(delta[:3]) @ rot0
        if basis is None:
            local = jnp.einsum("jba,jb->ja", parent_r[1:], delta[3:48].reshape(15, 3))
            turned = lbs.axis_angle_to_matrix(local) @ lbs.axis_angle_to_matrix(pose0.reshape(15, 3))
            pose = lbs.matrix_to_axis_angle(turned).reshape(45)
        else:
            pose = pose0 + delta[3:-3] @ basis
        trial = (rot, pose, transl0 + delta[-3:])
        trial_cost = cost(trial)
        better = trial_cost < current
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), trial, state)
        lam = jnp.where(better, lam * 0.3, lam * 4.0)
        return state, lam, jnp.where(better, trial_cost, current)

    state = (global_rot, hand_pose, transl)
    lam = jnp.asarray(1e-3, dtype)
    state, _, final = jax.lax.fori_loop(0, iterations, step, (state, lam, cost(state)))
    return state, jnp.sqrt(final / target.shape[0])


# `iterations` and `init` are traced, not static: every call with the same sizes shares one compiled
# program (compiling dominates the cost of small problems).
@partial(jax.jit, static_argnames=("chunk_size",))
def _fit_all(model, templates, hand_index, targets, start, basis, iterations, chunk_size, init):
    def one(args):
        target, h, rot, pose, transl = args
        template = templates[h]
        rot, pose, transl = jax.lax.cond(
            init, lambda: procrustes_init(model, template, target), lambda: (rot, pose, transl)
        )
        (rot, pose, transl), rms = _lm_fit(model, template, target, rot, pose, transl, basis, iterations)
        return Poses(rot, pose, transl), rms

    xs = (targets, hand_index, start.global_rot, start.hand_pose, start.transl)
    return jax.lax.map(one, xs, batch_size=chunk_size)


def fit_poses(
    model: ManoModel,
    templates,
    hand_index,
    targets,
    start: Poses | None = None,
    *,
    iterations: int = 5,
    basis=None,
    chunk_size: int = 32,
) -> tuple[Poses, jax.Array]:
    """Fit each registration's pose to its hand's template under `model` (weights, regressor, posedirs).

    Args:
      model: the current model; its `v_template` is ignored, `templates[hand_index[n]]` poses hand n.
      templates: (H, V, 3) rest templates of the hands, metres.
      hand_index: (N,) which template each registration uses.
      targets: (N, V, 3) registrations, metres (right hands).
      start: poses to start from (the previous iteration's); None: per-part Procrustes.
      iterations: Levenberg-Marquardt iterations (each is one Jacobian and one trial evaluation).
      basis: (K, 45) hand-pose steps are combinations of these rows (e.g. a PCA basis, with `start`
        holding its mean); default all 45 directions.
      chunk_size: registrations per vectorised batch (memory ~ chunk_size * V * 51 * 3 floats).

    Returns:
      (poses, rms): fitted `Poses` and (N,) root-mean-square vertex error, metres.
    """
    dtype = model.v_template.dtype
    templates = jnp.asarray(templates, dtype)
    targets = jnp.asarray(targets, dtype)
    n = targets.shape[0]
    init = start is None
    if init:
        start = Poses(
            jnp.broadcast_to(jnp.eye(3, dtype=dtype), (n, 3, 3)),
            jnp.zeros((n, 45), dtype),
            jnp.zeros((n, 3), dtype),
        )
    basis = None if basis is None else jnp.asarray(basis, dtype)
    return _fit_all(
        model, templates, jnp.asarray(hand_index, jnp.int32), targets, start, basis, jnp.asarray(iterations),
        chunk_size=min(chunk_size, n), init=jnp.asarray(init),
    )  # fmt: skip
