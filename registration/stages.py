"""The solvers behind the registration stages, compiled once per problem size.

Parametrisation of a frame: `hand_pose` (45,) axis-angle, the global rotation as a matrix `rot` (3, 3)
updated on the left by small rotation vectors (no axis-angle singularity at 180 degrees), `transl` (3,).
The posed model in scan coordinates is `scale * (rot @ (v - J0) + J0 + transl)` with `v` the model posed
with an identity root and `J0` its rest wrist, which is exactly `scale * forward(..., global_orient=
log(rot), transl=transl)`.

Energies (per frame; data residuals in millimetres, averaged over points so that frames of any density
weigh the same):
- scan -> model: Geman-McClure-robust point-to-plane distance (plus a share of point-to-point) from each
  scan point to the closest point on the model's triangles; scan points behind the wrist (forearm) are
  cut;
- model -> scan: the same from each model vertex that has a scan point within `model_to_scan_gate` whose
  normal agrees with the vertex normal (the vertex faces the sensor);
- priors: PCA-space Mahalanobis pose prior and joint-angle limits (`mano_jax.priors`), squared betas;
- 3D keypoints when given;
- temporal (tracking): squared velocity and acceleration of marker vertices across frames.

Gauss-Newton with a majorised data Hessian: a point on a triangle pulls on the triangle's three vertices
with its barycentric weights, and sum_k b_k J_k^T M J_k >= (sum_k b_k J_k)^T M (sum_k b_k J_k)
(Jensen), so the per-vertex form is an upper bound of the exact Gauss-Newton matrix -- cheap (no
per-point Jacobian rows) and never overshooting -- while the gradient is exact, so the fixed point is
the exact optimum.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mano_jax import lbs
from mano_jax.model import ManoModel
from mano_jax.priors import JointLimits, PosePrior

from .correspondences import closest_on_triangles, vertex_normals

NUM_POSE = 45
NUM_FRAME_PARAMS = 51  # hand pose 45, rotation increment 3, translation 3
MM2 = 1e6  # data residuals are costed in mm^2
_CG_ITERATIONS = 24  # conjugate-gradient iterations of a window's temporally coupled system
_EPS_DAMPING = 1e-3


def _dataclass(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_dataclass
class Frames:
    """Scan data of a batch of B frames, padded to N points (device arrays). Model metres."""

    points: jax.Array
    """(B, N, 3) scan points."""
    mask: jax.Array
    """(B, N) 1 for a real point, 0 for padding."""
    normals: jax.Array
    """(B, N, 3) unit scan normals (sign arbitrary; oriented against the model during the fit)."""
    keypoints: jax.Array
    """(B, 21, 3) 3D keypoints in MANO order (zeros when absent)."""
    keypoint_conf: jax.Array
    """(B, 21) keypoint confidences (0 when absent)."""
    valid: jax.Array
    """(B,) 1 when the frame has scan data, 0 for a bad frame or padding."""
    active: jax.Array
    """(B,) 1 for a real frame, 0 for padding at the end of the last window."""


@_dataclass
class Params:
    """Pose parameters of B frames."""

    hand_pose: jax.Array
    """(B, 45) axis-angle, radians."""
    rot: jax.Array
    """(B, 3, 3) global rotation about the wrist."""
    transl: jax.Array
    """(B, 3) translation, model metres."""


@_dataclass
class Matches:
    """Correspondences of one round, fixed while the round's Gauss-Newton steps run (the closest point
    still slides over its triangle as the model moves)."""

    faces: jax.Array
    """(B, N) the model triangle closest to each scan point at the start of the round."""
    scan_nn: jax.Array
    """(B, V) nearest scan point of each model vertex."""


@_dataclass
class _RoundData:
    """What a round fixes besides the correspondences: which points and vertices take part."""

    normals: jax.Array
    """(N, 3) scan normals oriented like the model surface they match."""
    keep: jax.Array
    """(N,) 1 for scan points used (real, not forearm)."""
    gate: jax.Array
    """(V,) 1 for vertices in the model -> scan term (a scan point near, facing the same way)."""


@_dataclass
class Weights:
    """Energy weights and lengths (traced scalars: changing them does not recompile)."""

    robust_scale: jax.Array
    point_to_point: jax.Array
    model_to_scan: jax.Array
    gate: jax.Array
    keypoint: jax.Array
    pose_prior: jax.Array
    joint_limits: jax.Array
    shape_prior: jax.Array
    velocity: jax.Array
    acceleration: jax.Array
    cut_offset: jax.Array
    """Scan points whose signed distance from the wrist along the hand direction is below this (model
    metres, negative: behind the wrist) are forearm and are ignored."""

    @classmethod
    def from_config(cls, config, cut_offset: float, dtype, *, temporal: bool = True, keypoint_weight=None):
        f = lambda x: jnp.asarray(x, dtype)  # noqa: E731
        return cls(
            robust_scale=f(config.robust_scale),
            point_to_point=f(config.point_to_point_weight),
            model_to_scan=f(config.model_to_scan_weight),
            gate=f(config.model_to_scan_gate),
            keypoint=f(config.keypoint_weight if keypoint_weight is None else keypoint_weight),
            pose_prior=f(config.pose_prior_weight),
            joint_limits=f(config.joint_limit_weight),
            shape_prior=f(config.shape_prior_weight),
            velocity=f(config.velocity_weight if temporal else 0.0),
            acceleration=f(config.acceleration_weight if temporal else 0.0),
            cut_offset=f(cut_offset),
        )


@_dataclass
class Priors:
    pose: PosePrior
    limits: JointLimits


@_dataclass
class Hand:
    """The model with a subject template, and what the solvers derive from it once."""

    model: ManoModel
    """The model with the subject's offsets added to `v_template` (betas are applied separately)."""
    hand_dir: jax.Array
    """(3,) unit direction from the wrist to the knuckles in the rest pose (the forearm lies behind)."""
    markers: jax.Array
    """(M,) vertex ids on which temporal smoothness is measured."""


def _hand_direction(model: ManoModel, vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    joints = np.asarray(model.J_regressor, np.float64) @ vertices
    d = joints[[1, 4, 7, 10]].mean(axis=0) - joints[0]
    return joints[0], d / np.linalg.norm(d)


def make_hand(model: ManoModel, offsets, num_markers: int) -> Hand:
    """The `Hand` of a subject template: `model` plus `offsets` (V, 3) metres."""
    v = np.asarray(model.v_template, np.float64) + np.asarray(offsets, np.float64)
    _, d = _hand_direction(model, v)
    # The solvers' copy drops the static labels the maths never reads (name, provenance, side), so models
    # of one topology -- left and right hands included -- share the compiled solvers.
    return Hand(
        model=model.replace(v_template=jnp.asarray(v, model.dtype), name="", provenance="", side="right"),
        hand_dir=jnp.asarray(d, model.dtype),
        markers=jnp.asarray(farthest_points(v, min(num_markers, len(v))), jnp.int32),
    )


def wrist_cut_offset(model: ManoModel, margin: float) -> float:
    """Where the forearm is cut: `margin` metres in front of the model's rearmost vertex, as a signed
    distance from the rest wrist along the hand direction."""
    v = np.asarray(model.v_template, np.float64)
    wrist, d = _hand_direction(model, v)
    return float(((v - wrist) @ d).min() + margin)


def farthest_points(points: np.ndarray, count: int, start: int = 0) -> np.ndarray:
    """Indices of `count` points spread over the set (farthest-point sampling)."""
    chosen = [start]
    d = np.linalg.norm(points - points[start], axis=1)
    for _ in range(count - 1):
        nxt = int(np.argmax(d))
        chosen.append(nxt)
        d = np.minimum(d, np.linalg.norm(points - points[nxt], axis=1))
    return np.asarray(chosen)


# ------------------------------------------------------------------------------------------------------
# The posed model and its Jacobian
# ------------------------------------------------------------------------------------------------------


def _skew(a):
    z = jnp.zeros_like(a[..., 0])
    return jnp.stack(
        [
            jnp.stack([z, -a[..., 2], a[..., 1]], -1),
            jnp.stack([a[..., 2], z, -a[..., 0]], -1),
            jnp.stack([-a[..., 1], a[..., 0], z], -1),
        ],
        -2,
    )


def _left_jacobian(theta):
    """(*, 3, 3) left Jacobian of SO(3) at axis-angle `theta` (*, 3): d(R) R^T = [J dtheta]x."""
    t2 = jnp.sum(theta * theta, -1)
    small = t2 < 1e-4
    t = jnp.sqrt(jnp.where(small, 1.0, t2))
    a = jnp.where(small, 0.5 - t2 / 24.0, (1.0 - jnp.cos(t)) / jnp.where(small, 1.0, t2))
    b = jnp.where(small, 1.0 / 6.0 - t2 / 120.0, (t - jnp.sin(t)) / jnp.where(small, 1.0, t2 * t))
    k = _skew(theta)
    eye = jnp.broadcast_to(jnp.eye(3, dtype=theta.dtype), k.shape)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def _subtree(parents) -> np.ndarray:
    """(J, J) 1 where joint j is joint k or one of its descendants (row k, column j)."""
    n = len(parents)
    sub = np.eye(n)
    for j in range(n):
        p = parents[j]
        while p >= 0:
            sub[p, j] = 1.0
            p = parents[p]
    return sub


def _to_world(x, wrist, rot, transl, scale):
    rotated = jnp.einsum("ij,...j->...i", rot, x - jnp.broadcast_to(wrist, x.shape))
    return scale * (rotated + jnp.broadcast_to(wrist + transl, x.shape))


def _posed_local(model: ManoModel, hand_pose, betas):
    """The model posed with an identity root, with what its Jacobian needs: vertices (V, 3),
    keypoints (21, 3) (keypoint 0 = the rest wrist) and intermediate quantities.

    The same maths as `mano_jax.forward` (tests check they agree), built from `mano_jax.lbs`.
    """
    local_r = lbs.axis_angle_to_matrix(hand_pose.reshape(15, 3))
    v_shaped = model.v_template + lbs.blend_shapes(betas, model.shapedirs)
    rest_j = model.J_regressor @ v_shaped
    feats = lbs.pose_features(local_r)
    x = v_shaped + (feats @ model.posedirs.reshape(-1, model.posedirs.shape[-1]).T).reshape(v_shaped.shape)
    eye = jnp.eye(3, dtype=local_r.dtype)[None]
    rotmats = jnp.concatenate([eye, local_r])
    world_r, posed_j = lbs.kinematic_chain(rotmats, rest_j, model.parents)
    transforms = lbs.skinning_transforms(world_r, posed_j, rest_j)
    v = lbs.skin(x, model.weights, transforms)
    tips = v[jnp.asarray(model.tip_ids, jnp.int32)]
    kp = jnp.concatenate([posed_j, tips])
    return v, kp, (local_r, rest_j, x, rotmats, world_r, posed_j, transforms)


def _local_jacobian(model: ManoModel, hand_pose, betas, cache):
    """Analytic Jacobians of the local vertices (V, 3, 45 + S) and keypoints (21, 3, 45 + S) with
    respect to the hand pose and betas.

    A change of joint k's axis-angle turns joint k and its descendants about the posed joint k with
    world angular velocity omega = R_parent(k) J_left(theta_k) dtheta_k, so a vertex moves by
    omega x (sum over the subtree of w_ij G_j x_i - (sum of those w_ij) c_k), plus its pose-corrective
    change; betas move the rest vertices and (linearly) the joints.
    """
    local_r, rest_j, x, rotmats, world_r, posed_j, transforms = cache
    parents = model.parents
    sub = jnp.asarray(_subtree(parents)[1:], x.dtype)  # (15, 16)
    n_vert = x.shape[0]
    jl = _left_jacobian(hand_pose.reshape(15, 3))
    omega = world_r[jnp.asarray(parents[1:])] @ jl  # (15, 3, 3): columns = world axes per component
    gx = jnp.einsum("jab,vb->vja", world_r, x) + transforms[None, :, :, 3]  # (V, 16, 3): G_j x_v
    wsub = model.weights @ sub.T  # (V, 15)
    arm = jnp.einsum("kj,vj,vja->vka", sub, model.weights, gx) - wsub[..., None] * posed_j[1:][None]
    dv = -jnp.einsum("vkab,kbc->vakc", _skew(arm), omega)  # (V, 3, 15, 3)
    blended = jnp.einsum("vj,jab->vab", model.weights, world_r)  # (V, 3, 3)
    # Pose correctives: d(R_k)/d(theta_kc) = [J_l e_c]x R_k, through posedirs and the blended rotation.
    dr = jnp.einsum("kcab,kbd->kcad", _skew(jnp.swapaxes(jl, -1, -2)), local_r).reshape(15, 3, 9)
    pd = model.posedirs.reshape(n_vert, 3, 15, 9)
    dv = dv + jnp.einsum("vab,vbkc->vakc", blended, jnp.einsum("vbkf,kcf->vbkc", pd, dr))
    dv = dv.reshape(n_vert, 3, 45)

    strict = sub - jnp.eye(16, dtype=x.dtype)[1:]
    arm_j = (posed_j[None, :, :] - posed_j[1:, None, :]) * strict[..., None]  # (15, 16, 3)
    dj = -jnp.einsum("kjab,kbc->jakc", _skew(arm_j), omega).reshape(16, 3, 45)

    s = betas.shape[0]
    shape_dirs = model.shapedirs[..., :s]
    d_rest = jnp.einsum("jv,vcs->jcs", model.J_regressor, shape_dirs)  # (16, 3, S)
    # Posed joints are linear in the rest joints for fixed rotations.
    d_posed = jax.vmap(lambda d: lbs.kinematic_chain(rotmats, d, parents)[1], in_axes=2, out_axes=2)(d_rest)
    d_trans = d_posed - jnp.einsum("jab,jbs->jas", world_r, d_rest)
    dvb = jnp.einsum("vab,vbs->vas", blended, shape_dirs) + jnp.einsum("vj,jas->vas", model.weights, d_trans)
    tips = jnp.asarray(model.tip_ids, jnp.int32)
    dk = jnp.concatenate([jnp.concatenate([dj, d_posed], -1), jnp.concatenate([dv[tips], dvb[tips]], -1)])
    return jnp.concatenate([dv, dvb], -1), dk


def posed_frame(hand: Hand, pose, rot, transl, betas, scale):
    """World vertices (V, 3) and keypoints (21, 3) of one frame."""
    v, k, _ = _posed_local(hand.model, pose, betas)
    return _to_world(v, k[0], rot, transl, scale), _to_world(k, k[0], rot, transl, scale)


def posed(hand: Hand, params: Params, betas, scale):
    """World vertices (B, V, 3) and keypoints (B, 21, 3) of a batch of frames."""
    return jax.vmap(posed_frame, in_axes=(None, 0, 0, 0, None, None))(
        hand, params.hand_pose, params.rot, params.transl, betas, scale
    )


def linearise(hand: Hand, pose, rot, transl, betas, scale):
    """World vertices (V, 3), keypoints (21, 3) and their Jacobians (., 3, P) for one frame.

    Columns (P = 51 + S + 1): hand pose (45), rotation increment (3), translation (3), betas (S),
    log scale (1).
    """
    v, k, cache = _posed_local(hand.model, pose, betas)
    dv, dk = _local_jacobian(hand.model, pose, betas, cache)
    wrist, dwrist = k[0], dk[0]  # only betas move the rest wrist

    def world(x, dx):
        a = jnp.einsum("ij,...j->...i", rot, x - jnp.broadcast_to(wrist, x.shape))
        eye = jnp.broadcast_to(jnp.eye(3, dtype=x.dtype), x.shape[:-1] + (3, 3))
        dw = jnp.broadcast_to(dwrist[:, NUM_POSE:], dx[..., NUM_POSE:].shape)
        cols = [
            jnp.einsum("ij,...jp->...ip", rot, dx[..., :NUM_POSE]),
            -_skew(a),
            eye,
            jnp.einsum("ij,...jp->...ip", rot, dx[..., NUM_POSE:] - dw) + dw,
        ]
        xw = _to_world(x, wrist, rot, transl, scale)
        return xw, jnp.concatenate([scale * jnp.concatenate(cols, -1), xw[..., None]], -1)

    vw, jv = world(v, dv)
    kw, jk = world(k, dk)
    return vw, jv, kw, jk


# ------------------------------------------------------------------------------------------------------
# Energy terms of one frame
# ------------------------------------------------------------------------------------------------------


def _geman_mcclure(e2, sigma2):
    """Robust cost and IRLS weight of squared residuals `e2` with squared scale `sigma2`."""
    q = sigma2 / (sigma2 + e2)
    return sigma2 * e2 / (sigma2 + e2), q * q


@_dataclass
class _Corr:
    """The data terms of one frame at the current vertices, as quadratic forms per point."""

    tri: jax.Array  # (N, 3) vertices of each scan point's triangle
    bary: jax.Array  # (N, 3) barycentric coordinates of the closest point on it
    m: jax.Array  # (N, 3, 3) metric: normal normal^T + point_to_point I
    r: jax.Array  # (N, 3) model point - scan point
    w: jax.Array  # (N,) IRLS weight x normalisation (0 for unused points)
    dist: jax.Array  # (N,) distance to the closest point on the triangle
    mv: jax.Array  # (V, 3, 3) metric of the model -> scan term (scan normal normal^T)
    rv: jax.Array  # (V, 3) vertex - scan point
    wv: jax.Array  # (V,) IRLS weight x normalisation (0 when gated out)
    cost: jax.Array  # () robust data energy


def _round_data(hand: Hand, v, wrist_w, rot, frame, matches, w: Weights, scale) -> _RoundData:
    """Fix for a round which scan points and model vertices take part, and the scan normals' sign."""
    faces = hand.model.faces
    tri = faces[matches.faces]
    corners = v[tri]
    n = jnp.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    along = (frame.points - jnp.broadcast_to(wrist_w, frame.points.shape)) @ (rot @ hand.hand_dir)
    keep = frame.mask * (along >= w.cut_offset * scale)
    # Scan normals take the sign of the model surface they match, so a vertex on the far side of a finger
    # (normal opposite to the scanned side's) is not pulled onto the near side.
    normals = frame.normals * jnp.where(jnp.sum(frame.normals * n, -1) < 0, -1.0, 1.0)[:, None]
    q = frame.points[matches.scan_nn]
    facing = jnp.sum(normals[matches.scan_nn] * vertex_normals(v, faces), -1) > 0.5
    near = jnp.sum((v - q) ** 2, -1) < (w.gate * scale) ** 2
    return _RoundData(normals=normals, keep=keep, gate=keep[matches.scan_nn] * facing * near)


def _correspond(hand: Hand, v, frame, matches, rd: _RoundData, w: Weights, scale) -> _Corr:
    """Closest points, robust weights and energy of the data terms of one frame."""
    alpha = w.point_to_point
    sigma2 = (w.robust_scale * scale) ** 2 * (1.0 + alpha)
    n_vert = v.shape[0]
    tri = hand.model.faces[matches.faces]
    corners = v[tri]
    d2, bary = closest_on_triangles(frame.points, corners[:, 0], corners[:, 1], corners[:, 2])
    x = jnp.einsum("nk,nkc->nc", bary, corners)
    n = jnp.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    r = x - frame.points
    e2 = jnp.sum(r * n, -1) ** 2 + alpha * jnp.sum(r * r, -1)
    rho, irls = _geman_mcclure(e2, sigma2)
    norm = frame.valid * MM2 / jnp.maximum(jnp.sum(rd.keep), 1.0)
    eye = jnp.broadcast_to(jnp.eye(3, dtype=v.dtype), frame.points.shape + (3,))

    # Model -> scan is point-to-plane only: a vertex's nearest scan point is up to half the sampling
    # spacing away along the surface, so a point-to-point share would drag vertices towards samples.
    nq = rd.normals[matches.scan_nn]
    rv = v - frame.points[matches.scan_nn]
    ev2 = jnp.sum(rv * nq, -1) ** 2
    rho_v, irls_v = _geman_mcclure(ev2, sigma2 / (1.0 + alpha))
    norm_v = frame.valid * w.model_to_scan * MM2 / n_vert
    return _Corr(
        tri=tri,
        bary=bary,
        m=n[:, :, None] * n[:, None, :] + alpha * eye,
        r=r,
        w=rd.keep * irls * norm,
        dist=jnp.sqrt(d2),
        mv=nq[:, :, None] * nq[:, None, :],
        rv=rv,
        wv=rd.gate * irls_v * norm_v,
        cost=jnp.sum(rd.keep * rho) * norm + jnp.sum(rd.gate * rho_v) * norm_v,
    )


def _vertex_blocks(c: _Corr, n_vert: int):
    """Majorised per-vertex Gauss-Newton blocks C (V, 3, 3) and gradient e (V, 3) of the data terms."""
    wb = c.w[:, None] * c.bary
    mr = jnp.einsum("nab,nb->na", c.m, c.r)
    idx = c.tri.reshape(-1)
    C = jnp.zeros((n_vert, 3, 3), c.m.dtype).at[idx].add((wb[:, :, None, None] * c.m[:, None]).reshape(-1, 3, 3))
    e = jnp.zeros((n_vert, 3), c.m.dtype).at[idx].add((wb[:, :, None] * mr[:, None]).reshape(-1, 3))
    C = C + c.wv[:, None, None] * c.mv
    e = e + c.wv[:, None] * jnp.einsum("vab,vb->va", c.mv, c.rv)
    return C, e


def _prior_residuals(priors: Priors, pose, w: Weights):
    """Weighted prior residuals of a hand pose (the prior energy is their sum of squares)."""
    region, twist = priors.limits.excess(pose)
    return jnp.concatenate(
        [
            jnp.sqrt(w.pose_prior) * priors.pose.residuals(pose),
            jnp.sqrt(w.joint_limits) * region,
            jnp.sqrt(w.joint_limits) * twist,
        ]
    )


def _jac_with_value(f, x0):
    """(f(x0), Jacobian of f at x0 with the input axis last), by forward mode over a basis."""
    out, lin = jax.linearize(f, x0)
    return out, jax.vmap(lin, in_axes=0, out_axes=-1)(jnp.eye(x0.shape[0], dtype=x0.dtype))


def _keypoint_weights(frame, w: Weights):
    return frame.keypoint_conf * (w.keypoint * MM2 / 21.0)


def frame_system(hand, priors, frame, matches, rd, pose, rot, transl, betas, scale, w):
    """Gauss-Newton system of one frame: H (P, P), g (P,), its energy and world vertices."""
    v, jv, kp, jk = linearise(hand, pose, rot, transl, betas, scale)
    c = _correspond(hand, v, frame, matches, rd, w, scale)
    C, e = _vertex_blocks(c, v.shape[0])
    p = jv.shape[-1]
    jflat = jv.reshape(-1, p)
    h = jflat.T @ jnp.einsum("vab,vbp->vap", C, jv).reshape(-1, p)
    g = jflat.T @ e.reshape(-1)
    ck = _keypoint_weights(frame, w)
    rk = kp - frame.keypoints
    h = h + jnp.einsum("k,kap,kaq->pq", ck, jk, jk)
    g = g + jnp.einsum("k,kap,ka->p", ck, jk, rk)
    rp, jp = _jac_with_value(lambda x: _prior_residuals(priors, x, w), pose)
    h = h.at[:NUM_POSE, :NUM_POSE].add(jp.T @ jp)
    g = g.at[:NUM_POSE].add(jp.T @ rp)
    cost = c.cost + jnp.sum(ck * jnp.sum(rk * rk, -1)) + jnp.sum(rp * rp)
    return h, g, cost, v, c.dist, jv[hand.markers, :, :NUM_FRAME_PARAMS]


def frame_energy(hand, priors, frame, matches, rd, pose, rot, transl, betas, scale, w):
    """Energy of one frame (data, keypoints, priors), its world vertices and scan-to-model distances."""
    v, k = posed_frame(hand, pose, rot, transl, betas, scale)
    c = _correspond(hand, v, frame, matches, rd, w, scale)
    rk = k - frame.keypoints
    rp = _prior_residuals(priors, pose, w)
    return c.cost + jnp.sum(_keypoint_weights(frame, w) * jnp.sum(rk * rk, -1)) + jnp.sum(rp * rp), v, c.dist


def _apply(params: Params, delta, alpha) -> Params:
    """Params after a step `alpha * delta` (B, 51)."""
    d = alpha * delta
    return Params(
        hand_pose=params.hand_pose + d[:, :NUM_POSE],
        rot=lbs.axis_angle_to_matrix(d[:, NUM_POSE : NUM_POSE + 3]) @ params.rot,
        transl=params.transl + d[:, NUM_POSE + 3 : NUM_FRAME_PARAMS],
    )


# ------------------------------------------------------------------------------------------------------
# The solver: a batch of frames, optionally coupled in time and/or through shared shape parameters
# ------------------------------------------------------------------------------------------------------


def temporal_matrix(active, boundary_valid, w: Weights, num_markers: int):
    """(B + 2, B + 2) quadratic form L over [2 fixed boundary frames, B window frames] such that the
    temporal energy is sum_st L_st <y_s, y_t> over marker positions y (velocity + acceleration terms,
    mm^2 per marker; terms touching padding or missing boundary frames are dropped)."""
    e = jnp.concatenate([boundary_valid, active])
    n = e.shape[0]
    eye = jnp.eye(n, dtype=e.dtype)
    d1 = eye[1:] - eye[:-1]
    v1 = e[1:] * e[:-1]
    d2 = eye[2:] - 2.0 * eye[1:-1] + eye[:-2]
    v2 = e[2:] * e[1:-1] * e[:-2]
    unit = MM2 / num_markers
    return unit * (w.velocity * (d1.T * v1[None, :]) @ d1 + w.acceleration * (d2.T * v2[None, :]) @ d2)


def _pcg(apply_a, b, precond, iterations):
    """Preconditioned conjugate gradients for A x = b (fixed iteration count, x0 = 0)."""
    x = jnp.zeros_like(b)
    z = precond(b)

    def body(_, state):
        x, r, p, rz = state
        ap = apply_a(p)
        pap = jnp.vdot(p, ap)
        step = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = x + step * p
        r = r - step * ap
        z = precond(r)
        rz_new = jnp.vdot(r, z)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
        return x, r, z + beta * p, rz_new

    x, *_ = jax.lax.fori_loop(0, iterations, body, (x, b, z, jnp.vdot(b, z)))
    return x


@jax.jit
def solve(hand, priors, frames, matches, params, shape, shape_mask, boundary, boundary_valid, w, steps):
    """Gauss-Newton steps on a batch of B frames with fixed correspondences.

    The frames are independent, coupled in time (temporal weights > 0: a window of a sequence, with the
    marker positions `boundary` (2, M, 3) of the two frames before it held fixed where `boundary_valid`
    (2,) is 1), or coupled through shared shape parameters (`shape_mask` (S + 1,) marks which of
    `shape` = (betas (S), log scale) are solved: keyframes of the subject template). Shape and temporal
    coupling are not used together. Points are in scan units; the model is scaled by exp(log scale).

    Returns (params, shape, energy per frame (B,), world vertices (B, V, 3), distances (B, N), round
    data). Independent frames each choose their own line-search step.
    """
    dt = params.transl.dtype
    n_shape = shape.shape[0]
    betas, log_scale = shape[:-1], shape[-1]
    lmat = temporal_matrix(frames.active, boundary_valid, w, hand.markers.shape[0])
    temporal = (w.velocity + w.acceleration) > 0
    shared = jnp.any(shape_mask > 0)
    path = jnp.where(shared, 0, jnp.where(temporal, 1, 2))
    v0, k0 = posed(hand, params, betas, jnp.exp(log_scale))
    rd = jax.vmap(_round_data, in_axes=(None, 0, 0, 0, 0, 0, None, None))(
        hand, v0, k0[:, 0], params.rot, frames, matches, w, jnp.exp(log_scale)
    )
    axes = (None, None, 0, 0, 0, 0, 0, 0, None, None, None)
    act = frames.active

    def temporal_energy(verts):
        y = jnp.concatenate([boundary, verts[:, hand.markers]])
        return jnp.einsum("st,smc,tmc->", lmat, y, y)

    def totals(cost, verts, shp):
        return (
            jnp.sum(jnp.where(act > 0, cost, 0.0))
            + temporal_energy(verts)
            + w.shape_prior * jnp.sum(shape_mask[:-1] * shp[:-1] ** 2)
        )

    def step(_, state):
        params, shape, *_ = state
        betas, scale = shape[:-1], jnp.exp(shape[-1])
        h, g, cost0, v, dist0, jm = jax.vmap(frame_system, in_axes=axes)(
            hand, priors, frames, matches, rd, params.hand_pose, params.rot, params.transl, betas, scale, w
        )
        pf = NUM_FRAME_PARAMS
        eye_p = jnp.broadcast_to(jnp.eye(pf, dtype=dt), (h.shape[0], pf, pf))
        hpp = h[:, :pf, :pf] * act[:, None, None] + (1.0 - act[:, None, None]) * eye_p
        gp = g[:, :pf] * act[:, None]

        # Temporal terms on marker vertices, linearised: J_t^T (L y) and J_s^T L_st J_t.
        y = v[:, hand.markers]
        ly = (lmat @ jnp.concatenate([boundary, y]).reshape(lmat.shape[0], -1))[2:].reshape(y.shape)
        gp = gp + jnp.einsum("bmcp,bmc->bp", jm, ly)
        diag_t = jnp.diagonal(lmat)[2:]
        hb = hpp + diag_t[:, None, None] * jnp.einsum("bmcp,bmcq->bpq", jm, jm)
        hb = hb + (1e-4 * jnp.diagonal(hb, axis1=1, axis2=2)[:, :, None] + _EPS_DAMPING) * eye_p
        chol = jnp.linalg.cholesky(hb)

        def block_solve(r):
            return jax.scipy.linalg.cho_solve((chol, True), r)

        def apply_a(x):
            u = jnp.concatenate([jnp.zeros_like(boundary), jnp.einsum("bmcp,bp->bmc", jm, x)])
            z = (lmat @ u.reshape(lmat.shape[0], -1))[2:].reshape(y.shape) - diag_t[:, None, None] * u[2:]
            return jnp.einsum("bpq,bq->bp", hb, x) + jnp.einsum("bmcp,bmc->bp", jm, z)

        def temporal_path():
            dp = _pcg(apply_a, -gp, lambda r: block_solve(r[..., None])[..., 0], _CG_ITERATIONS)
            return dp, jnp.zeros_like(shape)

        def shape_path():
            # Shared shape: eliminate the frames (Schur complement), solve the shape, back-substitute.
            keep = shape_mask
            hps = h[:, :pf, pf:] * act[:, None, None] * keep[None, None, :]
            hss = jnp.sum(h[:, pf:, pf:] * act[:, None, None], 0) * keep[:, None] * keep[None, :]
            prior = jnp.concatenate([jnp.full((n_shape - 1,), 1.0, dt) * w.shape_prior, jnp.zeros((1,), dt)]) * keep
            hss = hss + jnp.diag(prior + (1.0 - keep)) + jnp.diag(1e-4 * jnp.diagonal(hss) + _EPS_DAMPING)
            gs = (jnp.sum(g[:, pf:] * act[:, None], 0) + prior * shape) * keep
            y_ps = block_solve(hps)  # (B, pf, S+1)
            z_p = block_solve(gp[..., None])[..., 0]
            schur = hss - jnp.einsum("bpi,bpj->ij", hps, y_ps)
            ds = -jnp.linalg.solve(schur, gs - jnp.einsum("bpi,bp->i", hps, z_p))
            return -z_p - jnp.einsum("bpi,i->bp", y_ps, ds), ds * keep

        def independent_path():
            return block_solve(-gp[..., None])[..., 0], jnp.zeros_like(shape)

        # A real branch, so only the path in use runs (PCG and the Schur solve are most of a step).
        dp, ds = jax.lax.switch(path, (shape_path, temporal_path, independent_path))

        # Line search over no step (energy known), a full and a half step.
        alphas = jnp.asarray([1.0, 0.5], dt)
        cand_p = jax.vmap(lambda a: _apply(params, dp, a))(alphas)
        cand_s = shape[None] + alphas[:, None] * ds[None]
        cost_c, v_c, dist_c = jax.vmap(
            lambda p, s: jax.vmap(frame_energy, in_axes=axes)(
                hand, priors, frames, matches, rd, p.hand_pose, p.rot, p.transl, s[:-1], jnp.exp(s[-1]), w
            )
        )(cand_p, cand_s)
        all_cost = jnp.concatenate([cost0[None], cost_c])
        all_v = jnp.concatenate([v[None], v_c])
        all_dist = jnp.concatenate([dist0[None], dist_c])
        all_p = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), params, cand_p)
        all_s = jnp.concatenate([shape[None], cand_s])
        all_cost = jnp.where(jnp.isfinite(all_cost), all_cost, jnp.inf)
        tot = jax.vmap(totals)(all_cost, all_v, all_s)
        tot = jnp.where(jnp.isfinite(tot), tot, jnp.inf)
        joint = jnp.argmin(tot)
        choice = jnp.where(shared | temporal, jnp.full_like(act, joint, dtype=jnp.int32), jnp.argmin(all_cost, 0))

        def pick(x):
            return jnp.take_along_axis(x, choice.reshape((1, -1) + (1,) * (x.ndim - 2)), axis=0)[0]

        new_p = jax.tree_util.tree_map(pick, all_p)
        return new_p, all_s[joint], pick(all_cost), pick(all_v), pick(all_dist)

    n_pts = frames.points.shape[1]
    init = (params, shape, jnp.zeros_like(act), v0, jnp.zeros((act.shape[0], n_pts), dt))
    params, shape, cost, v, dist = jax.lax.fori_loop(0, steps, step, init)
    return params, shape, cost, v, dist, rd


@_dataclass
class Mesh:
    """Mesh adjacency for the Laplacian of the offsets."""

    edges: jax.Array
    """(E, 2) undirected edges."""
    degree: jax.Array
    """(V,) number of neighbours of each vertex."""


def _laplacian(mesh: Mesh, x):
    """Uniform Laplacian x_v - mean of the neighbours, (V, 3)."""
    i, j = mesh.edges[:, 0], mesh.edges[:, 1]
    s = jnp.zeros_like(x).at[i].add(x[j]).at[j].add(x[i])
    return x - s / jnp.maximum(mesh.degree, 1)[:, None]


def _laplacian_t(mesh: Mesh, y):
    i, j = mesh.edges[:, 0], mesh.edges[:, 1]
    yd = y / jnp.maximum(mesh.degree, 1)[:, None]
    s = jnp.zeros_like(y).at[i].add(yd[j]).at[j].add(yd[i])
    return y - s


@functools.partial(jax.jit, static_argnames=("iterations",))
def solve_template(hand, mesh, offsets, directions, frames, matches, params, betas, w, lap_weight, mag_weight, *, iterations: int):
    """New template offsets (V, 3) and betas (S,) given the keyframes' poses, solved jointly.

    Minimises the keyframes' data terms linearised in the offsets and betas, + `lap_weight`
    |Laplacian(offsets)|^2 + `mag_weight` |offsets|^2 (per vertex in mm^2, averaged over vertices) +
    the shape prior, by preconditioned conjugate gradients: betas and smooth offsets can explain the
    same shape, and alternating between them would crawl along that valley. For fixed poses the
    linearisation in the offsets is exact: an offset moves its own vertex through the vertex's blended
    skinning rotation, and every vertex through the joints it helps regress (the template with offsets
    is what `J_regressor` sees). `hand` must already include `offsets`.

    `directions` (V, 3, D): the offset of vertex v is directions[v] @ x_v with x_v in R^D (D = 3 and the
    identity for free offsets; D = 1 and the template normal for offsets along the normals).
    """
    n_vert = offsets.shape[0]
    n_dir = directions.shape[-1]
    n_beta = betas.shape[0]
    one = jnp.ones((), offsets.dtype)
    reg_unit = MM2 / n_vert
    model = hand.model
    eye3 = jnp.eye(3, dtype=offsets.dtype)

    def frame_terms(frame, match, pose, rot, transl):
        v, k, cache = _posed_local(model, pose, betas)
        _, rest_j, _, rotmats, world_r, _, _ = cache
        wrist = k[0]
        _, jv, _, _ = linearise(hand, pose, rot, transl, betas, one)
        v = _to_world(v, wrist, rot, transl, one)
        a = jnp.einsum("ij,vjk->vik", rot, jnp.einsum("vj,jab->vab", model.weights, world_r))
        # d(posed joints)/d(rest joints) is constant for fixed rotations (the chain is linear in them);
        # a vertex sums w_k (c_k - R_k J_k) over its joints k.
        chain = jax.jacfwd(lambda j: lbs.kinematic_chain(rotmats, j, model.parents)[1])(rest_j)  # (16,3,16,3)
        own = jnp.einsum("kab,kj->kajb", world_r, jnp.eye(16, dtype=rest_j.dtype))
        bj = jnp.einsum("vk,kajb->vjab", model.weights, chain - own)
        # The root turns about the rest wrist, itself regressed from the template.
        root = jnp.zeros((16, 3, 3), rot.dtype).at[0].set(eye3 - rot)
        bj = jnp.einsum("ij,vkjb->vkib", rot, bj) + jnp.broadcast_to(root, bj.shape)
        rd = _round_data(hand, v, wrist + transl, rot, frame, match, w, one)
        jb = jv[:, :, NUM_FRAME_PARAMS : NUM_FRAME_PARAMS + n_beta]
        return a, bj, jb, _correspond(hand, v, frame, match, rd, w, one)

    a, bj, jb, c = jax.vmap(frame_terms)(frames, matches, params.hand_pose, params.rot, params.transl)
    act = frames.active
    c = dataclasses.replace(c, w=c.w * act[:, None], wv=c.wv * act[:, None])

    def lift(x):
        return jnp.einsum("vcd,vd->vc", directions, x)

    def lower(y):
        return jnp.einsum("vcd,vc->vd", directions, y)

    def split(z):
        return lift(z[: n_vert * n_dir].reshape(n_vert, n_dir)), z[n_vert * n_dir :]

    def join(g_off, g_beta):
        return jnp.concatenate([lower(g_off).reshape(-1), g_beta])

    def scatter_back(ck, y_pts, y_verts):
        """Gradient on the posed vertices (V, 3) of the data terms for point residuals y_pts (N, 3) and
        vertex residuals y_verts (V, 3)."""
        z = ck.w[:, None] * jnp.einsum("nab,nb->na", ck.m, y_pts)
        g = jnp.zeros((n_vert, 3), z.dtype).at[ck.tri.reshape(-1)].add((ck.bary[:, :, None] * z[:, None]).reshape(-1, 3))
        return g + ck.wv[:, None] * jnp.einsum("vab,vb->va", ck.mv, y_verts)

    def pull_back(ak, bk, jbk, g):
        """Transpose of the (offsets, betas) -> posed vertices map applied to g (V, 3)."""
        through_joints = model.J_regressor.T @ jnp.einsum("vjab,va->jb", bk, g)
        return jnp.einsum("vba,vb->va", ak, g) + through_joints, jnp.einsum("vas,va->s", jbk, g)

    def data_op(x, db):
        dj = model.J_regressor @ x

        def per_frame(ak, bk, jbk, ck):
            u = jnp.einsum("vab,vb->va", ak, x) + jnp.einsum("vjab,jb->va", bk, dj) + jnp.einsum("vas,s->va", jbk, db)
            y = jnp.einsum("nc,nca->na", ck.bary, u[ck.tri])
            return pull_back(ak, bk, jbk, scatter_back(ck, y, u))

        g_off, g_beta = jax.vmap(per_frame)(a, bj, jb, c)
        return jnp.sum(g_off, 0), jnp.sum(g_beta, 0)

    def reg_op(x):
        return reg_unit * (lap_weight * _laplacian_t(mesh, _laplacian(mesh, x)) + mag_weight * x)

    def apply_a(z):
        x, db = split(z)
        g_off, g_beta = data_op(x, db)
        return join(g_off + reg_op(x), g_beta + w.shape_prior * db)

    g_off, g_beta = jax.vmap(lambda ak, bk, jbk, ck: pull_back(ak, bk, jbk, scatter_back(ck, ck.r, ck.rv)))(a, bj, jb, c)
    rhs = -join(jnp.sum(g_off, 0) + reg_op(offsets), jnp.sum(g_beta, 0) + w.shape_prior * betas)

    # Block-Jacobi preconditioner: each vertex's own block (without the joint coupling), and the betas'.
    def vertex_blocks(ck):
        wb = ck.w[:, None] * ck.bary
        blk = jnp.zeros((n_vert, 3, 3), ck.m.dtype).at[ck.tri.reshape(-1)].add(
            (wb[:, :, None, None] * ck.m[:, None]).reshape(-1, 3, 3)
        )
        return blk + ck.wv[:, None, None] * ck.mv

    blk = jax.vmap(vertex_blocks)(c)  # (K, V, 3, 3)
    inv_deg2 = 1.0 / jnp.maximum(mesh.degree, 1) ** 2
    lap_diag = 1.0 + jax.ops.segment_sum(
        jnp.concatenate([inv_deg2[mesh.edges[:, 1]], inv_deg2[mesh.edges[:, 0]]]),
        jnp.concatenate([mesh.edges[:, 0], mesh.edges[:, 1]]),
        num_segments=n_vert,
    )
    reg_diag = reg_unit * (lap_weight * lap_diag + mag_weight)
    own = jnp.einsum("kvba,kvbc,kvcd->vad", a, blk, a) + reg_diag[:, None, None] * jnp.broadcast_to(eye3, (n_vert, 3, 3))
    inv_off = jnp.linalg.inv(jnp.einsum("vca,vcd,vdb->vab", directions, own, directions))
    h_beta = jnp.einsum("kvas,kvab,kvbt->st", jb, blk, jb) + w.shape_prior * jnp.eye(n_beta, dtype=offsets.dtype)
    inv_beta = jnp.linalg.inv(h_beta)

    def precond(r):
        ro = r[: n_vert * n_dir].reshape(n_vert, n_dir)
        return jnp.concatenate([jnp.einsum("vab,vb->va", inv_off, ro).reshape(-1), inv_beta @ r[n_vert * n_dir :]])

    z = _pcg(apply_a, rhs, precond, iterations)
    x, db = split(z)
    return offsets + x, betas + db


# ------------------------------------------------------------------------------------------------------
# Stage 0: rigid multi-hypothesis search
# ------------------------------------------------------------------------------------------------------


# Cost of a scan point cut away as forearm in the rigid search, against up to 1 for a point the model leaves
# unexplained: cutting is cheaper than leaving the forearm unexplained, dearer than fitting a point.
_FOREARM_COST = 0.3


def placement_cost(d2, sigma2, keep, mask):
    """How badly a placement explains scan points with squared distances `d2` (*, N): the mean over the
    real points (`mask`) of the robust distance (0 to 1, Geman-McClure with squared scale `sigma2`) of a
    point kept, `_FOREARM_COST` of a point cut away as forearm (`mask` - `keep`). Lower is better; NumPy
    or JAX arrays."""
    rho, _ = _geman_mcclure(d2, sigma2)
    return (keep * rho / sigma2 + (mask - keep) * _FOREARM_COST).sum(-1) / mask.sum(-1).clip(min=1.0)


@functools.partial(jax.jit, static_argnames=("iterations",))
def rigid_search(points, mask, model_points, rot0, transl0, scale0, solve_scale, robust_scale, wrist, hand_dir,
                 cut_offset, *, iterations: int):  # fmt: skip
    """Rigid (or similarity) ICP from H starting poses, all at once.

    Args:
      points: (N, 3) scan points; mask (N,) 1 for real points.
      model_points: (M, 3) points of the model surface in its rest pose.
      rot0, transl0, scale0: (H, 3, 3), (H, 3), (H,) starting transforms (model -> scan).
      solve_scale: (H,) 1 to solve the scale of that hypothesis too.
      robust_scale: final Geman-McClure scale (metres); ICP starts 4x wider and narrows.
      wrist, hand_dir, cut_offset: the model's wrist (3,), its direction towards the fingers (3,), and the
        signed distance along it behind which scan points are forearm (as in the articulated fit).

    Returns (rot, transl, scale, cost) per hypothesis; cost: `placement_cost` of the scan points against
    the transformed model points, those behind its wrist cut as forearm. Without the forearm cut, a scan
    that runs on up the arm outweighs the hand, and a hand turned palm for back can win.
    """

    def one(rot, transl, scale, solve_scale):
        def nearest(rot, transl, scale):
            y = scale * model_points @ rot.T + transl[None, :]
            d2 = jnp.sum(points**2, -1)[:, None] - 2.0 * points @ y.T + jnp.sum(y**2, -1)[None, :]
            idx = jnp.argmin(d2, axis=1)
            return idx, jnp.maximum(jnp.take_along_axis(d2, idx[:, None], 1)[:, 0], 0.0)

        def kept(rot, transl, scale):
            along = (points - (scale * rot @ wrist + transl)[None, :]) @ (rot @ hand_dir)
            return mask * (along >= cut_offset * scale)

        def body(i, state):
            rot, transl, scale = state
            sigma = robust_scale * scale * (1.0 + 3.0 * (1.0 - i / max(iterations - 1, 1)))
            idx, d2 = nearest(rot, transl, scale)
            _, wts = _geman_mcclure(d2, sigma**2)
            return lbs.procrustes(model_points[idx], points, wts * kept(rot, transl, scale), solve_scale=solve_scale > 0, scale=scale)

        rot, transl, scale = jax.lax.fori_loop(0, iterations, body, (rot, transl, scale))
        _, d2 = nearest(rot, transl, scale)
        sigma2 = (robust_scale * scale) ** 2
        return rot, transl, scale, placement_cost(d2, sigma2, kept(rot, transl, scale), mask)

    return jax.vmap(one)(rot0, transl0, scale0, solve_scale)
