"""Fitting the hand model to 2D or 3D keypoints: `fit_keypoints`, its configuration, the objective's terms,
the staged solver, and the output directory.

The objective (SMPLify's structure, Bogo et al. ECCV 2016; Boukhayma et al.'s camera and losses, CVPR 2019;
Spurr et al.'s biomechanical constraints, ECCV 2020), summed over frames, each term a function below:

    E = w_data  sum conf * rho(keypoint residual / sigma)            `keypoint_term`
      + w_pose  * Mahalanobis / mixture pose prior                   `mano_jax.priors`
      + w_limit * squared excess over the joint-angle limits         `mano_jax.priors.JointLimits`
      + w_bio   * bone-length and palm-structure penalties           `biomech_term`
      + w_pen   * overlap of finger capsules (interpenetration)      `interpenetration_term`
      + w_shape * ||betas||^2                                        `mano_jax.priors.shape_prior`
      + smoothness of pose, orientation and translation (sequences)  `smoothness_term`

Residuals are in units of the expected noise (`sigma_3d` metres, `sigma_2d` pixels), so with weight 1 the
priors act as in a maximum-a-posteriori fit. The data kernel is L2 for 3D and L1 for 2D (selectable), wrapped
in a Geman-McClure robustifier so wrong detections cannot drag the fit far.

Staged solve (L-BFGS from optax, every stage jitted once and reused):
  A. camera: global orientation and translation (or weak-perspective scale/offset) from the palm keypoints
     only (wrist, thumb CMC, 4 MCPs; MANO's palm is rigid). 3D: closed-form weighted Kabsch. 2D: depth from
     the ratio of the 3D to 2D palm size, several orientation hypotheses (palm towards/away from the camera,
     tilted either way), each refined;
  B. pose with decreasing prior weights from two starting poses (the mean hand and the flat hand) for each
     placement, frames independent (no smoothness), shape fixed at the mean; per frame the start with the
     lowest objective is kept;
  C. everything together, shape shared across frames, temporal smoothness on sequences.

All lengths are metres; pixels for 2D keypoints.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mano_jax import biomech, lbs
from mano_jax.conventions import MANO_FROM_OPENPOSE, OPENPOSE_ORDER
from mano_jax.posing import forward
from mano_jax.priors import GaussianMixturePrior, JointLimits, PosePrior, shape_prior

from .camera import WEAK_PERSPECTIVE, PinholeCamera, WeakPerspectiveCamera, project_camera_points
from .correspondences import closest_on_segment

#: Palm keypoints in OpenPose order: wrist, thumb CMC, index/middle/ring/pinky MCP.
PALM = (0, 1, 5, 9, 13, 17)
#: The 15 finger bones of the capsule proxies, as (start, end) keypoints in OpenPose order.
FINGER_BONES = tuple((1 + 4 * f + k, 2 + 4 * f + k) for f in range(5) for k in range(3))


class KeypointFitError(ValueError):
    """Keypoints, confidences, camera or configuration that cannot be fitted; the message says which."""


@dataclasses.dataclass(frozen=True)
class KeypointFitConfig:
    """Settings of `fit_keypoints` (defaults suit detector keypoints and mocap; lengths in metres)."""

    order: Literal["openpose", "mano"] = "openpose"
    """Order of the input keypoints: "openpose" (also MediaPipe, FreiHAND) or "mano" (16 joints, 5 tips)."""
    num_betas: int = 10
    """Shape coefficients fitted (at most the model's)."""
    fit_shape: bool = True
    """Fit the shape in stage C; False keeps the mean shape."""
    shared_shape: bool = True
    """One shape for all frames (a sequence of one hand). False: every frame is an independent hand with its
    own shape (a batch of unrelated samples; use with `smooth=False`)."""
    sigma_3d: float = 0.005
    """Expected 3D keypoint noise, metres (residuals are divided by it)."""
    sigma_2d: float = 2.0
    """Expected 2D keypoint noise, pixels."""
    kernel_3d: Literal["l2", "l1"] = "l2"
    """Data kernel for 3D keypoints: squared (L2) or absolute (L1) coordinate residuals."""
    kernel_2d: Literal["l2", "l1"] = "l1"
    """Data kernel for 2D keypoints."""
    robust: Literal["geman-mcclure", "none"] = "geman-mcclure"
    """Robustifier on each keypoint's kernel value: Geman-McClure c b / (c + b), or none."""
    robust_scale: float = 10.0
    """Where the robustifier saturates, in noise units (c = scale^2 for L2, 3 scale for L1 per keypoint)."""
    pose_prior_weights: tuple[float, ...] = (10.0, 3.0, 1.0)
    """Pose-prior weight of each pose stage (SMPLify-style decreasing); the last one is used in stage C."""
    limit_weight: float = 1e4
    """Weight of the joint-limit penalty (radians^2): 1 degree past a limit costs 3."""
    limit_margin_deg: float = 1.0
    """The fit keeps this far inside the joint limits, so a fitted pose satisfies them exactly."""
    biomech_weight: float = 1e3
    """Weight of the bone-length / palm penalties (normalised lengths, radians)."""
    penetration_weight: float = 1.0
    """Weight of the finger interpenetration penalty (per mm^2 of capsule overlap)."""
    shape_weight: float = 1.0
    """Weight of ||betas||^2 (betas are in standard deviations)."""
    accel_std_pose: float = 0.1
    """Sequences: expected frame-to-frame acceleration of the hand pose and orientation, rad/frame^2."""
    accel_std_transl: float = 0.005
    """Sequences: expected frame-to-frame acceleration of the translation, m/frame^2."""
    smooth: bool = True
    """Sequences: temporal smoothness on (False fits every frame on its own, shape still shared)."""
    camera_iters: int = 100
    """Most L-BFGS iterations of stage A (2D); every stage stops earlier once converged."""
    pose_iters: int = 150
    """Most L-BFGS iterations of each pose stage (B)."""
    final_iters: int = 500
    """Most L-BFGS iterations of stage C."""
    orientation_hypotheses: int = 4
    """2D: starting orientations tried per frame (palm towards / away from the camera x tilted +/-)."""
    initial_poses: tuple[str, ...] = ("mean", "flat")
    """Starting hand poses tried (with every orientation): "mean" (the model's mean pose), "flat"."""
    pose_prior: PosePrior | GaussianMixturePrior | None = None
    """The pose prior; None: `PosePrior.from_model(model)`."""

    def __post_init__(self):
        if self.order not in ("openpose", "mano"):
            raise KeypointFitError(f"order must be 'openpose' or 'mano', got {self.order!r}")
        for name in ("kernel_3d", "kernel_2d"):
            if getattr(self, name) not in ("l1", "l2"):
                raise KeypointFitError(f"{name} must be 'l1' or 'l2', got {getattr(self, name)!r}")
        if self.robust not in ("geman-mcclure", "none"):
            raise KeypointFitError(f"robust must be 'geman-mcclure' or 'none', got {self.robust!r}")
        for name in ("sigma_3d", "sigma_2d", "robust_scale", "accel_std_pose", "accel_std_transl"):
            if not getattr(self, name) > 0:
                raise KeypointFitError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.pose_prior_weights:
            raise KeypointFitError("pose_prior_weights needs at least one stage")
        if not self.initial_poses or any(p not in ("mean", "flat") for p in self.initial_poses):
            raise KeypointFitError(
                f"initial_poses must be a non-empty tuple of 'mean'/'flat', got {self.initial_poses!r}"
            )
        if self.orientation_hypotheses not in (1, 2, 4):
            raise KeypointFitError(f"orientation_hypotheses must be 1, 2 or 4, got {self.orientation_hypotheses}")

    def to_dict(self) -> dict:
        """The configuration as plain JSON-able values (the pose prior only by its type)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "pose_prior"}
        out["pose_prior_weights"] = list(self.pose_prior_weights)
        out["initial_poses"] = list(self.initial_poses)
        out["pose_prior"] = type(self.pose_prior).__name__ if self.pose_prior is not None else "PosePrior.from_model"
        return out


# ------------------------------------------------------------------------------------------ objective terms


def keypoint_term(pred, obs, conf, *, kernel: str, robust: str, sigma: float, robust_scale: float) -> jax.Array:
    """Confidence-weighted robust keypoint error: (*, K, D) predictions and observations, (*, K) weights ->
    (*,) sum over keypoints of conf * rho(kernel((pred - obs) / sigma)).

    kernel "l2": sum of squared coordinates; "l1": sum of absolute coordinates, smoothed within one noise
    unit (Charbonnier, sqrt(r^2 + 1) - 1: quadratic for small residuals, so a quasi-Newton solver converges
    to the noise level instead of chattering about a kink). rho: Geman-McClure c b / (c + b) with
    c = robust_scale^2 (L2) or D x robust_scale (L1): unchanged for small residuals, saturating at c
    for large ones; "none": b.
    """
    r = (pred - obs) / sigma
    if kernel == "l2":
        b, c = jnp.sum(r**2, axis=-1), robust_scale**2
    else:
        b, c = jnp.sum(jnp.sqrt(r**2 + 1.0) - 1.0, axis=-1), robust_scale * r.shape[-1]
    if robust == "geman-mcclure":
        b = c * b / (c + b)
    return jnp.sum(conf * b, axis=-1)


def biomech_term(limits: biomech.BiomechLimits, keypoints: jax.Array) -> jax.Array:
    """(*, 21, 3) OpenPose-order keypoints -> (*,) bone-length, root-bone-angle and palm-curvature penalties
    (Spurr et al.; normalised lengths and radians, squared excess). Joint angles are left to the pose-space
    `JointLimits`, which see the twist too."""
    norm, _ = biomech.normalize_keypoints(keypoints)
    lengths = biomech.interval_penalty(biomech.bone_lengths(norm), limits.bone_length)
    root = biomech.interval_penalty(biomech.root_bone_angles(keypoints), limits.root_angle)
    curvature = biomech.interval_penalty(biomech.palm_curvature(keypoints, side=limits.side), limits.curvature)
    return jnp.sum(lengths, -1) + jnp.sum(root, -1) + jnp.sum(curvature, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Capsules:
    """Capsule proxies of the 15 finger bones (`FINGER_BONES`), for the interpenetration penalty."""

    radii: jax.Array
    """(15,) capsule radii, metres."""
    pairs: jax.Array
    """(P, 2) int32 bone pairs that must not overlap (bones of different fingers)."""

    @classmethod
    def from_model(cls, model, *, percentile: float = 50.0) -> "Capsules":
        """Radii from the mesh: for each finger bone, the `percentile` of the distances from the rest bone
        segment to the vertices skinned mostly to its joint; then all radii are scaled down together, if
        needed, so that no two capsules overlap in the rest pose (fingers that touch at rest are allowed)."""
        v = np.asarray(model.v_template, np.float64)
        joints = np.asarray(model.J_regressor, np.float64) @ v
        kp = np.concatenate([joints, v[list(model.tip_ids)]])[list(OPENPOSE_ORDER)]
        owner = np.argmax(np.asarray(model.weights), axis=1)
        joint_of_keypoint = np.asarray(OPENPOSE_ORDER)
        radii = []
        for a, b in FINGER_BONES:
            near = v[owner == joint_of_keypoint[a]]
            if len(near) == 0:
                raise KeypointFitError(
                    f"model {model.name!r}: no vertex is skinned mainly to joint {joint_of_keypoint[a]}"
                )
            d = np.asarray(_point_distance(jnp.asarray(kp[a]), jnp.asarray(kp[b]), jnp.asarray(near)))
            radii.append(np.percentile(d, percentile))
        radii = np.asarray(radii)
        finger = np.repeat(np.arange(5), 3)
        pairs = np.array([(i, j) for i in range(15) for j in range(i + 1, 15) if finger[i] != finger[j]], np.int32)
        starts, ends = kp[[a for a, _ in FINGER_BONES]], kp[[b for _, b in FINGER_BONES]]
        i, j = pairs[:, 0], pairs[:, 1]
        dist = np.asarray(_segment_distance(starts[i], ends[i], starts[j], ends[j]))
        scale = min(1.0, float(np.min(dist / (radii[i] + radii[j]))))
        return cls(radii=jnp.asarray(radii * scale, model.dtype), pairs=jnp.asarray(pairs))


def segment_point_distance(a: jax.Array, b: jax.Array, points: jax.Array) -> jax.Array:
    """Distance from (N, 3) points to the segment a-b ((3,) each)."""
    ends = (jnp.broadcast_to(a, points.shape), jnp.broadcast_to(b, points.shape))
    return jnp.sqrt(closest_on_segment(points, *ends)[1])


def segment_distance(p0, p1, q0, q1) -> jax.Array:
    """Closest distance between segments p0-p1 and q0-q1, (*, 3) each -> (*,); differentiable.

    Minimises |p0 + s d1 - q0 - t d2| over s, t in [0, 1]: the unconstrained s is clamped, t follows and is
    clamped, then s is recomputed for the clamped t (exact for segments; parallel ones handled)."""
    d1, d2, r = p1 - p0, q1 - q0, p0 - q0
    a = jnp.sum(d1 * d1, -1)
    e = jnp.sum(d2 * d2, -1)
    f = jnp.sum(d2 * r, -1)
    c = jnp.sum(d1 * r, -1)
    b = jnp.sum(d1 * d2, -1)
    denom = a * e - b * b
    s = jnp.where(denom > 1e-12 * a * e + 1e-20, jnp.clip((b * f - c * e) / jnp.maximum(denom, 1e-20), 0.0, 1.0), 0.0)
    t = (b * s + f) / jnp.maximum(e, 1e-20)
    t_clamped = jnp.clip(t, 0.0, 1.0)
    s = jnp.where(t == t_clamped, s, jnp.clip((b * t_clamped - c) / jnp.maximum(a, 1e-20), 0.0, 1.0))
    diff = r + s[..., None] * d1 - t_clamped[..., None] * d2
    return jnp.sqrt(jnp.sum(diff**2, -1) + 1e-18)


_point_distance = jax.jit(segment_point_distance)
_segment_distance = jax.jit(segment_distance)


def interpenetration_term(capsules: Capsules, keypoints: jax.Array) -> jax.Array:
    """(*, 21, 3) OpenPose-order keypoints (metres) -> (*,) sum over capsule pairs of different fingers of
    the squared overlap max(0, r_i + r_j - distance)^2, in mm^2."""
    starts = keypoints[..., jnp.asarray([a for a, _ in FINGER_BONES]), :]
    ends = keypoints[..., jnp.asarray([b for _, b in FINGER_BONES]), :]
    i, j = capsules.pairs[:, 0], capsules.pairs[:, 1]
    dist = segment_distance(starts[..., i, :], ends[..., i, :], starts[..., j, :], ends[..., j, :])
    reach = jnp.broadcast_to(capsules.radii[i] + capsules.radii[j], dist.shape)
    return jnp.sum((1000.0 * jnp.maximum(reach - dist, 0.0)) ** 2, axis=-1)


def smoothness_term(x: jax.Array, std: float) -> jax.Array:
    """(T, D) per-frame parameters -> scalar: sum of squared second differences (first differences for two
    frames) divided by std^2 (the expected acceleration per frame^2)."""
    if x.shape[0] < 2:
        return jnp.zeros((), x.dtype)
    d = x[1:] - x[:-1] if x.shape[0] == 2 else x[2:] - 2 * x[1:-1] + x[:-2]
    return jnp.sum(d**2) / std**2


# --------------------------------------------------------------------------------------------- problem setup


# The solver's translation and image-offset variables are in these units: L-BFGS starts from an identity
# Hessian guess, so every variable should move the objective about as much as a radian of joint angle.
# (Depth seen through a pinhole moves the keypoints far less: its unit grows with the distance.)
_TRANSL_UNIT = 0.02  # metres
_OFFSET_UNIT = 20.0  # pixels
# Stages A and B start far from the solution, where a tight robustifier would ignore the very keypoints
# that must pull the hand into place: they saturate this many times farther out than stage C.
_FAR = 10.0
# L-BFGS stops when the objective's relative decrease stays below this.
_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What the compiled objective depends on statically (everything else is data, so that fits with other
    settings, cameras or stages reuse one compiled solver)."""

    image: bool  # 2D keypoints seen through a camera
    kernel: str
    robust: str


def _transl(params: dict, data: dict) -> jax.Array:
    """(T, 3) translation in metres from the solver's scaled variable."""
    return params["transl"] * jnp.broadcast_to(data["transl_unit"], params["transl"].shape)


def _predict(params: dict, data: dict, setup: _Setup):
    """Model keypoints (T, 21, 3) in OpenPose order (camera frame for 2D) and, for 2D, their projections."""
    t = params["hand_pose"].shape[0]
    betas = jnp.broadcast_to(params["betas"], (t, params["betas"].shape[-1]))
    kp = forward(data["kp_model"], hand_pose=params["hand_pose"], betas=betas, global_orient=params["global_orient"],
                 transl=_transl(params, data), keypoint_order="openpose").keypoints  # fmt: skip
    if not setup.image:
        return kp, kp
    weak = WeakPerspectiveCamera(jnp.exp(params["log_scale"]), params["offset"] * _OFFSET_UNIT).project(kp)
    return kp, jnp.where(data["weak"] > 0, weak, project_camera_points(kp, data["K"]))


def _objective(params: dict, data: dict, weights: dict, setup: _Setup):
    """(total, per-frame totals (T,), per-term per-frame values dict)."""
    kp, pred = _predict(params, data, setup)
    conf = data["conf"] * jnp.broadcast_to(data["kp_mask"], data["conf"].shape)
    terms = {
        "data": keypoint_term(pred, data["obs"], conf, kernel=setup.kernel, robust=setup.robust,
                              sigma=data["sigma"], robust_scale=weights["robust_scale"]),  # fmt: skip
        "pose_prior": data["pose_prior"].energy(params["hand_pose"]),
        "limits": data["limits"].penalty(params["hand_pose"], data["limit_margin"]),
        "biomech": biomech_term(data["biomech"], kp),
        "penetration": interpenetration_term(data["capsules"], kp),
    }
    per_frame = sum(weights[name] * value for name, value in terms.items())
    smooth = (
        smoothness_term(params["hand_pose"], data["accel_std_pose"])
        + smoothness_term(params["global_orient"], data["accel_std_pose"])
        + smoothness_term(_transl(params, data), data["accel_std_transl"])
    )
    total = jnp.sum(per_frame) + weights["shape"] * jnp.sum(shape_prior(params["betas"])) + weights["smooth"] * smooth
    return total, per_frame, terms


def _masked(params: dict, mask: dict) -> dict:
    """Parameters whose groups with mask 0 are constants for differentiation (frozen in this stage)."""
    return {k: mask[k] * v + (1 - mask[k]) * jax.lax.stop_gradient(v) for k, v in params.items()}


def _lbfgs(params, data, weights, mask, max_iters, setup: _Setup):
    """L-BFGS (optax, zoom line search) on the masked objective, until it stops decreasing (relative decrease
    below `_TOLERANCE` for 3 steps in a row) or after `max_iters` steps; a step that turns the parameters
    non-finite is refused (and counts as no progress)."""

    def loss(p):
        return _objective(_masked(p, mask), data, weights, setup)[0]

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        p, state, previous, stalled, i = carry
        value, grad = value_and_grad(p, state=state)
        updates, new_state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        new_p = optax.apply_updates(p, updates)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(new_p)]))
        p, state = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), (new_p, new_state), (p, state))
        small = previous - value <= _TOLERANCE * (1.0 + jnp.abs(value))
        return p, state, value, jnp.where(small, stalled + 1, 0), i + 1

    def keep_going(carry):
        *_, stalled, i = carry
        return (i < max_iters) & (stalled < 3)

    start = (params, opt.init(params), jnp.asarray(jnp.inf, data["sigma"].dtype), 0, 0)
    return jax.lax.while_loop(keep_going, step, start)[0]


_solve = jax.jit(_lbfgs, static_argnames=("setup",))


def _evaluate_impl(params, data, weights, setup: _Setup):
    _, per_frame, terms = _objective(params, data, weights, setup)
    kp, pred = _predict(params, data, setup)
    return per_frame, terms, kp, pred


_evaluate = jax.jit(_evaluate_impl, static_argnames=("setup",))


# ------------------------------------------------------------------------------------------------ inputs


def _prepare(keypoints, confidence, order: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked (T, 21, D) OpenPose-order keypoints (missing ones zero) and (T, 21) confidences."""
    try:
        kp = np.array(keypoints, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise KeypointFitError(f"keypoints: not a numeric array ({e})") from e
    if kp.ndim == 2:
        kp = kp[None]
    if kp.ndim != 3 or kp.shape[1] != 21 or kp.shape[2] not in (2, 3) or kp.shape[0] == 0:
        raise KeypointFitError(
            f"keypoints: expected shape (T, 21, 3), (T, 21, 2), (21, 3) or (21, 2), got {np.shape(keypoints)}"
        )
    t = kp.shape[0]
    if confidence is None:
        conf = np.ones((t, 21))
    else:
        try:
            conf = np.array(confidence, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise KeypointFitError(f"confidence: not a numeric array ({e})") from e
        if conf.shape == (21,):
            conf = np.broadcast_to(conf, (t, 21)).copy()
        if conf.shape != (t, 21):
            raise KeypointFitError(f"confidence: expected shape ({t}, 21) to match the keypoints, got {conf.shape}")
        if not np.all(np.isfinite(conf)) or np.any(conf < 0):
            bad = np.argwhere(~np.isfinite(conf) | (conf < 0))[0]
            raise KeypointFitError(
                f"confidence: must be finite and >= 0 (frame {bad[0]}, keypoint {bad[1]}: {conf[tuple(bad)]})"
            )
    # Missing detections are often NaN: they simply carry no weight.
    missing = ~np.all(np.isfinite(kp), axis=-1)
    conf = np.where(missing, 0.0, conf)
    kp = np.where(missing[..., None], 0.0, kp)
    if order == "mano":
        kp, conf = kp[:, list(OPENPOSE_ORDER)], conf[:, list(OPENPOSE_ORDER)]
    if not np.any(conf > 0):
        raise KeypointFitError("keypoints: no frame has a usable keypoint (all missing or zero confidence)")
    return kp, conf


def _rotvec(r: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(r).as_rotvec()


def _rest(kp_model) -> tuple[np.ndarray, np.ndarray]:
    """Rest keypoints (21, 3) of the mean shape in OpenPose order, posed with the mean hand pose, and J_0."""
    out = forward(kp_model, hand_pose=kp_model.hands_mean, keypoint_order="openpose")
    return np.asarray(out.keypoints, np.float64), np.asarray(kp_model.v_template[0], np.float64)


def _init_3d(obs, conf, rest, j0) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame global orientation and translation aligning the rest palm to the observed palm (Kabsch),
    falling back to all keypoints when fewer than 3 palm keypoints are seen, or to a neighbour's values."""
    t = len(obs)
    palm = np.zeros(21, bool)
    palm[list(PALM)] = True
    w = np.where((np.sum(conf[:, palm] > 0, axis=1) >= 3)[:, None], conf * palm, conf)
    r, trans, _ = (np.asarray(a, np.float64) for a in lbs.procrustes(jnp.asarray(rest), jnp.asarray(obs), jnp.asarray(w)))
    ok = np.sum(w > 0, axis=1) >= 3
    if not ok.any():
        raise KeypointFitError("keypoints: no frame has 3 or more usable keypoints to place the hand")
    nearest = np.array([np.flatnonzero(ok)[np.argmin(np.abs(np.flatnonzero(ok) - i))] for i in range(t)])
    r, trans = r[nearest], trans[nearest]
    # The model rotates about J_0: R (x - j0) + j0 + transl = R x + trans.
    return _rotvec(r), trans - j0 + np.einsum("tij,j->ti", r, j0)


def _hypothesis_rotations(obs, conf, rest, side: str, count: int) -> np.ndarray:
    """(T, H, 3, 3) starting orientations in the camera frame for 2D keypoints: fingers along the image
    direction wrist -> middle MCP, palm towards / away from the camera, tilted +-30 degrees."""
    rest_f = rest[9] - rest[0]
    rest_n = np.asarray(biomech.palm_normal(rest[0], rest[5], rest[17], side))
    f_m = rest_f / np.linalg.norm(rest_f)
    n_m = rest_n - (rest_n @ f_m) * f_m
    n_m /= np.linalg.norm(n_m)
    model_basis = np.stack([f_m, n_m, np.cross(f_m, n_m)], axis=1)
    seen = (conf[:, 0] > 0) & (conf[:, 9] > 0)
    centre = np.einsum("tk,tkc->tc", conf, obs) / np.maximum(conf.sum(1, keepdims=True), 1e-12)
    direction = np.where(seen[:, None], obs[:, 9] - obs[:, 0], centre - np.where(conf[:, :1] > 0, obs[:, 0], centre))
    direction = np.where(np.linalg.norm(direction, axis=1, keepdims=True) > 1e-9, direction, [0.0, -1.0])
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    facings = (-1.0, 1.0)[: 1 if count == 1 else 2]
    tilts = (0.0,) if count < 4 else (np.deg2rad(30.0), -np.deg2rad(30.0))
    out = []
    for facing in facings:
        for tilt in tilts:
            f = np.concatenate([direction, np.zeros((len(obs), 1))], axis=1)
            n = np.broadcast_to([0.0, 0.0, facing], f.shape)
            lateral = np.cross(f, n)
            # Tilt about the lateral axis: the fingers lean towards or away from the camera.
            f, n = np.cos(tilt) * f + np.sin(tilt) * n, -np.sin(tilt) * f + np.cos(tilt) * n
            out.append(np.einsum("tij,kj->tik", np.stack([f, n, lateral], axis=2), model_basis))
    return np.stack(out, axis=1)


def _init_2d(obs, conf, rest, j0, rotations, camera: str, K: np.ndarray | None):
    """Per (frame, hypothesis) translation (pinhole) or scale/offset (weak perspective): the depth comes
    from the ratio of the 3D palm size to its 2D size; the palm centroid lands on the observed one. Frames
    with fewer than 3 palm keypoints use all they have; frames with fewer than 2 keypoints take the
    placement of the nearest frame that has them."""
    t, h = rotations.shape[:2]
    palm = np.zeros(21, bool)
    palm[list(PALM)] = True
    w = np.where((np.sum(conf[:, palm] > 0, axis=1) >= 3)[:, None], conf * palm, conf)
    ok = np.sum(w > 0, axis=1) >= 2
    if not ok.any():
        raise KeypointFitError("keypoints: no frame has 2 or more usable keypoints to place the hand")
    nearest = np.array([np.flatnonzero(ok)[np.argmin(np.abs(np.flatnonzero(ok) - i))] for i in range(t)])
    w = w[nearest] / w[nearest].sum(axis=1, keepdims=True)
    obs = obs[nearest]
    c2 = np.einsum("tk,tkc->tc", w, obs)
    s2 = np.sqrt(np.einsum("tk,tk->t", w, np.sum((obs - c2[:, None]) ** 2, -1)))
    c3 = np.einsum("tk,kc->tc", w, rest)
    s3 = np.sqrt(np.einsum("tk,tk->t", w, np.sum((rest[None] - c3[:, None]) ** 2, -1)))
    s2 = np.maximum(s2, 1e-6)
    # Where the rotated rest centroid sits relative to the model's origin.
    centre = np.einsum("thij,tj->thi", rotations, c3 - j0) + j0
    if camera == "pinhole":
        focal = 0.5 * (K[0, 0] + K[1, 1])
        z = focal * s3 / s2
        target = np.stack([(c2[:, 0] - K[0, 2]) * z / K[0, 0], (c2[:, 1] - K[1, 2]) * z / K[1, 1], z], -1)
        return target[:, None] - centre, np.zeros((t, h)), np.zeros((t, h, 2))
    scale = s2 / s3
    offset = c2[:, None] - scale[:, None, None] * centre[..., :2]
    return np.zeros((t, h, 3)), np.broadcast_to(np.log(scale)[:, None], (t, h)).copy(), offset


# ------------------------------------------------------------------------------------------------ result


@dataclasses.dataclass(frozen=True)
class KeypointFitResult:
    """A keypoint fit: model parameters per frame (shape shared) and how well they explain the keypoints.

    For a pinhole camera the parameters are in world coordinates (the camera's extrinsics undone); for a
    weak-perspective camera in the camera frame (depth is unknown: `transl` is zero and `scale`/`offset`
    place the hand in the image); for 3D keypoints in the keypoints' frame. Metres throughout.
    """

    betas: np.ndarray
    """(S,) shape coefficients, or (T, S) with `shared_shape=False`."""
    global_orient: np.ndarray
    """(T, 3) axis-angle of the wrist, radians."""
    hand_pose: np.ndarray
    """(T, 45) axis-angle hand pose (flat-hand convention), radians."""
    transl: np.ndarray
    """(T, 3) translation, metres."""
    keypoints: np.ndarray
    """(T, 21, 3) fitted model keypoints in the input order, same frame as the parameters."""
    projected: np.ndarray | None
    """(T, 21, 2) fitted keypoints projected with the camera (2D fits), pixels; None for 3D."""
    frame_error: np.ndarray
    """(T,) mean distance of fitted to observed keypoints over keypoints with confidence > 0: metres (3D)
    or pixels (2D); NaN for a frame without keypoints."""
    frame_cost: np.ndarray
    """(T,) final objective per frame (without the shape prior and smoothness)."""
    camera: str
    """"none" (3D), "pinhole" or "weak-perspective"."""
    scale: np.ndarray | None = None
    """(T,) weak perspective: pixels per metre."""
    offset: np.ndarray | None = None
    """(T, 2) weak perspective: image position of the camera-frame origin, pixels."""
    hypothesis: np.ndarray | None = None
    """(T,) index of the start that won: orientation * len(initial_poses) + initial pose (see
    `KeypointFitConfig.orientation_hypotheses`, `initial_poses`)."""
    terms: dict = dataclasses.field(default_factory=dict)
    """Final value of each objective term per frame, name -> (T,) array."""
    model_name: str = ""
    side: str = "right"
    order: str = "openpose"
    """Keypoint order of `keypoints` / `projected` (that of the input)."""
    stage_times: dict = dataclasses.field(default_factory=dict)
    """Wall-clock seconds per stage ("init", "camera", "pose", "final", "total")."""
    config: dict = dataclasses.field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return self.hand_pose.shape[0]

    def to_registration_result(self, model):
        """The parameters as a `registration.RegistrationResult` (zero offsets for `model`'s vertices, scale
        1), for `save_result` and for posing with `posed_vertices`. `frame_residual` holds the 3D keypoint
        error (metres) for 3D fits, None for 2D."""
        from .result import RegistrationResult

        if self.betas.ndim != 1:
            raise ValueError("a fit with one shape per frame (shared_shape=False) is not a registration result")
        return RegistrationResult(
            betas=self.betas,
            offsets=np.zeros((model.num_vertices, 3)),
            global_orient=self.global_orient,
            hand_pose=self.hand_pose,
            transl=self.transl,
            model_name=self.model_name,
            side=self.side,
            frame_residual=self.frame_error if self.camera == "none" else None,
            frame_cost=self.frame_cost,
            stage_times=self.stage_times,
            config=self.config,
        )

    def vertices(self, model) -> np.ndarray:
        """(T, V, 3) posed meshes in the parameters' frame, metres."""
        dtype = model.dtype
        t = self.num_frames
        out = forward(model, hand_pose=jnp.asarray(self.hand_pose, dtype),
                      betas=jnp.asarray(np.broadcast_to(self.betas, (t, self.betas.shape[-1])), dtype),
                      global_orient=jnp.asarray(self.global_orient, dtype),
                      transl=jnp.asarray(self.transl, dtype))  # fmt: skip
        return np.asarray(out.vertices)


# ------------------------------------------------------------------------------------------------ the fit


def fit_keypoints(keypoints, *, confidence=None, camera=None, model=None, config: KeypointFitConfig | None = None,
                  ) -> KeypointFitResult:  # fmt: skip
    """Fit the hand model to 3D or 2D keypoints of one frame or a sequence.

    Args:
      keypoints: (T, 21, 3) 3D keypoints in metres, or (T, 21, 2) pixel keypoints; (21, D) for one frame.
        Order `config.order` (OpenPose/MediaPipe by default, or MANO's). NaN marks a missing keypoint.
        T > 1 is a sequence: one shape for all frames, temporal smoothness on pose and translation.
      confidence: (T, 21) or (21,) non-negative weights (detector scores); 0 ignores a keypoint.
      camera: None for 3D keypoints; for 2D a `PinholeCamera` (intrinsics, optional extrinsics) or
        "weak-perspective" (`camera.WEAK_PERSPECTIVE`: per-frame scale and offset are solved).
      model: the hand model (default: the bundled open right hand). Its side must match the keypoints'.
      config: `KeypointFitConfig`.

    Returns a `KeypointFitResult` (always with a frame axis, T = 1 for one frame). Raises
    `KeypointFitError` for unusable input.
    """
    from mano_jax.io import load_model

    config = config or KeypointFitConfig()
    started = time.perf_counter()
    model = load_model() if model is None else model
    if len(model.tip_ids) != 5:
        raise KeypointFitError(f"model {model.name!r} has no fingertip vertices (tip_ids), which keypoints need")
    obs, conf = _prepare(keypoints, confidence, config.order)
    t, _, dim = obs.shape
    if dim == 3 and camera is not None:
        raise KeypointFitError(
            "camera: 3D keypoints are fitted in their own frame; a camera is only used with 2D keypoints"
        )
    if dim == 2 and camera is None:
        raise KeypointFitError("camera: 2D keypoints need a camera (a PinholeCamera or 'weak-perspective')")
    if dim == 2 and not (isinstance(camera, PinholeCamera) or camera == WEAK_PERSPECTIVE):
        raise KeypointFitError(f"camera: expected a PinholeCamera or {WEAK_PERSPECTIVE!r}, got {camera!r}")
    kind = "none" if dim == 3 else ("pinhole" if isinstance(camera, PinholeCamera) else "weak")
    num_betas = min(config.num_betas, model.num_betas)
    dtype = model.dtype

    kp_model = biomech.keypoint_model(model)
    rest, j0 = _rest(kp_model)
    if dim == 3:
        _check_units(obs, conf, rest)
    data = {
        "kp_model": kp_model,
        "pose_prior": config.pose_prior if config.pose_prior is not None else PosePrior.from_model(model),
        "limits": JointLimits.default(model),
        "biomech": biomech.BiomechLimits.from_model(model, joint_regions="anatomical"),
        "capsules": Capsules.from_model(model),
        "K": jnp.asarray(np.asarray(camera.K) if kind == "pinhole" else np.eye(3), dtype),
        "weak": jnp.asarray(1.0 if kind == "weak" else 0.0, dtype),
        "kp_mask": jnp.ones(21, dtype),
        "sigma": jnp.asarray(config.sigma_3d if dim == 3 else config.sigma_2d, dtype),
        "limit_margin": jnp.asarray(np.deg2rad(config.limit_margin_deg), dtype),
        "accel_std_pose": jnp.asarray(config.accel_std_pose, dtype),
        "accel_std_transl": jnp.asarray(config.accel_std_transl, dtype),
    }
    setup = _Setup(image=dim == 2, kernel=config.kernel_3d if dim == 3 else config.kernel_2d, robust=config.robust)
    base_weights = {"data": 1.0, "pose_prior": config.pose_prior_weights[-1], "limits": config.limit_weight,
                    "biomech": config.biomech_weight, "penetration": config.penetration_weight,
                    "shape": config.shape_weight, "smooth": 1.0 if (config.smooth and t > 1) else 0.0,
                    "robust_scale": config.robust_scale}  # fmt: skip

    def weights(**changes):
        return {k: jnp.asarray(changes.get(k, v), dtype) for k, v in base_weights.items()}

    def mask(*free):
        return {k: jnp.asarray(1.0 if k in free else 0.0, dtype)
                for k in ("global_orient", "transl", "hand_pose", "betas", "log_scale", "offset")}  # fmt: skip

    times = {}
    # Stage A: camera / global placement.
    tick = time.perf_counter()
    if dim == 3:
        orient, transl = _init_3d(obs, conf, rest, j0)
        hyp = 1
        log_scale, offset = np.zeros((t, 1)), np.zeros((t, 1, 2))
        orient, transl = orient[:, None], transl[:, None]
    else:
        rotations = _hypothesis_rotations(obs, conf, rest, model.side, config.orientation_hypotheses)
        hyp = rotations.shape[1]
        transl, log_scale, offset = _init_2d(obs, conf, rest, j0, rotations, kind, np.asarray(data["K"]))
        orient = _rotvec(rotations.reshape(-1, 3, 3)).reshape(t, hyp, 3)
    # Every placement is tried with every starting hand pose: a finger can get stuck bent the wrong way
    # from one start but not from another.
    starts = np.stack([np.asarray(model.hands_mean, np.float64) if name == "mean" else np.zeros(45)
                       for name in config.initial_poses])  # fmt: skip
    orient, transl, log_scale, offset = (np.repeat(a, len(starts), axis=1) for a in (orient, transl, log_scale, offset))
    hyp *= len(starts)
    n = t * hyp
    transl_unit = np.full(3, _TRANSL_UNIT)
    if kind == "pinhole":
        transl_unit[2] = _TRANSL_UNIT * max(1.0, float(np.median(transl[..., 2])) / 0.1)
    data["transl_unit"] = jnp.asarray(transl_unit, dtype)
    params = {
        "global_orient": jnp.asarray(orient.reshape(n, 3), dtype),
        "transl": jnp.asarray(transl.reshape(n, 3) / transl_unit, dtype),
        "hand_pose": jnp.asarray(np.tile(starts, (n // len(starts), 1)), dtype),
        "betas": jnp.zeros(num_betas if config.shared_shape else (n, num_betas), dtype),
        "log_scale": jnp.asarray(log_scale.reshape(n), dtype),
        "offset": jnp.asarray(offset.reshape(n, 2) / _OFFSET_UNIT, dtype),
    }
    frame_data = dict(data, obs=jnp.asarray(np.repeat(obs, hyp, axis=0), dtype),
                      conf=jnp.asarray(np.repeat(conf, hyp, axis=0), dtype))  # fmt: skip
    place = ("global_orient", "log_scale", "offset") if kind == "weak" else ("global_orient", "transl")
    times["init"] = time.perf_counter() - tick
    tick = time.perf_counter()
    if dim == 2:
        palm_mask = np.zeros(21)
        palm_mask[list(PALM)] = 1.0
        params = _solve(params, dict(frame_data, kp_mask=jnp.asarray(palm_mask, dtype)),
                        weights(pose_prior=0.0, limits=0.0, biomech=0.0, penetration=0.0, smooth=0.0,
                                robust_scale=_FAR * config.robust_scale),
                               mask(*place), config.camera_iters, setup)  # fmt: skip
    jax.block_until_ready(params)
    times["camera"] = time.perf_counter() - tick

    # Stage B: pose with decreasing prior weights, frames independent, mean shape.
    tick = time.perf_counter()
    for w_pose in config.pose_prior_weights:
        # No interpenetration yet: a finger may have to pass another to reach its place.
        params = _solve(params, frame_data, weights(pose_prior=w_pose, penetration=0.0, smooth=0.0,
                                                    robust_scale=_FAR * config.robust_scale),
                               mask(*place, "hand_pose"), config.pose_iters, setup)  # fmt: skip
    if hyp > 1:
        per_frame, *_ = _evaluate(params, frame_data, weights(smooth=0.0), setup)
        best = np.argmin(np.asarray(per_frame).reshape(t, hyp), axis=1)
        pick = np.arange(t) * hyp + best
        params = {k: (v if (k == "betas" and config.shared_shape) else v[pick]) for k, v in params.items()}
    else:
        best = np.zeros(t, int)
    data = dict(data, obs=jnp.asarray(obs, dtype), conf=jnp.asarray(conf, dtype))
    jax.block_until_ready(params)
    times["pose"] = time.perf_counter() - tick

    # Stage C: everything together; shape shared, smoothness over the sequence.
    tick = time.perf_counter()
    free = (*place, "hand_pose") + (("betas",) if config.fit_shape else ())
    params = _solve(params, data, weights(), mask(*free), config.final_iters, setup)
    per_frame, terms, kp, pred = _evaluate(params, data, weights(), setup)
    times["final"] = time.perf_counter() - tick
    times["total"] = time.perf_counter() - started
    if not all(np.all(np.isfinite(np.asarray(v))) for v in params.values()):
        raise FloatingPointError("keypoint fit diverged to non-finite parameters")
    return _result(params, np.asarray(kp), np.asarray(pred), obs, conf, per_frame, terms, best,
                   kind, camera, j0, kp_model, model, config, times, data["transl_unit"])  # fmt: skip


def _check_units(obs, conf, rest) -> None:
    """3D keypoints must be metres: compare the wrist-to-middle-MCP length with the model's."""
    seen = (conf[:, 0] > 0) & (conf[:, 9] > 0)
    if not seen.any():
        return
    ratio = np.median(np.linalg.norm(obs[seen, 9] - obs[seen, 0], axis=-1)) / np.linalg.norm(rest[9] - rest[0])
    if not 0.2 < ratio < 5.0:
        hint = " (they look like millimetres: divide by 1000)" if 200 < ratio < 5000 else ""
        raise KeypointFitError(
            f"keypoints: the wrist-to-middle-MCP length is {ratio:.3g} times the model's; 3D keypoints must be "
            f"in metres{hint}"
        )


def _result(params, kp, pred, obs, conf, per_frame, terms, best, kind, camera, j0, kp_model, model, config, times,
            transl_unit):  # fmt: skip
    """Package the solution: undo the camera extrinsics, errors per frame, input keypoint order."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    valid = conf > 0
    err = np.linalg.norm(pred - obs, axis=-1)
    with np.errstate(invalid="ignore"):
        frame_error = np.where(valid.any(1), np.sum(err * valid, 1) / np.maximum(valid.sum(1), 1), np.nan)
    orient, transl = p["global_orient"], p["transl"] * np.asarray(transl_unit, np.float64)
    if kind == "pinhole":
        # Camera-frame hand: Rc (x - J0) + J0 + tc; world = R^T (camera - t).
        r, tc = np.asarray(camera.R, np.float64), np.asarray(camera.t, np.float64)
        j0_shaped = j0 + np.einsum("cs,...s->...c", np.asarray(kp_model.shapedirs[0, :, : p["betas"].shape[-1]]),
                                   p["betas"])  # fmt: skip
        rot = np.asarray(lbs.axis_angle_to_matrix(jnp.asarray(orient)))
        orient = _rotvec(np.einsum("ji,tjk->tik", r, rot))
        transl = np.einsum("ji,tj->ti", r, j0_shaped + transl - tc) - j0_shaped
        kp = np.einsum("ji,tkj->tki", r, kp - tc)
    back = list(MANO_FROM_OPENPOSE) if config.order == "mano" else slice(None)
    return KeypointFitResult(
        betas=p["betas"], global_orient=orient, hand_pose=p["hand_pose"], transl=transl,
        keypoints=kp[:, back], projected=None if kind == "none" else pred[:, back],
        frame_error=frame_error, frame_cost=np.asarray(per_frame, np.float64),
        camera={"none": "none", "pinhole": "pinhole", "weak": WEAK_PERSPECTIVE}[kind],
        scale=np.exp(p["log_scale"]) if kind == "weak" else None,
        offset=p["offset"] * _OFFSET_UNIT if kind == "weak" else None,
        hypothesis=best, terms={k: np.asarray(v, np.float64) for k, v in terms.items()},
        model_name=model.name, side=model.side, order=config.order, stage_times=times, config=config.to_dict(),
    )  # fmt: skip


def procrustes_error(a, b) -> float:
    """Mean distance between (K, 3) point sets after the best similarity transform of a onto b: the
    Procrustes-aligned keypoint error (PA-MPJPE) that hand-pose papers report, in b's units."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    rot, transl, scale = lbs.procrustes(a, b, solve_scale=True)
    return float(jnp.mean(jnp.linalg.norm(scale * a @ rot.T + transl[None, :] - b, axis=-1)))


def sample_plausible_hands(model, num: int, *, seed: int = 0, beta_std: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Random plausible hands for synthetic tests: (num, 45) poses and (num, S) betas.

    Poses are drawn from the model's PCA pose space (Gaussian with `hands_var` around `hands_mean`) and
    kept only if they respect the anatomical joint limits and no two fingers' capsules overlap; betas are
    N(0, beta_std^2). Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    limits, capsules = JointLimits.default(model), Capsules.from_model(model)
    kp_model = biomech.keypoint_model(model)
    std = np.sqrt(np.maximum(np.asarray(model.hands_var, np.float64), 0.0))
    components, mean = np.asarray(model.hands_components, np.float64), np.asarray(model.hands_mean, np.float64)
    check = jax.jit(lambda p: (limits.penalty(p), interpenetration_term(
        capsules, forward(kp_model, hand_pose=p, keypoint_order="openpose").keypoints)))
    kept = []
    for _ in range(100):
        poses = (rng.normal(size=(4 * num, 45)) * std) @ components + mean
        penalty, overlap = (np.asarray(a) for a in check(jnp.asarray(poses, model.dtype)))
        kept.extend(poses[(penalty == 0) & (overlap == 0)])
        if len(kept) >= num:
            return np.asarray(kept[:num]), rng.normal(0.0, beta_std, (num, model.num_betas))
    raise RuntimeError(f"model {model.name!r}: fewer than {num} of its PCA poses respect the joint limits")


# ------------------------------------------------------------------------------------------------ files

REPORT_FORMAT = "mano-jax-keypoint-fit-report/1"
#: Bones drawn in previews, OpenPose order: each finger's chain from the wrist.
SKELETON = tuple((0 if k == 0 else 4 * f + k, 4 * f + k + 1) for f in range(5) for k in range(4))


def load_keypoints(path, *, side: str = "right", with_confidence: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Read keypoints: (T, 21, D) array and (T, 21) confidences or None. Errors name the file.

    - `.npy`: the array; `.npz`: arrays `keypoints` and optionally `confidence`; `.json`: a nested list, or
      an object with "keypoints" (and "confidence"), or OpenPose's output for one frame;
    - a directory: one frame per file (`.json` OpenPose output or `.npy`), in natural sort order.
    OpenPose files give `hand_right_keypoints_2d` / `hand_left_keypoints_2d` (by `side`) of the most
    confident person; a frame without that hand gets zero confidence. `with_confidence`: the last column of
    an array is a confidence (x, y, c), as in OpenPose's flat lists.
    """
    import json
    from pathlib import Path

    from natsort import natsorted

    path = Path(path)
    if path.is_dir():
        files = natsorted([p for p in path.iterdir() if p.suffix.lower() in (".json", ".npy")], key=lambda p: p.name)
        if not files:
            raise KeypointFitError(f"{path}: no .json or .npy keypoint files in this directory")
        frames = [load_keypoints(f, side=side, with_confidence=with_confidence) for f in files]
        shapes = {f[0].shape[1:] for f in frames}
        if len(shapes) != 1:
            raise KeypointFitError(f"{path}: frames have different keypoint shapes {sorted(shapes)}")
        conf = [np.ones(f[0].shape[:2]) if f[1] is None else f[1] for f in frames]
        return np.concatenate([f[0] for f in frames]), np.concatenate(conf)
    if not path.exists():
        raise KeypointFitError(f"{path}: no such keypoint file")
    suffix = path.suffix.lower()
    conf = None
    try:
        if suffix == ".npy":
            kp = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "keypoints" not in data.files:
                    raise KeypointFitError(f"{path}: no array named 'keypoints' (found {', '.join(data.files)})")
                kp = data["keypoints"]
                conf = data["confidence"] if "confidence" in data.files else None
        elif suffix == ".json":
            content = json.loads(path.read_text())
            if isinstance(content, dict) and "people" in content:
                return _openpose_frame(content, side, path)
            if isinstance(content, dict):
                if "keypoints" not in content:
                    raise KeypointFitError(f"{path}: a JSON object needs 'keypoints' (or OpenPose's 'people')")
                kp, conf = content["keypoints"], content.get("confidence")
            else:
                kp = content
        else:
            raise KeypointFitError(
                f"{path}: unsupported keypoint file type {suffix!r} (.npy, .npz, .json or a directory)"
            )
        kp = np.asarray(kp, dtype=np.float64)
        conf = None if conf is None else np.asarray(conf, dtype=np.float64)
    except (OSError, ValueError, TypeError) as e:
        if isinstance(e, KeypointFitError):
            raise
        raise KeypointFitError(f"{path}: unreadable keypoint file ({e})") from e
    if kp.ndim == 2:
        kp = kp[None]
        conf = None if conf is None else conf.reshape(1, -1)
    if kp.ndim != 3 or kp.shape[1] != 21 or kp.shape[2] not in ((3, 4) if with_confidence else (2, 3)):
        want = "(T, 21, 3) or (T, 21, 4) with a confidence column" if with_confidence else "(T, 21, 2) or (T, 21, 3)"
        raise KeypointFitError(f"{path}: keypoints must have shape {want}, got {kp.shape}")
    if with_confidence:
        kp, conf = kp[..., :-1], kp[..., -1]
    return kp, conf


def _openpose_frame(content: dict, side: str, path) -> tuple[np.ndarray, np.ndarray]:
    key = f"hand_{side}_keypoints_2d"
    best, best_score = None, -1.0
    for person in content.get("people") or []:
        values = np.asarray(person.get(key) or [], dtype=np.float64)
        if values.size == 0:
            continue
        if values.size != 63:
            raise KeypointFitError(f"{path}: {key} has {values.size} values, expected 63 (21 x (x, y, confidence))")
        score = values.reshape(21, 3)[:, 2].mean()
        if score > best_score:
            best, best_score = values.reshape(21, 3), score
    if best is None:
        return np.zeros((1, 21, 2)), np.zeros((1, 21))
    return best[None, :, :2], best[None, :, 2]


def write_outputs(result: KeypointFitResult, out_dir, model, keypoints, confidence=None, camera=None, *,
                  mesh_format: str = "ply") -> dict:  # fmt: skip
    """Write a keypoint fit's output directory, like a registration's; return the report.

    `OUT/params.npz` (`registration.result.save_result`; `load_result` reads it), `meshes/frame_0000.ply` ...
    (the fitted meshes, metres, in the parameters' frame), `keypoints.npz` (observed and fitted keypoints,
    confidences, and for 2D the projections), `camera.json` (2D: the camera, with the solved per-frame
    scale/offset for weak perspective), `report.json` (per-frame keypoint error in mm or px, limit
    violations, timings) and `preview.png` (the fitted hand with the keypoints drawn on it). `keypoints` and
    `confidence` are the fit's inputs, in `result.order`. Every file is written atomically.
    """
    from pathlib import Path

    from mano_jax import export_mesh
    from mano_jax._atomic import atomic_path

    from .camera import camera_to_dict
    from .outputs import jitter_mm, write_json
    from .result import save_result

    if mesh_format not in ("ply", "obj"):
        raise ValueError(f"mesh_format must be 'ply' or 'obj', got {mesh_format!r}")
    out_dir = Path(out_dir)
    obs = np.asarray(keypoints, np.float64).reshape(result.num_frames, 21, -1)
    conf = np.ones(obs.shape[:2]) if confidence is None else np.broadcast_to(confidence, obs.shape[:2])
    conf = np.where(np.all(np.isfinite(obs), axis=-1), conf, 0.0)  # missing (NaN) keypoints, as in the fit
    vertices = result.vertices(model)
    if not np.isfinite(vertices).all():
        raise FloatingPointError("the keypoint fit poses to non-finite vertices; refusing to write meshes")
    save_result(result.to_registration_result(model), out_dir / "params.npz")
    arrays = {"observed": obs, "confidence": np.asarray(conf, np.float64), "fitted": result.keypoints}
    if result.projected is not None:
        arrays["projected"] = result.projected
    with atomic_path(out_dir / "keypoints.npz") as tmp:
        np.savez(tmp, order=np.array(result.order), **arrays)
    if result.camera == "pinhole":
        write_json(out_dir / "camera.json", camera_to_dict(camera))
    elif result.camera == WEAK_PERSPECTIVE:
        write_json(out_dir / "camera.json", {"type": WEAK_PERSPECTIVE, "scale": result.scale.tolist(),
                                             "offset": result.offset.tolist()})  # fmt: skip
    faces = np.asarray(model.faces)
    for t in range(result.num_frames):
        export_mesh(out_dir / "meshes" / f"frame_{t:04d}.{mesh_format}", vertices[t], faces)
    report = _report(result, conf, model, jitter_mm(result.keypoints) if result.camera == "none" else None)
    write_json(out_dir / "report.json", report)
    write_preview(out_dir / "preview.png", result, vertices, faces, obs, conf, camera)
    return report


def _report(result: KeypointFitResult, conf, model, jitter) -> dict:
    unit, factor = ("px", 1.0) if result.projected is not None else ("mm", 1000.0)
    limits = JointLimits.default(model)
    violations = limits.violations(jnp.asarray(result.hand_pose, model.dtype), tolerance_deg=0.1)
    per_frame_violations = np.bincount([v["frame"] for v in violations], minlength=result.num_frames)
    frames = []
    for t in range(result.num_frames):
        err = result.frame_error[t]
        frames.append({
            "index": t,
            f"mean_error_{unit}": None if np.isnan(err) else float(factor * err),
            "keypoints_used": int(np.sum(conf[t] > 0)),
            "cost": float(result.frame_cost[t]),
            "limit_violations": int(per_frame_violations[t]),
            **({"start": int(result.hypothesis[t])} if result.hypothesis is not None else {}),
        })  # fmt: skip
    errors = factor * result.frame_error[~np.isnan(result.frame_error)]
    return {
        "format": REPORT_FORMAT,
        "model": result.model_name,
        "side": result.side,
        "camera": result.camera,
        "keypoint_order": result.order,
        "num_frames": result.num_frames,
        "error_unit": unit,
        "summary": {
            f"mean_error_{unit}": float(errors.mean()) if len(errors) else None,
            f"median_error_{unit}": float(np.median(errors)) if len(errors) else None,
            f"worst_frame_error_{unit}": float(errors.max()) if len(errors) else None,
            "limit_violations": len(violations),
            "keypoint_jitter_mm_per_frame2": jitter,
        },
        "frames": frames,
        "violations": violations[:100],
        "stage_times": {k: float(v) for k, v in result.stage_times.items()},
        "config": result.config,
    }


def write_preview(path, result: KeypointFitResult, vertices, faces, obs, conf, camera=None, *, frames=3) -> None:
    """`preview.png`: the first, middle and last frames, the fitted hand with the observed keypoints (red)
    and the fitted ones (blue, with the skeleton) drawn on it; 2D fits are drawn in the image."""
    # A bare Figure renders headless without switching pyplot's backend (which would break a notebook).
    from matplotlib.figure import Figure

    from mano_jax._atomic import atomic_path
    from mano_jax.viz import plot_mesh

    t_total = result.num_frames
    shown = sorted({0, t_total // 2, t_total - 1})[:frames]
    fig = Figure(figsize=(4.0 * len(shown), 4.2))
    axes = fig.subplots(1, len(shown), squeeze=False)
    to_openpose = list(OPENPOSE_ORDER) if result.order == "mano" else slice(None)
    for ax, t in zip(axes[0], shown):
        if result.projected is None:
            # A 3D fit seen from its palm side: plot_mesh looks from +z, so turn the hand towards +z.
            rot = plot_mesh(ax, vertices[t], faces, view=(0.0, 0.0))
            fitted, observed = result.keypoints[t] @ rot.T, obs[t] @ rot.T
        else:
            image = _image_vertices(result, t, vertices[t], camera)
            plot_mesh(ax, image, faces, view=(0.0, 0.0))
            fitted = np.concatenate([result.projected[t], np.zeros((21, 1))], 1) * [1, -1, 1]
            observed = np.concatenate([obs[t], np.zeros((21, 1))], 1) * [1, -1, 1]
        fitted, observed, seen = fitted[to_openpose], observed[to_openpose], conf[t][to_openpose] > 0
        for a, b in SKELETON:
            ax.plot(*fitted[[a, b], :2].T, color="tab:blue", lw=1.2, zorder=4)
        ax.scatter(*fitted[:, :2].T, s=10, c="tab:blue", zorder=5, label="fitted")
        ax.scatter(*observed[seen, :2].T, s=14, c="tab:red", marker="x", zorder=6, label="observed")
        err = result.frame_error[t] * (1.0 if result.projected is not None else 1000.0)
        unit = "px" if result.projected is not None else "mm"
        ax.set_title(f"frame {t}: mean keypoint error {err:.2f} {unit}", fontsize=9)
        lo = np.minimum(fitted[:, :2].min(0), observed[seen, :2].min(0, initial=np.inf))
        hi = np.maximum(fitted[:, :2].max(0), observed[seen, :2].max(0, initial=-np.inf))
        pad = 0.15 * (hi - lo).max()
        ax.set_xlim(lo[0] - pad, hi[0] + pad)
        ax.set_ylim(lo[1] - pad, hi[1] + pad)
    axes[0, 0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def _image_vertices(result: KeypointFitResult, t: int, vertices: np.ndarray, camera) -> np.ndarray:
    """Mesh vertices as (u, -v, -depth): drawn by `plot_mesh` from +z, it looks like the image (v down)
    with nearer triangles on top."""
    if result.camera == "pinhole":
        cam = np.einsum("ij,vj->vi", np.asarray(camera.R), vertices) + np.asarray(camera.t)
        uv = np.asarray(project_camera_points(jnp.asarray(cam), camera.K))
    else:
        cam = vertices
        uv = result.scale[t] * vertices[:, :2] + result.offset[t]
    return np.stack([uv[:, 0], -uv[:, 1], -cam[:, 2] * 1000.0], axis=1)
