"""Per-hand templates: registrations unposed into the rest frame, and their (weighted) averages.

Unposing inverts linear blend skinning vertex by vertex, as SMPL does: with the pose fitted, a vertex's
blended transform is known, so the rest-frame position that it maps onto the registration follows by one
3x3 solve. Unposed registrations minus the pose correctives are the template observed once per pose.
Lengths are metres.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .. import lbs
from ..model import ManoModel
from .pose_fit import Poses, procrustes_init, rest_joints, skinning_transforms


def _solve3(a, b):
    """x with a x = b for (*, 3, 3) a and (*, 3) b, and det(a), by cofactors.

    Not `jnp.linalg.solve`: jaxlib 0.10's batched LAPACK LU deadlocks on CPU when it runs inside a loop
    (here `lax.map`) on a large batch, and the closed form is cheaper for 3 x 3 anyway.
    """
    r0, r1, r2 = a[..., 0, :], a[..., 1, :], a[..., 2, :]
    c0, c1, c2 = jnp.cross(r1, r2), jnp.cross(r2, r0), jnp.cross(r0, r1)
    det = jnp.sum(r0 * c0, axis=-1)
    x = b[..., 0:1] * c0 + b[..., 1:2] * c1 + b[..., 2:3] * c2
    return x / det[..., None], det


def _inverse_skin(model, template, rot, pose, transl, points):
    """(V, 3) rest-frame points that `template`'s skinning under the pose maps onto (V, 3) `points`, and
    (V,) the determinants of the blended rotations."""
    t = skinning_transforms(model, rest_joints(model, template), rot, pose, transl)
    blended = jnp.einsum("vj,jab->vab", model.weights, t)
    return _solve3(blended[..., :3], points - blended[..., 3])


@partial(jax.jit, static_argnames=("chunk_size",))
def _unpose(model, templates, hand_index, poses, targets, chunk_size):
    def one(args):
        target, h, rot, pose, transl = args
        return _inverse_skin(model, templates[h], rot, pose, transl, target)

    xs = (targets, hand_index, poses.global_rot, poses.hand_pose, poses.transl)
    return jax.lax.map(one, xs, batch_size=chunk_size)


def unpose(model: ManoModel, templates, hand_index, poses: Poses, targets, *, chunk_size: int = 64):
    """Registrations carried back to the rest pose by inverse skinning.

    The skinning of registration n uses the rest joints of its hand's template (`templates[hand_index]`,
    through the model's joint regressor). Returns (rest (N, V, 3), det (N, V)): the rest-frame
    vertices, which still contain the pose correctives, and the determinant of each vertex's blended
    rotation. LBS collapses skin where neighbouring joints turn far apart (det -> 0, the "candy
    wrapper"); there the inverse is unreliable and callers should not trust the vertex.
    """
    dtype = model.v_template.dtype
    targets = jnp.asarray(targets, dtype)
    return _unpose(
        model, jnp.asarray(templates, dtype), jnp.asarray(hand_index, jnp.int32), poses, targets,
        chunk_size=min(chunk_size, targets.shape[0]),
    )  # fmt: skip


def flat_pose_weights(hand_pose, sigma: float) -> jax.Array:
    """(N,) weight of each registration in the first template estimate: exp(-(a / sigma)^2 / 2).

    a is the root-mean-square joint angle of the hand pose (radians), 0 for the flat hand. The
    correctives between the flat pose and a registration's pose grow with a; before any correctives are
    learned, they would end up in the template. Favouring near-flat registrations keeps them out (the
    mean-pose care of MANO), at the price of averaging fewer registrations.
    """
    angles_sq = jnp.sum(jnp.reshape(hand_pose, (-1, 15, 3)) ** 2, axis=-1)
    return jnp.exp(-0.5 * jnp.mean(angles_sq, axis=-1) / sigma**2)


def project_to_shape_space(templates, v_template, shapedirs) -> jax.Array:
    """(H, V, 3) the closest templates v_template + shapedirs . betas (least squares over betas)."""
    templates = jnp.asarray(templates)
    basis = jnp.asarray(shapedirs).reshape(-1, shapedirs.shape[-1])
    offsets = (templates - v_template[None]).reshape(templates.shape[0], -1)
    betas = jnp.linalg.lstsq(basis, offsets.T)[0]
    return v_template[None] + (basis @ betas).T.reshape(templates.shape)


def average_templates(rest, hand_index, num_hands: int, weights=None) -> jax.Array:
    """(H, V, 3) weighted mean of (N, V, 3) rest-frame registrations (correctives removed) per hand."""
    rest = jnp.asarray(rest)
    w = jnp.ones(rest.shape[0], rest.dtype) if weights is None else jnp.asarray(weights, rest.dtype)
    hand_index = jnp.asarray(hand_index)
    total = jax.ops.segment_sum(w, hand_index, num_hands)
    summed = jax.ops.segment_sum(w[:, None, None] * rest, hand_index, num_hands)
    return summed / total[:, None, None]


@partial(jax.jit, static_argnames=("max_rounds",))
def _normalise(model, templates, reference, tolerance, max_rounds):
    def turn_back(template):
        return _inverse_skin(model, template, *procrustes_init(model, reference, template), template)[0]

    def one(template):
        def more(state):
            _, change, rounds = state
            return (change > tolerance) & (rounds < max_rounds)

        def step(state):
            template, _, rounds = state
            turned = turn_back(template)
            return turned, jnp.max(jnp.abs(turned - template)), rounds + 1

        start = (template, jnp.asarray(jnp.inf, template.dtype), jnp.asarray(0))
        return jax.lax.while_loop(more, step, start)[0]

    return jax.vmap(one)(templates)


def normalise_templates(model: ManoModel, templates, reference, *, tolerance: float = 1e-9,
                        max_rounds: int = 20) -> jax.Array:  # fmt: skip
    """(H, V, 3) templates turned into the rest pose of `reference` (V, 3), part by part.

    Templates, poses and pose blend shapes can trade a rotation of a segment for one another (the
    data are explained as well either way), so the templates must be pinned to a rest pose: each
    part's rotation relative to `reference` (per-part Procrustes, as in `pose_fit.procrustes_init`,
    which also finds the global rotation and translation) is undone by inverse skinning. What is left
    is the hand's shape in the reference's rest pose -- the "pose-normalised" template.

    One round is not enough: inverse skinning blends each vertex's transform over several parts, so
    a part is turned back by less than its Procrustes rotation where its skin is shared (measured on
    the thumb of hands drawn from the planted shape space: a second round still moved them by a fifth
    of the first). Rounds repeat until no vertex moves by more than `tolerance` (metres) or
    `max_rounds` is reached (the change shrinks about five-fold per round), so the result is the fixed
    point, where every part's Procrustes rotation is the identity: normalising twice changes nothing,
    and the rest pose no longer depends on how many times (or from where) a template was normalised.
    """
    dtype = model.v_template.dtype
    return _normalise(model, jnp.asarray(templates, dtype), jnp.asarray(reference, dtype),
                      jnp.asarray(tolerance, dtype), max_rounds=max_rounds)  # fmt: skip
