"""Optional refinement of the skinning weights and the joint regressor (`LearnConfig.refine_weights`,
`LearnConfig.refine_regressor`).

Why a plain alternation does not work. A weight moved from a joint's parent to the joint changes a
vertex, in its parent's frame, by delta (R_j - I)(x_v - J_j): linear in joint j's pose features, i.e. a
pose corrective of joint j. A rest joint moved by d changes the vertices it carries by -w (R_j - I) d,
again a corrective. Pose blend shapes are free near their joint (the locality cost is zero there), so
when the correctives are solved with the weights and joints held, they absorb the weight and joint
errors, and a weight or joint step taken afterwards, with those correctives held, finds nothing left
to explain (measured before this design: weights 0.19 -> 0.29 L1 error, joints 3.3 -> 3.1 mm). The
two are told apart only by what the correctives cannot do: reach beyond their locality radius, and
follow the rotation of the blended frame (the two effects agree to first order only). So:

Skinning weights (`refine_weights`): solved jointly with the pose blend shapes. In the rest frame of
the current blended transforms, a registration's vertex v changes with the weights by H_nv dw (H's
column k: the vertex as carried by joint k alone minus the current prediction, turned back by the
blended transform) and with the pose blend shapes by dP_v f_n; the hand's template is eliminated by
centring per hand, as in `blendshapes.solve_posedirs`. The correctives' best response to a weight
change (with the same locality cost and ridge) is eliminated in closed form (a Schur complement,
135 x 135 per vertex, batched), which leaves a 16 x 16 quadratic in the weights per vertex that
charges a weight change only for what the correctives cannot take over. The weights minimise it plus
lambda_v |w_v - w_v^start|^2 with w_v >= 0, sum w_v = 1 and w_vj = 0 outside the support (the joints
with a nonzero starting weight and their parents and children), by accelerated projected gradient;
the correctives are then re-solved with the new weights.

Joint regressor (`refine_regressor`): as in SMPL, per-hand rest joints are solved together with the
hand's template (given the rotations, correctives and weights, a posed vertex is linear in both: the
template enters through the blended rotation, the joints through the chain's translations), the
template eliminated per vertex (3 x 3), 48 unknowns per hand, with a small ridge to the currently
regressed joints for the directions no rotation reveals (along a hinge axis). The regressor rows are
then fitted to map the templates to these joints: R_j >= 0, sum R_j = 1, support that of the starting
row (sparse), ridge to the starting row, by the same projected gradient.

Measured (synthetic registrations made with the open hand's weights and regressor, learning from them
perturbed): given the true poses and templates (tests, 6 hands, 0.1 mm noise), one solve takes the weights
from 0.186 to 0.084 (mean L1 per row; the rest is what the correctives can take over) and the joints from
2.7 to 0.2 mm. Inside `learn` (`bench/learning.py --refine --quick`: 8 iterations, 0.5 mm noise, 8 hands)
the weights go 0.194 -> 0.158 and the joints 3.3 -> 1.7 mm, each with the held-out error halved; only part
of the way, most likely because the poses are fitted about the current joints and partly make up for them.
Refining the weights alone with a wrong regressor makes them
absorb the joint errors (0.194 -> 0.249, same data, both perturbed).

Lengths are metres.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .. import lbs
from ..model import ManoModel
from .blendshapes import pose_features
from .pose_fit import Poses, correctives, rest_joints, skinning_transforms
from .templates import _solve3


def project_simplex(y, support):
    """Euclidean projection of each row of (*, K) `y` onto {x >= 0, sum x = 1, x = 0 off `support`}.

    The sort-based algorithm (Held et al. 1974): x = max(y - tau, 0) with tau from the sorted entries.
    Entries off the support are pushed far below every candidate tau, so they come out exactly 0.
    """
    y = jnp.where(support, y, -1e30)
    s = jnp.flip(jnp.sort(y, axis=-1), axis=-1)
    cum = jnp.cumsum(jnp.where(s > -1e29, s, 0.0), axis=-1)
    k = jnp.broadcast_to(jnp.arange(1, y.shape[-1] + 1, dtype=y.dtype), y.shape)
    active = (s - (cum - 1.0) / k > 0) & (s > -1e29)
    count = jnp.maximum(jnp.sum(active, axis=-1, keepdims=True), 1)
    tau = (jnp.take_along_axis(cum, count - 1, axis=-1) - 1.0) / count
    return jnp.maximum(y - tau, 0.0)


def _largest_eigenvalue(matrix, support, iterations: int = 30):
    """(*,) largest eigenvalue of each symmetric PSD (*, K, K) `matrix` restricted to `support`, by
    power iteration (a bound on the gradient's Lipschitz constant, without LAPACK)."""
    mask = support.astype(matrix.dtype)
    x = mask / jnp.sqrt(jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0))

    def step(x, _):
        y = mask * jnp.einsum("...ab,...b->...a", matrix, x)
        return y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-300), None

    x, _ = jax.lax.scan(step, x, None, length=iterations)
    # Power iteration approaches from below: a margin keeps the step stable.
    return 1.1 * jnp.sum(x * jnp.einsum("...ab,...b->...a", matrix, x), axis=-1)


@partial(jax.jit, static_argnames=("iterations",))
def solve_simplex_qp(gram, rhs, start, support, ridge, iterations: int = 300):
    """Rows x minimising x^T G x - 2 b^T x + ridge |x - start|^2 on the support-restricted simplex.

    gram (*, K, K) symmetric PSD, rhs (*, K), start (*, K) on the simplex, support (*, K) bool,
    ridge (*,) >= 0. FISTA with a fixed number of iterations and step 1 / L from power iteration.
    """
    lipschitz = 2.0 * (_largest_eigenvalue(gram, support) + ridge)
    step = 1.0 / jnp.maximum(lipschitz, 1e-300)[..., None]
    x0 = project_simplex(start, support)

    def body(carry, _):
        x, y, t = carry
        grad = 2.0 * (jnp.einsum("...ab,...b->...a", gram, y) - rhs + ridge[..., None] * (y - start))
        x_new = project_simplex(y - step * grad, support)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        y_new = x_new + ((t - 1.0) / t_new) * (x_new - x)
        return (x_new, y_new, t_new), None

    (x, _, _), _ = jax.lax.scan(body, (x0, x0, jnp.asarray(1.0, start.dtype)), None, length=iterations)
    return x


def weight_support(weights, parents) -> np.ndarray:
    """(V, J) bool: joints with a nonzero weight at the vertex, and their parents and children."""
    nonzero = np.asarray(weights) > 0
    near = np.eye(len(parents), dtype=bool)
    for j, p in enumerate(parents):
        if p >= 0:
            near[j, p] = near[p, j] = True
    return (nonzero.astype(np.int32) @ near.astype(np.int32)) > 0


def _chunked(arrays, chunk_size):
    """Arrays with a leading axis N padded to a multiple of `chunk_size` and split into chunks."""
    n = arrays[0].shape[0]
    pad = (-n) % chunk_size

    def one(a):
        return jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]).reshape(-1, chunk_size, *a.shape[1:])

    return tuple(one(a) for a in arrays)


@partial(jax.jit, static_argnames=("chunk_size", "num_hands"))
def _weight_statistics(model, templates, hand_index, poses, targets, keep, chunk_size, num_hands):
    """Sums over registrations of the rest-frame weight effects H (V, 3, J), residuals r (V, 3) and
    features f (135), uncentred, plus their per-hand sums (for centring)."""
    v, j = model.weights.shape
    dtype = targets.dtype

    def one(target, h, rot, pose, transl, k):
        template = templates[h]
        t = skinning_transforms(model, rest_joints(model, template), rot, pose, transl)
        carried = jnp.einsum("jab,vb->vja", t[..., :3], template + correctives(model, pose)) + t[None, :, :, 3]
        blended = jnp.einsum("vj,jab->vab", model.weights, t)
        current = jnp.einsum("vj,vja->va", model.weights, carried)
        # On the simplex only differences between joints matter: columns relative to the prediction.
        effect, det = _solve3(blended[:, None, :, :3], carried - current[:, None])
        residual, _ = _solve3(blended[..., :3], target - current)
        # Collapsed skin (see `templates.unpose`), outliers and padding carry no information (`where`,
        # not a product: padding has singular transforms, whose inverse is not finite).
        trust = ((k > 0) & (det[:, 0] > 0.25))[:, None]
        return jnp.where(trust[..., None], jnp.swapaxes(effect, 1, 2), 0.0), jnp.where(trust, residual, 0.0)

    def body(acc, xs):
        target, h, rot, pose, transl, k, f = xs
        effect, residual = jax.vmap(one)(target, h, rot, pose, transl, k)  # (C, V, 3, J), (C, V, 3)
        f = f * k[:, None]
        return (
            acc[0] + jnp.einsum("nf,nvck->vcfk", f, effect),
            acc[1] + jnp.einsum("nvck,nvcl->vkl", effect, effect),
            acc[2] + jnp.einsum("nvck,nvc->vk", effect, residual),
            acc[3] + jnp.einsum("nf,nvc->vcf", f, residual),
            acc[4] + jax.ops.segment_sum(effect, h, num_hands),
            acc[5] + jax.ops.segment_sum(residual, h, num_hands),
        ), None

    features = pose_features(poses.hand_pose)
    xs = _chunked((targets, hand_index, poses.global_rot, poses.hand_pose, poses.transl, keep.astype(dtype),
                   features), chunk_size)  # fmt: skip
    zeros = (jnp.zeros((v, 3, 135, j), dtype), jnp.zeros((v, j, j), dtype), jnp.zeros((v, j), dtype),
             jnp.zeros((v, 3, 135), dtype), jnp.zeros((num_hands, v, 3, j), dtype),
             jnp.zeros((num_hands, v, 3), dtype))  # fmt: skip
    sums, _ = jax.lax.scan(body, zeros, xs)
    return sums


def refine_weights(model: ManoModel, templates, hand_index, poses: Poses, targets, keep, start_weights,
                   support, cost=None, *, ridge: float, posedirs_ridge: float = 1e-4, respond: bool = True,
                   iterations: int = 300, chunk_size: int = 32) -> jax.Array:  # fmt: skip
    """(V, J) skinning weights solved jointly with the pose blend shapes (see the module docstring).

    Args:
      model: the current model (weights, regressor, pose blend shapes P, the expansion point).
      templates: (H, V, 3) per-hand templates, metres; hand_index (N,); poses: fitted `Poses`;
        targets: (N, V, 3) registrations, metres (right hands).
      keep: (N,) bool, registrations to use (outliers left out).
      start_weights: (V, J) the weights the ridge pulls towards; support: (V, J) bool (`weight_support`).
      cost: (15, V) the locality cost (None: none) and posedirs_ridge the ridge of the correctives'
        solve (`blendshapes.solve_posedirs`): the correctives may take over what they would take over
        there. respond=False: the correctives are held (not learned), and the weights explain it all.
      ridge: lambda_v = ridge x the vertex's mean curvature per supported joint.

    Returns (V, J) weights: non-negative, rows summing to 1, zero off the support.
    """
    dtype = model.v_template.dtype
    targets = jnp.asarray(targets, dtype)
    hand_index = jnp.asarray(hand_index, jnp.int32)
    keep = jnp.asarray(keep)
    num_hands = int(np.asarray(templates).shape[0])
    v = model.num_vertices
    fh, hh, hr, fr, h_hand, r_hand = _weight_statistics(
        model, jnp.asarray(templates, dtype), hand_index, poses, targets, keep,
        chunk_size=min(chunk_size, targets.shape[0]), num_hands=num_hands,
    )  # fmt: skip
    features = pose_features(poses.hand_pose) * keep[:, None].astype(dtype)
    count = jax.ops.segment_sum(keep.astype(dtype), hand_index, num_hands)
    n = jnp.sum(count)
    safe = jnp.maximum(count, 1.0)
    f_hand = jax.ops.segment_sum(features, hand_index, num_hands)
    # Centring per hand (the template is free): sum (a - a_h)(b - b_h) = sum ab - sum_h a_h b_h / n_h.
    fh = (fh - jnp.einsum("hf,hvck->vcfk", f_hand / safe[:, None], h_hand)) / n
    hh = (hh - jnp.einsum("hvck,hvcl->vkl", h_hand / safe[:, None, None, None], h_hand)) / n
    hr = (hr - jnp.einsum("hvck,hvc->vk", h_hand / safe[:, None, None, None], r_hand)) / n
    fr = (fr - jnp.einsum("hf,hvc->vcf", f_hand / safe[:, None], r_hand)) / n
    if not respond:
        return _weights_qp(hh, hr, model.weights, start_weights, support, ridge, iterations)
    fc = features - (f_hand / safe[:, None])[hand_index] * keep[:, None].astype(dtype)
    gram = fc.T @ fc / n
    cost = jnp.zeros((15, v), dtype) if cost is None else jnp.asarray(cost, dtype)
    diag = jnp.repeat(cost.T, 9, axis=1) + posedirs_ridge  # (V, 135), as in `solve_posedirs`
    # The correctives' response: (gram + diag) dP_c = fr_c - diag P_c - fh_c dw, per vertex and coordinate.
    z = fr - diag[:, None, :] * model.posedirs  # (V, 3, 135)
    rhs = jnp.concatenate([fh, z[..., None]], axis=-1)  # (V, 3, 135, J + 1)
    rhs = jnp.transpose(rhs, (0, 2, 1, 3)).reshape(v, 135, -1)
    eye = jnp.eye(135, dtype=dtype)
    # One batched solve outside any loop (inside `lax.map`/`scan` jaxlib 0.10's batched LU deadlocks).
    y = jnp.linalg.solve(gram[None] + diag[:, :, None] * eye[None], rhs).reshape(v, 135, 3, -1)
    y = jnp.transpose(y, (0, 2, 1, 3))  # (V, 3, 135, J + 1)
    schur = hh - jnp.einsum("vcfk,vcfl->vkl", fh, y[..., :-1])
    linear = hr - jnp.einsum("vcfk,vcf->vk", fh, y[..., -1])
    return _weights_qp(schur, linear, model.weights, start_weights, support, ridge, iterations)


def _weights_qp(gram, linear, current, start, support, ridge, iterations):
    """The weights minimising dw^T gram dw - 2 linear^T dw (dw = w - current) + lambda_v |w - start|^2
    on the support-restricted simplex, lambda_v = ridge x the mean curvature per supported joint."""
    gram = 0.5 * (gram + jnp.swapaxes(gram, 1, 2))
    # In w instead of dw the right-hand side gains gram @ current.
    linear = linear + jnp.einsum("vkl,vl->vk", gram, current)
    sup = jnp.asarray(support)
    curvature = jnp.where(sup, jnp.diagonal(gram, axis1=-2, axis2=-1), 0.0)
    lam = ridge * jnp.sum(curvature, axis=-1) / jnp.maximum(jnp.sum(sup, axis=-1), 1)
    return solve_simplex_qp(gram, linear, jnp.asarray(start, gram.dtype), sup, lam, iterations=iterations)


@partial(jax.jit, static_argnames=("chunk_size", "num_hands"))
def _joint_statistics(model, templates, hand_index, poses, targets, keep, chunk_size, num_hands):
    """Per-hand normal equations of the posed vertices in (template, rest joints), at the current
    templates and regressed joints: sum A^T A (H, V, 3, 3), A^T B (H, V, 3, 48), A^T e (H, V, 3),
    B^T B (H, 48, 48), B^T e (H, 48), with A the blended rotation of each vertex, B the derivative
    with respect to the 16 joints and e the residual."""
    v = templates.shape[1]
    dtype = targets.dtype

    def one(target, h, rot, pose, transl, k):
        x = templates[h] + correctives(model, pose)

        def posed(joints):
            return lbs.skin(x, model.weights, skinning_transforms(model, joints.reshape(16, 3), rot, pose, transl))

        joints = rest_joints(model, templates[h]).reshape(48)
        # Posed vertices are affine in the joints: the Jacobian is exact, and one step solves the problem.
        b = jax.jacfwd(posed)(joints) * k  # (V, 3, 48)
        t = skinning_transforms(model, joints.reshape(16, 3), rot, pose, transl)
        a = jnp.einsum("vj,jab->vab", model.weights, t[..., :3]) * k
        return a, b, (target - posed(joints)) * k

    def body(acc, xs):
        target, h, rot, pose, transl, k = xs
        a, b, e = jax.vmap(one)(target, h, rot, pose, transl, k)
        parts = (jnp.einsum("nvca,nvcb->nvab", a, a), jnp.einsum("nvca,nvcj->nvaj", a, b),
                 jnp.einsum("nvca,nvc->nva", a, e), jnp.einsum("nvci,nvcj->nij", b, b),
                 jnp.einsum("nvci,nvc->ni", b, e))  # fmt: skip
        return tuple(s + jax.ops.segment_sum(p, h, num_hands) for s, p in zip(acc, parts)), None

    xs = _chunked((targets, hand_index, poses.global_rot, poses.hand_pose, poses.transl, keep.astype(dtype)),
                  chunk_size)  # fmt: skip
    zeros = (jnp.zeros((num_hands, v, 3, 3), dtype), jnp.zeros((num_hands, v, 3, 48), dtype),
             jnp.zeros((num_hands, v, 3), dtype), jnp.zeros((num_hands, 48, 48), dtype),
             jnp.zeros((num_hands, 48), dtype))  # fmt: skip
    sums, _ = jax.lax.scan(body, zeros, xs)
    return sums


def fit_templates_and_joints(model: ManoModel, templates, hand_index, poses: Poses, targets, keep, *,
                             ridge: float = 1e-3, chunk_size: int = 32) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-hand templates (H, V, 3) and rest joints (H, 16, 3), solved together (metres).

    Given the rotations, correctives and weights, posed vertices are linear in the template and the
    rest joints, so the least-squares solution is one Gauss-Newton step from the current templates
    and regressed joints. Each vertex's template offset is eliminated (3 x 3), which leaves 48 x 48
    normal equations per hand; `ridge` x their mean curvature pulls the joints towards the regressed
    ones, for the directions the data do not determine. `keep` (N,) bool: registrations to use.
    """
    dtype = model.v_template.dtype
    templates = jnp.asarray(templates, dtype)
    num_hands = templates.shape[0]
    targets = jnp.asarray(targets, dtype)
    sums = _joint_statistics(
        model, templates, jnp.asarray(hand_index, jnp.int32), poses, targets, jnp.asarray(keep),
        chunk_size=min(chunk_size, targets.shape[0]), num_hands=num_hands,
    )  # fmt: skip
    ata, atb, ate, btb, bte = (np.asarray(s, np.float64) for s in sums)
    # A vertex no registration constrains (all its skin collapsed) keeps its template: a tiny floor.
    inv = np.linalg.inv(ata + 1e-12 * np.eye(3))  # (H, V, 3, 3), NumPy outside any compiled loop
    schur = btb - np.einsum("hvaj,hvab,hvbk->hjk", atb, inv, atb)
    rhs = bte - np.einsum("hvaj,hvab,hvb->hj", atb, inv, ate)
    damp = ridge * np.trace(schur, axis1=1, axis2=2) / 48 + 1e-30
    step = np.linalg.solve(schur + damp[:, None, None] * np.eye(48), rhs[..., None])[..., 0]
    moved = np.einsum("hvab,hvb->hva", inv, ate - np.einsum("hvaj,hj->hva", atb, step))
    joints = np.asarray(rest_joints(model, templates), np.float64) + step.reshape(num_hands, 16, 3)
    return np.asarray(templates, np.float64) + moved, joints


def refine_regressor(templates, joints, start_regressor, *, ridge: float, iterations: int = 2000) -> jax.Array:
    """(16, V) joint regressor with rows on the simplex, support that of `start_regressor`, fitted so
    that it maps (H, V, 3) `templates` to (H, 16, 3) `joints` (see the module docstring). `ridge` x the
    row's mean curvature pulls each row towards the starting one (with few hands a row is
    underdetermined within its support)."""
    templates = jnp.asarray(templates)
    joints = jnp.asarray(joints, templates.dtype)
    start = jnp.asarray(start_regressor, templates.dtype)
    # Each row is solved on its own support only (a few vertices): (16, K, K) instead of (16, V, V).
    support_np = np.asarray(start_regressor) > 0
    width = int(support_np.sum(axis=1).max())
    index = np.zeros((start.shape[0], width), np.int64)
    valid = np.zeros((start.shape[0], width), bool)
    for j, row in enumerate(support_np):
        idx = np.flatnonzero(row)
        index[j, : len(idx)] = idx
        valid[j, : len(idx)] = True
    # Rows sum to 1, so subtracting a point per hand and row from the vertices and the target changes
    # nothing; the starting row's joint leaves vertex-to-joint offsets (millimetres, not the hand's
    # size), to which the ridge's scale then refers.
    centre = jnp.einsum("jv,hva->hja", start, templates)[:, :, None]
    rows = templates[:, index] - centre  # (H, 16, K, 3)
    target = joints - centre[:, :, 0]
    gram = jnp.einsum("hjka,hjla->jkl", rows, rows)
    rhs = jnp.einsum("hjka,hja->jk", rows, target)
    valid = jnp.asarray(valid)
    diag = jnp.where(valid, jnp.diagonal(gram, axis1=-2, axis2=-1), 0.0)
    lam = ridge * jnp.sum(diag, axis=-1) / jnp.sum(valid, axis=-1)
    compact = solve_simplex_qp(gram, rhs, jnp.take_along_axis(start, jnp.asarray(index), axis=1), valid, lam,
                               iterations=iterations)  # fmt: skip
    return jnp.zeros_like(start).at[jnp.arange(start.shape[0])[:, None], index].add(jnp.where(valid, compact, 0.0))
