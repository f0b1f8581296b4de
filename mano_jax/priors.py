"""Priors on MANO parameters: pose priors, anatomical joint-angle limits, and the shape prior.

- `PosePrior`: squared Mahalanobis distance in a PCA pose space (the model's own `hands_components`,
  `hands_mean`, `hands_var`, or one learnt from any pose set).
- `GaussianMixturePrior`: SMPLify's mixture of Gaussians, energy = the minimum over components of the
  negative log-likelihood; fitted by EM to any (N, 45) pose set.
- `JointLimits`: per finger joint, flexion/abduction limited to a convex polygon (co-dependent angles)
  and twist limited to an interval, all measured in per-joint frames derived from the model's rest joints
  (so any MANO-layout model works, whatever its coordinate axes). Sources of the limits and the angle
  conventions: `mano_jax.biomech`.
- `shape_prior`: ||betas||^2.

All priors are frozen dataclasses registered as JAX pytrees: they pass through `jax.jit` as arguments.
Poses are absolute axis-angle hand poses (*, 45) in radians, i.e. what `forward(..., flat_hand_mean=True)`
takes (add `model.hands_mean` first to a pose given relative to the mean hand).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import biomech, lbs
from .model import JOINT_NAMES, ManoModel


def _pose_array(hand_pose, dtype) -> jax.Array:
    hand_pose = jnp.asarray(hand_pose, dtype=dtype)
    if hand_pose.ndim == 0 or hand_pose.shape[-1] != 45:
        raise ValueError(f"hand_pose: expected shape (*, 45) axis-angle, got {tuple(hand_pose.shape)}")
    return hand_pose


def _check_poses(poses, min_count: int) -> np.ndarray:
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 2 or poses.shape[1] != 45:
        raise ValueError(f"poses: expected an (N, 45) array of axis-angle hand poses, got {poses.shape}")
    if poses.shape[0] < min_count:
        raise ValueError(f"poses: need at least {min_count} poses, got {poses.shape[0]}")
    if not np.all(np.isfinite(poses)):
        raise ValueError("poses: contains NaN or infinite values")
    return poses


def shape_prior(betas: jax.Array) -> jax.Array:
    """||betas||^2 over the last axis: (*, S) -> (*,). Betas are in units of the shape space's std."""
    return jnp.sum(jnp.asarray(betas) ** 2, axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PosePrior:
    """Gaussian pose prior: energy = sum_k c_k^2 / var_k, with c = (hand_pose - mean) @ projection."""

    mean: jax.Array
    """(45,) mean pose, axis-angle radians."""
    projection: jax.Array
    """(45, K) maps a centred pose to its K PCA coefficients (pseudo-inverse of the component rows)."""
    var: jax.Array
    """(K,) variance of each coefficient, radians^2 (floored to stay positive)."""

    @classmethod
    def from_model(cls, model: ManoModel, num_comps: int | None = None, *, min_std: float = 0.05) -> "PosePrior":
        """The model's PCA pose space: mean `hands_mean`, basis `hands_components`, variances `hands_var`.

        The component rows need not be orthonormal (official MANO's are not), so coefficients come from
        the pseudo-inverse, as in `conventions.axis_angle_to_pca`. Standard deviations are floored at
        `min_std` (radians): directions the pose set behind the basis never used (the open hand's synthetic
        poses have no twist, for instance) are then unlikely, not forbidden.
        """
        k = 45 if num_comps is None else num_comps
        if not 1 <= k <= 45:
            raise ValueError(f"num_comps must be between 1 and 45, got {num_comps}")
        components = np.asarray(model.hands_components, np.float64)[:k]
        var = np.asarray(model.hands_var, np.float64)[:k]
        if not np.all(np.isfinite(var)) or var.max() <= 0:
            raise ValueError(f"model {model.name!r}: hands_var must hold positive variances, got {var[:5]}...")
        dtype = model.dtype
        return cls(
            mean=jnp.asarray(model.hands_mean, dtype),
            projection=jnp.asarray(np.linalg.pinv(components), dtype),
            var=jnp.asarray(np.maximum(var, min_std**2), dtype),
        )

    @classmethod
    def from_poses(cls, poses, num_comps: int | None = None, *, dtype=jnp.float32) -> "PosePrior":
        """PCA of an (N, 45) set of axis-angle poses (at least 2); `num_comps` defaults to min(45, N - 1)."""
        poses = _check_poses(poses, 2)
        k = min(45, poses.shape[0] - 1) if num_comps is None else num_comps
        if not 1 <= k <= min(45, poses.shape[0] - 1):
            raise ValueError(f"num_comps must be between 1 and {min(45, poses.shape[0] - 1)}, got {num_comps}")
        mean = poses.mean(axis=0)
        _, s, vt = np.linalg.svd(poses - mean, full_matrices=False)
        var = s[:k] ** 2 / (poses.shape[0] - 1)
        return cls(
            mean=jnp.asarray(mean, dtype),
            projection=jnp.asarray(vt[:k].T, dtype),
            var=jnp.asarray(np.maximum(var, 1e-6 * var.max()), dtype),
        )

    def residuals(self, hand_pose: jax.Array) -> jax.Array:
        """(*, 45) -> (*, K) whitened coefficients; `energy` is their sum of squares (for least squares)."""
        hand_pose = _pose_array(hand_pose, self.mean.dtype)
        centred = hand_pose - jnp.broadcast_to(self.mean, hand_pose.shape)
        coeffs = centred @ self.projection
        return coeffs / jnp.broadcast_to(jnp.sqrt(self.var), coeffs.shape)

    def energy(self, hand_pose: jax.Array) -> jax.Array:
        """(*, 45) axis-angle -> (*,) squared Mahalanobis distance (dimensionless)."""
        return jnp.sum(self.residuals(hand_pose) ** 2, axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixturePrior:
    """SMPLify's max-mixture pose prior: energy = min_k [ 0.5 (x - mu_k)^T Sigma_k^-1 (x - mu_k)
    - log w_k + 0.5 log det Sigma_k ] - (the smallest of the constant parts), so the energy is >= 0."""

    means: jax.Array
    """(K, 45) component means, axis-angle radians."""
    precision_chol: jax.Array
    """(K, 45, 45) P_k with Sigma_k^-1 = P_k P_k^T, so the Mahalanobis distance is |(x - mu_k) P_k|^2."""
    constants: jax.Array
    """(K,) -log w_k + 0.5 log det Sigma_k, minus its minimum over k."""

    @classmethod
    def fit(
        cls,
        poses,
        num_components: int = 8,
        *,
        seed: int = 0,
        max_iter: int = 200,
        tol: float = 1e-6,
        reg: float = 1e-4,
        dtype=jnp.float32,
    ) -> "GaussianMixturePrior":
        """Fit by expectation-maximisation to an (N, 45) pose set (k-means++ start, full covariances).

        `reg` (radians^2) is added to every covariance's diagonal, which keeps components of few poses
        well conditioned. Deterministic for a given `seed`.
        """
        x = _check_poses(poses, num_components)
        n, d = x.shape
        rng = np.random.default_rng(seed)
        # k-means++ seeding, then responsibilities from the nearest centre.
        centres = [x[rng.integers(n)]]
        for _ in range(1, num_components):
            d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
            centres.append(x[rng.choice(n, p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(n)])
        d2 = ((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1)
        resp = np.eye(num_components)[np.argmin(d2, axis=1)]
        previous = -np.inf
        for _ in range(max_iter):
            weights, means, chols = _m_step(x, resp, reg)
            log_prob = _log_gauss(x, means, chols) + np.log(weights)
            top = log_prob.max(axis=1, keepdims=True)
            log_norm = top + np.log(np.exp(log_prob - top).sum(axis=1, keepdims=True))
            resp = np.exp(log_prob - log_norm)
            mean_ll = float(log_norm.mean())
            if mean_ll - previous < tol * max(1.0, abs(mean_ll)):
                break
            previous = mean_ll
        weights, means, chols = _m_step(x, resp, reg)
        precision_chol = np.linalg.inv(chols).transpose(0, 2, 1)
        constants = -np.log(weights) + np.log(np.diagonal(chols, axis1=1, axis2=2)).sum(axis=1)
        return cls(
            means=jnp.asarray(means, dtype),
            precision_chol=jnp.asarray(precision_chol, dtype),
            constants=jnp.asarray(constants - constants.min(), dtype),
        )

    def component_energies(self, hand_pose: jax.Array) -> jax.Array:
        """(*, 45) -> (*, K) negative log-likelihood of each weighted component (up to one constant)."""
        hand_pose = _pose_array(hand_pose, self.means.dtype)
        batch = hand_pose.shape[:-1]
        k = self.means.shape[0]
        diff = jnp.broadcast_to(hand_pose[..., None, :], (*batch, k, 45)) - jnp.broadcast_to(
            self.means, (*batch, k, 45)
        )
        z = jnp.einsum("...kd,kde->...ke", diff, self.precision_chol)
        return 0.5 * jnp.sum(z**2, axis=-1) + jnp.broadcast_to(self.constants, (*batch, k))

    def energy(self, hand_pose: jax.Array) -> jax.Array:
        """(*, 45) -> (*,) min over components (the "max-mixture" approximation of SMPLify)."""
        return jnp.min(self.component_energies(hand_pose), axis=-1)


def _m_step(x: np.ndarray, resp: np.ndarray, reg: float):
    nk = resp.sum(axis=0) + 1e-10
    weights = nk / nk.sum()
    means = resp.T @ x / nk[:, None]
    chols = []
    for k in range(len(nk)):
        diff = x - means[k]
        cov = (resp[:, k, None] * diff).T @ diff / nk[k] + reg * np.eye(x.shape[1])
        chols.append(np.linalg.cholesky(cov))
    return weights, means, np.asarray(chols)


def _log_gauss(x: np.ndarray, means: np.ndarray, chols: np.ndarray) -> np.ndarray:
    """(N, K) log N(x_n; mu_k, L_k L_k^T)."""
    import scipy.linalg

    d = x.shape[1]
    out = np.empty((x.shape[0], len(means)))
    for k, (mu, chol) in enumerate(zip(means, chols)):
        z = scipy.linalg.solve_triangular(chol, (x - mu).T, lower=True)
        out[:, k] = -0.5 * (z**2).sum(0) - np.log(np.diag(chol)).sum() - 0.5 * d * np.log(2 * np.pi)
    return out


# ------------------------------------------------------------------------------------ joint limits


def rest_frames(model: ManoModel, *, thumb_tilt_deg: float = biomech.THUMB_TILT_DEG) -> np.ndarray:
    """(15, 3, 3) rest frames (rows along, palmar, lateral) of MANO joints 1..15, from the model's rest
    joints (`J_regressor @ v_template`) and fingertip vertices.

    `along` is the rest direction of the bone the joint rotates (joint -> child joint, or -> fingertip for
    the distal joints; without `tip_ids`, the middle phalanx direction is reused); `palmar` the palm
    normal (see `biomech.palm_normal`), tilted for the thumb; `lateral` towards the thumb.
    """
    v = np.asarray(model.v_template, np.float64)
    joints = np.asarray(model.J_regressor, np.float64) @ v
    children = []
    for finger, chain in enumerate(biomech.MANO_FINGER_JOINTS):
        for level, j in enumerate(chain):
            if level < 2:
                children.append(joints[chain[level + 1]])
            elif model.tip_ids:
                children.append(v[model.tip_ids[finger]])
            else:
                children.append(joints[j] + (joints[j] - joints[chain[1]]))
    starts = joints[np.asarray(biomech.MANO_FINGER_JOINTS).ravel()]
    frames = np.asarray(_frames_from_bones(joints, starts, np.stack(children), model.side, float(thumb_tilt_deg)))
    # Finger-major (thumb, index, ...) -> MANO joint order 1..15.
    return frames[np.argsort(np.asarray(biomech.MANO_FINGER_JOINTS).ravel())]


@functools.partial(jax.jit, static_argnums=(3, 4))
def _frames_from_bones(joints, starts, ends, side: str, thumb_tilt_deg: float) -> jax.Array:
    normal = biomech.palm_normal(joints[0], joints[1], joints[7], side)
    frames = biomech.finger_frame(ends - starts, jnp.broadcast_to(normal, starts.shape), side)
    thumb = biomech.finger_frame(ends[:3] - starts[:3], biomech.tilt_thumb_palmar(frames[:3], thumb_tilt_deg), side)
    return jnp.concatenate([thumb, frames[3:]])


def _half_sinc(theta_sq: jax.Array) -> jax.Array:
    """sin(t/2)/t as a function of t^2, with finite derivatives at 0 (Taylor series there)."""
    small = theta_sq < 1e-4
    theta = jnp.sqrt(jnp.where(small, 1.0, theta_sq))
    return jnp.where(small, 0.5 - theta_sq / 48.0, jnp.sin(0.5 * theta) / theta)


def twist_angle(axis_angle: jax.Array, axis: jax.Array) -> jax.Array:
    """Twist (radians, in (-pi, pi]) of (*, 3) axis-angle rotations about unit (*, 3) axes: the rotation
    about `axis` left after removing the swing that moves `axis` (swing-twist decomposition)."""
    theta_sq = jnp.sum(axis_angle**2, axis=-1)
    small = theta_sq < 1e-4
    w = jnp.where(small, 1.0 - theta_sq / 8.0, jnp.cos(0.5 * jnp.sqrt(jnp.where(small, 1.0, theta_sq))))
    v_along = _half_sinc(theta_sq) * jnp.sum(axis_angle * axis, axis=-1)
    # atan2(v w, w^2) = atan2(sign(w) v, |w|): picks the quaternion with w >= 0 without a branch.
    return 2.0 * jnp.arctan2(v_along * w, w**2)


def _handedness(frames: jax.Array) -> jax.Array:
    """+1 for right-hand frames, -1 for left (det of (along, palmar, lateral), since lateral points to the
    thumb): twist is counted in the same anatomical sense on both hands."""
    return jnp.sum(frames[..., 0, :] * jnp.cross(frames[..., 1, :], frames[..., 2, :]), axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JointLimits:
    """Anatomical limits on MANO's 15 finger joints, in per-joint frames from the model's rest pose.

    Angles of joint j (`angles`): flexion and abduction of the rotated rest bone direction R_j a_j in the
    joint's rest frame, and the twist of R_j about a_j (its sign mirrored for a left hand, so mirrored
    poses have equal angles). Zero angles = the flat rest pose.
    """

    frames: jax.Array
    """(15, 3, 3) per-joint rest frames, rows (along, palmar, lateral), unit vectors."""
    polygons: jax.Array
    """(15, P, 2) convex counter-clockwise (flexion, abduction) regions, radians."""
    twist: jax.Array
    """(15, 2) (min, max) twist, radians."""

    names = JOINT_NAMES[1:]

    @classmethod
    def default(cls, model: ManoModel, *, thumb_tilt_deg: float = biomech.THUMB_TILT_DEG) -> "JointLimits":
        """Literature ranges of motion (`biomech.ANATOMICAL_LIMITS_DEG`) in the model's rest frames."""
        dtype = model.dtype
        return cls(
            frames=jnp.asarray(rest_frames(model, thumb_tilt_deg=thumb_tilt_deg), dtype),
            polygons=jnp.asarray(biomech.default_polygons_rad(), dtype),
            twist=jnp.asarray(biomech.default_twist_rad(), dtype),
        )

    @classmethod
    def from_poses(cls, model: ManoModel, poses, *, margin_deg: float = 2.0) -> "JointLimits":
        """Limits learnt from an (N, 45) pose set: per joint the convex hull of the (flexion, abduction)
        samples (simplified to `biomech.POLYGON_SIZE` vertices) and the twist range, widened by
        `margin_deg` (as Spurr et al. learn theirs from data)."""
        poses = _check_poses(poses, 3)
        base = cls.default(model)
        angles = np.asarray(base.angles(jnp.asarray(poses, model.dtype)), np.float64)
        margin = np.deg2rad(margin_deg)
        twist = np.stack([angles[:, :, 2].min(0) - margin, angles[:, :, 2].max(0) + margin], -1)
        return dataclasses.replace(
            base,
            polygons=jnp.asarray(biomech.convex_polygons(angles[:, :, :2], margin=margin), model.dtype),
            twist=jnp.asarray(twist, model.dtype),
        )

    def angles(self, hand_pose: jax.Array) -> jax.Array:
        """(*, 45) axis-angle -> (*, 15, 3) (flexion, abduction, twist) in radians."""
        hand_pose = _pose_array(hand_pose, self.frames.dtype)
        batch = hand_pose.shape[:-1]
        aa = hand_pose.reshape(*batch, 15, 3)
        frames = jnp.broadcast_to(self.frames, (*batch, 15, 3, 3))
        along = frames[..., 0, :]
        direction = jnp.einsum("...ij,...j->...i", lbs.axis_angle_to_matrix(aa), along)
        flex_abd = biomech.flexion_abduction(direction, frames)
        twist = _handedness(frames) * twist_angle(aa, along)
        return jnp.concatenate([flex_abd, twist[..., None]], axis=-1)

    def pose_from_angles(self, angles: jax.Array) -> jax.Array:
        """(*, 15, 3) (flexion, abduction, twist) radians -> (*, 45) axis-angle; inverse of `angles`
        (for flexion in (-pi, pi) and |abduction| < pi/2)."""
        angles = jnp.asarray(angles, self.frames.dtype)
        batch = angles.shape[:-2]
        frames = jnp.broadcast_to(self.frames, (*batch, 15, 3, 3))
        along = frames[..., 0, :]
        direction = biomech.direction_from_angles(angles[..., :2], frames)
        axis = jnp.cross(along, direction)
        sin = jnp.sqrt(jnp.sum(axis**2, axis=-1, keepdims=True))
        cos = jnp.sum(along * direction, axis=-1, keepdims=True)
        safe = jnp.where(sin > 1e-12, sin, 1.0)
        swing = jnp.where(sin > 1e-12, axis / safe * jnp.arctan2(sin, cos), 0.0)
        twist = _handedness(frames)[..., None] * angles[..., 2:]
        rot = lbs.axis_angle_to_matrix(swing) @ lbs.axis_angle_to_matrix(twist * along)
        return lbs.matrix_to_axis_angle(rot).reshape(*batch, 45)

    def sample(self, key: jax.Array, shape: tuple[int, ...] = (), *, twist_fraction: float = 1.0) -> jax.Array:
        """(*shape, 45) random poses, uniform inside every joint's limits (twist range scaled by
        `twist_fraction`). Each joint is independent: the poses are anatomically valid, not typical."""
        return _sample(self, key, tuple(shape), twist_fraction)

    def _sample(self, key, shape, twist_fraction):
        k1, k2 = jax.random.split(key)
        flex_abd = biomech.polygon_samples(k1, self.polygons, shape)
        lo, hi = self.twist[:, 0] * twist_fraction, self.twist[:, 1] * twist_fraction
        u = jax.random.uniform(k2, (*shape, 15), dtype=self.frames.dtype)
        twist = jnp.broadcast_to(lo, u.shape) + u * jnp.broadcast_to(hi - lo, u.shape)
        return self.pose_from_angles(jnp.concatenate([flex_abd, twist[..., None]], axis=-1))

    def penalty(self, hand_pose: jax.Array, margin: float = 0.0) -> jax.Array:
        """(*, 45) -> (*,) sum over joints of the squared angular distance (radians^2) outside the limits;
        zero inside. With `margin` > 0 (radians) the limits are shrunk by it, so an optimum lands inside."""
        angles = self.angles(hand_pose)
        region, _ = biomech.polygon_distance(angles[..., :2], self.polygons, margin)
        twist = biomech.interval_penalty(angles[..., 2], self.twist, margin)
        return jnp.sum(region + twist, axis=-1)

    def excess(self, hand_pose: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(*, 45) -> ((*, 15) distance outside the (flexion, abduction) polygon, (*, 15) signed twist
        excess), radians; zeros mean within limits."""
        angles = self.angles(hand_pose)
        _, region = biomech.polygon_distance(angles[..., :2], self.polygons)
        return region, biomech.interval_excess(angles[..., 2], self.twist)

    def violations(self, hand_pose, *, tolerance_deg: float = 0.0) -> list[dict]:
        """Which limits a pose (or a batch, flattened) violates and by how much.

        Returns one dict per violation: `frame` (index in the flattened batch), `joint` (name), `limit`
        ("extension", "flexion", "abduction", "adduction" -- the direction in which the
        (flexion, abduction) region is left -- or "twist"), `amount_deg` (> `tolerance_deg`), and the
        joint's `flexion_deg`, `abduction_deg`, `twist_deg`. Abduction is towards the thumb.
        """
        hand_pose = _pose_array(hand_pose, self.frames.dtype)
        angles, (region, twist) = _angles_and_excess(self, hand_pose)
        angles = np.rad2deg(np.asarray(angles)).reshape(-1, 15, 3)
        region, twist = (np.rad2deg(np.asarray(a)).reshape(-1, 15) for a in (region, twist))
        poly = np.rad2deg(np.asarray(self.polygons))
        out = []
        for f, j in zip(*np.nonzero((region > tolerance_deg) | (np.abs(twist) > tolerance_deg))):
            flex, abd, tw = angles[f, j]
            base = dict(frame=int(f), joint=self.names[j], flexion_deg=float(flex),
                        abduction_deg=float(abd), twist_deg=float(tw))  # fmt: skip
            if region[f, j] > tolerance_deg:
                if flex > poly[j, :, 0].max():
                    kind = "flexion"
                elif flex < poly[j, :, 0].min():
                    kind = "extension"
                else:
                    kind = "abduction" if abd > 0 else "adduction"
                out.append(dict(base, limit=kind, amount_deg=float(region[f, j])))
            if abs(twist[f, j]) > tolerance_deg:
                out.append(dict(base, limit="twist", amount_deg=float(abs(twist[f, j]))))
        return out


_sample = jax.jit(JointLimits._sample, static_argnums=(2, 3))
_angles_and_excess = jax.jit(lambda limits, pose: (limits.angles(pose), limits.excess(pose)))
