"""Cameras for keypoint fitting: a pinhole camera (intrinsics, optional extrinsics) and a weak-perspective
camera, their projections, and the camera file format of `mano-jax fit-keypoints --camera FILE`.

Conventions (OpenCV's): camera x right, y down, z forward; world points X (metres) map to the camera as
X_c = R X + t; pixels u = fx X_c/Z_c + cx, v = fy Y_c/Z_c + cy. The weak-perspective camera is an
orthographic projection along the camera's z with one scale per frame: u = s X_c + ox, v = s Y_c + oy
(s in pixels per metre), the model used by Boukhayma et al. (CVPR 2019); keypoint fitting solves s and o.

Camera file (JSON), either

    {"fx": 1000, "fy": 1000, "cx": 320, "cy": 240, "R": [[1,0,0],[0,1,0],[0,0,1]], "t": [0, 0, 0]}

(`R` (3x3, world -> camera) and `t` (3, metres) optional, default identity and zero; "K": [[fx,0,cx],
[0,fy,cy],[0,0,1]] may replace fx..cy; optional "width", "height" in pixels for previews), or

    {"type": "weak-perspective"}

for a weak-perspective camera whose scale and offset are solved per frame.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CAMERA_FORMAT_HELP = (
    'a pinhole camera {"fx", "fy", "cx", "cy"} (or "K": 3x3) with optional "R" (3x3) and "t" (3, metres), '
    'or {"type": "weak-perspective"}'
)


class CameraError(ValueError):
    """A camera file or camera argument is invalid; the message names it and the problem."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PinholeCamera:
    """A pinhole camera with known intrinsics and extrinsics (OpenCV conventions, metres and pixels)."""

    K: jax.Array
    """(3, 3) intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] (a skew K[0, 1] is honoured), pixels."""
    R: jax.Array
    """(3, 3) rotation world -> camera."""
    t: jax.Array
    """(3,) translation world -> camera, metres."""
    width: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    """Image width in pixels, if known (used for previews only)."""
    height: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    """Image height in pixels, if known (used for previews only)."""

    @classmethod
    def create(cls, *, fx, fy, cx, cy, R=None, t=None, width=None, height=None, dtype=jnp.float32) -> "PinholeCamera":
        """A camera from focal lengths and principal point (pixels), optional extrinsics (t in metres)."""
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], np.float64)
        return cls.from_matrices(K, R, t, width=width, height=height, dtype=dtype)

    @classmethod
    def from_matrices(cls, K, R=None, t=None, *, width=None, height=None, dtype=jnp.float32) -> "PinholeCamera":
        K = _matrix("K", K, (3, 3))
        if K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0, 0, 1]) or K[1, 0] != 0:
            raise CameraError(f"K must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0, got {K.tolist()}")
        R = np.eye(3) if R is None else _matrix("R", R, (3, 3))
        if not np.allclose(R @ R.T, np.eye(3), atol=1e-5) or np.linalg.det(R) < 0:
            raise CameraError(f"R must be a rotation matrix (orthonormal, det +1), got {R.tolist()}")
        t = np.zeros(3) if t is None else _matrix("t", t, (3,))
        return cls(K=jnp.asarray(K, dtype), R=jnp.asarray(R, dtype), t=jnp.asarray(t, dtype),
                   width=width, height=height)  # fmt: skip

    def to_camera(self, points: jax.Array) -> jax.Array:
        """(*, 3) world points -> (*, 3) camera coordinates, metres."""
        return jnp.einsum("ij,...j->...i", self.R, points) + jnp.broadcast_to(self.t, points.shape)

    def project(self, points: jax.Array) -> jax.Array:
        """(*, 3) world points (metres) -> (*, 2) pixels. Points at or behind the camera get a depth clamped to
        1 mm, which keeps the projection finite (a fit then pulls them in front)."""
        return project_camera_points(self.to_camera(points), self.K)

    @property
    def focal(self) -> jax.Array:
        """(2,) fx, fy in pixels."""
        return jnp.stack([self.K[0, 0], self.K[1, 1]])


def project_camera_points(points_cam: jax.Array, K: jax.Array) -> jax.Array:
    """(*, 3) camera-frame points -> (*, 2) pixels with intrinsics K (depth clamped to >= 1 mm)."""
    z = jnp.maximum(points_cam[..., 2], 1e-3)
    x, y = points_cam[..., 0] / z, points_cam[..., 1] / z
    return jnp.stack([K[0, 0] * x + K[0, 1] * y + K[0, 2], K[1, 1] * y + K[1, 2]], axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WeakPerspectiveCamera:
    """Orthographic projection along the camera z axis with a per-frame scale and offset."""

    scale: jax.Array
    """(*,) pixels per metre."""
    offset: jax.Array
    """(*, 2) pixels: where the camera-frame origin projects."""

    def project(self, points: jax.Array) -> jax.Array:
        """(*, N, 3) camera-frame points (metres) -> (*, N, 2) pixels; batch axes `*` match `scale`'s."""
        n = points.shape[-2]
        scale = jnp.broadcast_to(self.scale[..., None, None], points.shape[:-1] + (2,))
        offset = jnp.broadcast_to(self.offset[..., None, :], points.shape[:-2] + (n, 2))
        return scale * points[..., :2] + offset


WEAK_PERSPECTIVE = "weak-perspective"
"""What `load_camera` returns for a weak-perspective camera file (its parameters are solved)."""


def _matrix(name: str, value, shape) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise CameraError(f"{name} must be numbers of shape {shape}, got {value!r}") from e
    if array.shape != shape:
        raise CameraError(f"{name} must have shape {shape}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise CameraError(f"{name} contains NaN or infinite values")
    return array


def camera_from_dict(spec: dict, *, dtype=jnp.float32) -> PinholeCamera | str:
    """A `PinholeCamera` or `WEAK_PERSPECTIVE` from a parsed camera description (see the module docstring)."""
    if not isinstance(spec, dict):
        raise CameraError(f"a camera must be a JSON object: {CAMERA_FORMAT_HELP}")
    kind = spec.get("type", "pinhole")
    if kind == WEAK_PERSPECTIVE:
        return WEAK_PERSPECTIVE
    if kind != "pinhole":
        raise CameraError(f'unknown camera type {kind!r}: expected "pinhole" or "weak-perspective"')
    size = {k: int(spec[k]) for k in ("width", "height") if spec.get(k) is not None}
    if "K" in spec:
        return PinholeCamera.from_matrices(spec["K"], spec.get("R"), spec.get("t"), dtype=dtype, **size)
    missing = [k for k in ("fx", "fy", "cx", "cy") if k not in spec]
    if missing:
        raise CameraError(f"camera is missing {', '.join(missing)}: {CAMERA_FORMAT_HELP}")
    try:
        intrinsics = {k: float(spec[k]) for k in ("fx", "fy", "cx", "cy")}
    except (TypeError, ValueError) as e:
        raise CameraError(f"fx, fy, cx, cy must be numbers ({e})") from e
    return PinholeCamera.create(**intrinsics, R=spec.get("R"), t=spec.get("t"), dtype=dtype, **size)


def load_camera(path: str | os.PathLike, *, dtype=jnp.float32) -> PinholeCamera | str:
    """Read a camera file (JSON, see the module docstring); errors name the file."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise CameraError(f"{path}: no such camera file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CameraError(f"{path}: not a readable JSON camera file ({e})") from e
    try:
        return camera_from_dict(spec, dtype=dtype)
    except CameraError as e:
        raise CameraError(f"{path}: {e}") from None


def camera_to_dict(camera: PinholeCamera) -> dict:
    """The JSON description of a pinhole camera (what `load_camera` reads)."""
    K = np.asarray(camera.K, np.float64)
    out = {"type": "pinhole", "K": K.tolist(), "R": np.asarray(camera.R, np.float64).tolist(),
           "t": np.asarray(camera.t, np.float64).tolist()}  # fmt: skip
    if camera.width is not None:
        out["width"] = camera.width
    if camera.height is not None:
        out["height"] = camera.height
    return out
