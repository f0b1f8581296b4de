"""Biomechanical constraints on 21 hand keypoints, after Spurr et al. (ECCV 2020), and the joint-angle
maths shared with `mano_jax.priors`.

Everything here is differentiable JAX and works on `(*, 21, 3)` keypoints in either order (OpenPose /
MediaPipe / FreiHAND by default, MANO's own with `order="mano"`), so it can be used as a training loss:

- `normalize_keypoints`: wrist at the origin, wrist-to-middle-MCP length 1 (Spurr et al.'s scale).
- `bone_lengths` (20 bones), `root_bone_angles` (angles between neighbouring root bones, i.e. wrist->MCP
  lines), `palm_curvature` (signed dihedral angles between the planes of neighbouring root bones).
- `joint_angles`: flexion and abduction of the 15 finger bones, each measured in a per-finger local frame.
- `BiomechLimits`: interval limits on the normalised bone lengths and palm angles, and a convex polygon
  of allowed (flexion, abduction) per bone (co-dependent angles); `.penalty(...)` (zero inside every
  limit) and `.report(...)` (which limit is violated, by how much).

Angle conventions (both here and in `mano_jax.priors`): a bone's direction `d` is measured in a frame
(along, palmar, lateral): `along` the reference bone, `palmar` the direction the finger flexes towards
(the palm normal on the palm side; for the thumb, across the palm towards the fingers, see
`THUMB_TILT_DEG`), `lateral` = towards the thumb (radial) for both hands (for the thumb: out of the
palm's front, i.e. palmar abduction). Then

    flexion   = atan2(d . palmar, d . along)                  (positive = towards the palm)
    abduction = atan2(d . lateral, |d projected on (along, palmar)|)   (positive = towards the thumb)

The palm normal of a right hand is `normalize((index_MCP - wrist) x (pinky_MCP - wrist))` (it points out
of the palm); mirror for a left hand. Nothing depends on the model's coordinate axes.

Anatomical ranges of motion (`ANATOMICAL_LIMITS_DEG`), with their sources:

- Fingers, active motion: MCP flexion 0-90 deg, PIP 0-100/110, DIP 0-90 (American Academy of
  Orthopaedic Surgeons, *Joint Motion: Method of Measuring and Recording*, 1965; Hume et al., "Functional
  range of motion of the joints of the hand", J. Hand Surg. 15A(2), 1990); the static constraints of Lin,
  Wu & Huang ("Modeling the constraints of human hand motion", IEEE Workshop on Human Motion, 2000):
  0 <= MCP flexion <= 90, -15 <= MCP abduction <= 15, 0 <= PIP <= 110, 0 <= DIP <= 90 deg.
  Extension is allowed to the usual passive hyperextension (MCP 30, PIP 10, DIP 20 deg), and MCP
  abduction to 20 deg (AAOS) for index and ring, 25 deg for the little finger (the most mobile in
  ab/adduction), 15 deg for the middle finger, because keypoints of real hands show both.
- Co-dependence at the MCP: the collateral ligaments tighten in flexion, so lateral (ab/adduction) motion
  shrinks as the MCP flexes and is nearly nil in full flexion (Kapandji, *The Physiology of the Joints*,
  vol. 1). The allowed region is the convex hexagon with abduction half-width w0 for flexion <= 0,
  shrinking linearly to 7 deg at 90 deg flexion.
  PIP and DIP are hinges: their abduction band (+-8 deg) only absorbs keypoint noise and the mismatch
  between a model's joint axes and the anatomical ones.
- Thumb (flexion across the palm, abduction out of it, as clinically defined): trapeziometacarpal
  (MANO's `thumb1`) arcs of 53 deg flexion-extension, 42 deg abduction-adduction and 17 deg axial
  rotation (Cooney et al., "The kinesiology of the thumb trapeziometacarpal joint", J. Bone Joint Surg.
  63A(9), 1981); palmar abduction up to 50-60 deg from the flat hand (AAOS); MCP flexion 0-50/60 deg, IP
  0-80 deg with ~20 deg hyperextension (AAOS; Hume et al.). MANO's thumb1 rotates about a point and rest
  direction that only approximate the anatomical CMC joint, so its box is the Cooney arcs widened to
  flexion -35..60, abduction -20..60 and +-30 deg twist; the thumb MCP and IP get +-15 deg of
  abduction because models disagree on their hinge axes (a flexed IP shows up to ~12 deg of it).
- Twist (axial rotation, only used by `mano_jax.priors.JointLimits`; keypoints cannot observe it):
  MCP +-10 deg (a little passive axial rotation of the condyloid joint), PIP/DIP/IP +-5 deg (hinges,
  Kapandji), thumb MCP +-10 deg.

All angles are relative to the model's rest (flat) pose in `mano_jax.priors`; in this module they are
relative to the parent bone, so `BiomechLimits.from_model` carries the limits over to keypoints by
posing the model inside them (the fingers of a flat hand are not collinear with their wrist->MCP lines,
and a twisted MCP turns the flexion plane of the bones after it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from .conventions import OPENPOSE_ORDER

KeypointOrder = Literal["openpose", "mano"]

#: Fingers in OpenPose order; finger f's keypoints are 1 + 4 f .. 4 + 4 f (MCP/CMC, PIP/MCP, DIP/IP, tip).
FINGERS = ("thumb", "index", "middle", "ring", "pinky")
#: MANO joints of each finger in `FINGERS` order (CMC/MCP, PIP/MCP, DIP/IP).
MANO_FINGER_JOINTS = ((13, 14, 15), (1, 2, 3), (4, 5, 6), (10, 11, 12), (7, 8, 9))
#: For each MANO joint 1..15, its position in the (finger, level) flattening of `MANO_FINGER_JOINTS`.
_MANO_TO_FINGER_FLAT = tuple(
    int(np.argwhere(np.asarray(MANO_FINGER_JOINTS).ravel() == j)[0, 0]) for j in range(1, 16)
)
#: Bone names in the order of `bone_lengths` (20 = 5 fingers x root, proximal, middle, distal).
BONE_NAMES = tuple(f"{f}_{b}" for f in FINGERS for b in ("root", "proximal", "middle", "distal"))
#: Names of the 15 angle-carrying bones (OpenPose finger order), matching `joint_angles`.
ANGLE_BONE_NAMES = tuple(f"{f}_{b}" for f in FINGERS for b in ("proximal", "middle", "distal"))

#: Tilt (degrees) of the thumb's flexion direction from the palm normal towards the fingers. Clinically
#: (AAOS; Cooney et al. 1981) thumb flexion-extension happens parallel to the palm plane, across it
#: towards the little finger, and abduction perpendicular to it (palmar abduction): a 90 degree tilt.
#: With it, the thumb's positive "abduction" is palmar abduction (away from the palm's front).
THUMB_TILT_DEG = 90.0

_EPS = 1e-12


def _mcp_polygon(half_width_ext: float) -> tuple:
    return ((-30.0, -half_width_ext), (0.0, -half_width_ext), (90.0, -7.0),
            (90.0, 7.0), (0.0, half_width_ext), (-30.0, half_width_ext))  # fmt: skip


def _box(flex: tuple[float, float], abd: tuple[float, float]) -> tuple:
    return ((flex[0], abd[0]), (flex[1], abd[0]), (flex[1], abd[1]), (flex[0], abd[1]))


_PIP = _box((-10.0, 110.0), (-8.0, 8.0))
_DIP = _box((-20.0, 90.0), (-8.0, 8.0))

#: Per MANO joint 1..15 (`mano_jax.JOINT_NAMES[1:]`): (convex (flexion, abduction) polygon, counter-
#: clockwise, degrees; (min, max) twist in degrees). Sources and derivation in the module docstring.
ANATOMICAL_LIMITS_DEG: tuple[tuple[tuple, tuple[float, float]], ...] = (
    (_mcp_polygon(20.0), (-10.0, 10.0)), (_PIP, (-5.0, 5.0)), (_DIP, (-5.0, 5.0)),  # index
    (_mcp_polygon(15.0), (-10.0, 10.0)), (_PIP, (-5.0, 5.0)), (_DIP, (-5.0, 5.0)),  # middle
    (_mcp_polygon(25.0), (-10.0, 10.0)), (_PIP, (-5.0, 5.0)), (_DIP, (-5.0, 5.0)),  # pinky
    (_mcp_polygon(20.0), (-10.0, 10.0)), (_PIP, (-5.0, 5.0)), (_DIP, (-5.0, 5.0)),  # ring
    (_box((-35.0, 60.0), (-20.0, 60.0)), (-30.0, 30.0)),  # thumb CMC (MANO thumb1)
    (_box((-15.0, 60.0), (-15.0, 15.0)), (-10.0, 10.0)),  # thumb MCP
    (_box((-20.0, 85.0), (-15.0, 15.0)), (-5.0, 5.0)),  # thumb IP
)  # fmt: skip

#: Most vertices of a learnt polygon (`convex_polygons`); shorter ones repeat their first vertex.
POLYGON_SIZE = 12


# ------------------------------------------------------------------------------- shared angle maths


def _normalize(v: jax.Array) -> jax.Array:
    return v / jnp.sqrt(jnp.maximum(jnp.sum(v**2, axis=-1, keepdims=True), _EPS))


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(a * b, axis=-1)


def chirality(side: str) -> float:
    """+1 for a right hand, -1 for a left hand (the sign that makes palm normals and `lateral` agree)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    return 1.0 if side == "right" else -1.0


def palm_normal(wrist: jax.Array, index_mcp: jax.Array, pinky_mcp: jax.Array, side: str) -> jax.Array:
    """(*, 3) unit normal pointing out of the palm, from the wrist, index MCP and pinky MCP positions."""
    n = jnp.cross(index_mcp - wrist, pinky_mcp - wrist)
    return chirality(side) * _normalize(n)


def finger_frame(along: jax.Array, palmar_hint: jax.Array, side: str) -> jax.Array:
    """(*, 3, 3) orthonormal frame with rows (along, palmar, lateral).

    `along`: the reference bone direction; `palmar_hint`: roughly the direction of flexion (made
    orthogonal to `along`); `lateral` points towards the thumb side for either hand.
    """
    a = _normalize(along)
    n = _normalize(palmar_hint - _dot(palmar_hint, a)[..., None] * a)
    lateral = chirality(side) * jnp.cross(a, n)
    return jnp.stack([a, n, lateral], axis=-2)


def tilt_thumb_palmar(frame: jax.Array, tilt_deg: float = THUMB_TILT_DEG) -> jax.Array:
    """The thumb's flexion direction: the palmar axis of `frame` turned by `tilt_deg` towards the fingers
    (i.e. away from `lateral`, which points radially). Returns (*, 3)."""
    t = np.deg2rad(tilt_deg)
    return np.cos(t) * frame[..., 1, :] - np.sin(t) * frame[..., 2, :]


def flexion_abduction(direction: jax.Array, frame: jax.Array) -> jax.Array:
    """(*, 3) bone directions in (*, 3, 3) frames (rows along, palmar, lateral) -> (*, 2) radians.

    flexion = atan2(d.palmar, d.along) (positive towards the palm, beyond 90 deg allowed),
    abduction = elevation of d out of the (along, palmar) plane (positive towards the thumb).
    `direction` need not be unit length.
    """
    x = _dot(direction, frame[..., 0, :])
    y = _dot(direction, frame[..., 1, :])
    z = _dot(direction, frame[..., 2, :])
    flex = jnp.arctan2(y, x)
    abd = jnp.arctan2(z, jnp.sqrt(x**2 + y**2 + _EPS))
    return jnp.stack([flex, abd], axis=-1)


def direction_from_angles(angles: jax.Array, frame: jax.Array) -> jax.Array:
    """Inverse of `flexion_abduction`: (*, 2) radians in (*, 3, 3) frames -> (*, 3) unit directions."""
    flex, abd = angles[..., 0], angles[..., 1]
    coef = jnp.stack([jnp.cos(abd) * jnp.cos(flex), jnp.cos(abd) * jnp.sin(flex), jnp.sin(abd)], -1)
    return jnp.einsum("...k,...kc->...c", coef, frame)


def pad_polygons(polygons) -> np.ndarray:
    """A list of J counter-clockwise polygons (each (P_j, 2), P_j <= POLYGON_SIZE) -> (J, P, 2) with P the
    largest P_j, padded by repeating the first vertex (zero-length edges change neither the inside test nor
    the distances)."""
    size = max(len(poly) for poly in polygons)
    out = []
    for poly in polygons:
        poly = np.asarray(poly, dtype=np.float64)
        if len(poly) > POLYGON_SIZE:
            raise ValueError(f"polygons may have at most {POLYGON_SIZE} vertices, got {len(poly)}")
        twice_area = np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1])
        if twice_area <= 0:
            raise ValueError("polygon vertices must be in counter-clockwise order (positive area)")
        out.append(np.concatenate([poly, np.repeat(poly[:1], size - len(poly), axis=0)]))
    return np.stack(out)


def convex_polygons(points, *, max_vertices: int = POLYGON_SIZE, margin: float = 0.0) -> np.ndarray:
    """Learn per-bone regions from data: (N, J, 2) angle samples -> (J, P, 2) convex polygons (P <= max_vertices).

    Each polygon is the convex hull of the samples (as Spurr et al. do), simplified to at most
    `max_vertices` vertices by repeatedly dropping the vertex whose removal loses the least area and
    then grown outwards by `margin` (same units as `points`) so that every sample stays inside.
    """
    from scipy.spatial import ConvexHull

    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 3 or points.shape[-1] != 2 or points.shape[0] < 3:
        raise ValueError(f"points: expected (N >= 3, J, 2) angle samples, got {points.shape}")
    polys = []
    for j in range(points.shape[1]):
        pts = points[:, j]
        hull = pts[ConvexHull(pts).vertices]  # counter-clockwise in 2-D
        while len(hull) > max_vertices:
            prev, nxt = np.roll(hull, 1, axis=0), np.roll(hull, -1, axis=0)
            u, w = hull - prev, nxt - prev
            loss = np.abs(u[:, 0] * w[:, 1] - u[:, 1] * w[:, 0])
            hull = np.delete(hull, np.argmin(loss), axis=0)
        # Dropping vertices cuts corners: push every edge out until all samples are inside again, then
        # by `margin` (intersecting the shifted edge lines keeps the polygon convex).
        edges = np.roll(hull, -1, axis=0) - hull
        normals = np.stack([edges[:, 1], -edges[:, 0]], -1) / np.linalg.norm(edges, axis=1)[:, None]
        offsets = np.max(pts @ normals.T, axis=0) + margin
        polys.append(_polygon_from_lines(normals, offsets))
    return pad_polygons(polys)


def _polygon_from_lines(normals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Vertices of the convex polygon {x : normals @ x <= offsets}, lines in counter-clockwise order."""
    n1, n2 = normals, np.roll(normals, -1, axis=0)
    o1, o2 = offsets, np.roll(offsets, -1)
    return np.stack([np.linalg.solve(np.stack([a, b]), np.array([c, d]))
                     for a, b, c, d in zip(n1, n2, o1, o2)])  # fmt: skip


def polygon_distance(points: jax.Array, polygons: jax.Array, margin=0.0) -> tuple[jax.Array, jax.Array]:
    """Distances of (*, J, 2) points to (J, P, 2) convex counter-clockwise polygons.

    Returns `(penalty, excess)`, each (*, J): `penalty` is (distance outside + margin)^2 outside and
    max(0, margin - depth)^2 inside (so zero when the point is inside by more than `margin`),
    differentiable; `excess` is the Euclidean distance outside the polygon (0 inside), for reports.
    """
    batch = points.shape[:-2]
    v = jnp.broadcast_to(polygons, batch + polygons.shape)  # (*, J, P, 2)
    e = jnp.roll(v, -1, axis=-2) - v
    p = jnp.broadcast_to(points[..., None, :], v.shape)
    rel = p - v
    e_sq = jnp.sum(e**2, axis=-1)
    degenerate = e_sq < _EPS
    safe_e_sq = jnp.where(degenerate, 1.0, e_sq)
    t = jnp.clip(jnp.sum(rel * e, axis=-1) / safe_e_sq, 0.0, 1.0)
    d_sq = jnp.min(jnp.sum((rel - t[..., None] * e) ** 2, axis=-1), axis=-1)
    # Signed distance to each edge's line, positive outside (edges run counter-clockwise).
    line = (e[..., 1] * rel[..., 0] - e[..., 0] * rel[..., 1]) / jnp.sqrt(safe_e_sq)
    line = jnp.where(degenerate, -jnp.inf, line)
    depth_signed = jnp.max(line, axis=-1)
    outside = depth_signed > 0
    dist = jnp.sqrt(jnp.where(outside, jnp.maximum(d_sq, _EPS), 1.0))
    inside_pen = jnp.maximum(jnp.where(outside, 0.0, depth_signed) + margin, 0.0) ** 2
    penalty = jnp.where(outside, (dist + margin) ** 2, inside_pen)
    return penalty, jnp.where(outside, dist, 0.0)


def interval_penalty(x: jax.Array, bounds: jax.Array, margin=0.0) -> jax.Array:
    """Spurr et al.'s interval penalty, squared: (max(lo + m - x, 0) + max(x - hi + m, 0))^2, elementwise.

    `bounds` (..., 2) broadcasts against x's trailing axes explicitly (lo = bounds[..., 0]).
    """
    lo = jnp.broadcast_to(bounds[..., 0], x.shape)
    hi = jnp.broadcast_to(bounds[..., 1], x.shape)
    return (jnp.maximum(lo + margin - x, 0.0) + jnp.maximum(x - hi + margin, 0.0)) ** 2


def interval_excess(x: jax.Array, bounds: jax.Array) -> jax.Array:
    """How far x lies outside [lo, hi] (0 inside), elementwise, signed: negative below lo."""
    lo = jnp.broadcast_to(bounds[..., 0], x.shape)
    hi = jnp.broadcast_to(bounds[..., 1], x.shape)
    return jnp.minimum(x - lo, 0.0) + jnp.maximum(x - hi, 0.0)


def polygon_samples(key: jax.Array, polygons: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform samples inside (J, P, 2) convex polygons: -> (*shape, J, 2). Triangle fan from vertex 0,
    triangles picked in proportion to their area, uniform barycentric coordinates inside."""
    polygons = jnp.asarray(polygons)
    j = polygons.shape[0]
    a = polygons[:, 1:-1] - polygons[:, :1]  # (J, P-2, 2)
    b = polygons[:, 2:] - polygons[:, :1]
    area = 0.5 * jnp.abs(a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0])
    k1, k2 = jax.random.split(key)
    tri = jax.random.categorical(k1, jnp.log(area + 1e-30), shape=(*shape, j))
    uv = jax.random.uniform(k2, (*shape, j, 2), dtype=polygons.dtype)
    uv = jnp.where(jnp.sum(uv, axis=-1, keepdims=True) > 1, 1.0 - uv, uv)
    index = jnp.broadcast_to(tri[..., None, None], (*shape, j, 1, 2))

    def pick(edge):
        return jnp.take_along_axis(jnp.broadcast_to(edge, (*shape, *edge.shape)), index, axis=-2)[..., 0, :]

    origin = jnp.broadcast_to(polygons[:, 0], (*shape, j, 2))
    return origin + uv[..., :1] * pick(a) + uv[..., 1:] * pick(b)


def default_polygons_rad() -> np.ndarray:
    """(15, P, 2) `ANATOMICAL_LIMITS_DEG` polygons in radians, MANO joint order 1..15."""
    return np.deg2rad(pad_polygons([poly for poly, _ in ANATOMICAL_LIMITS_DEG]))


def default_twist_rad() -> np.ndarray:
    """(15, 2) twist limits of `ANATOMICAL_LIMITS_DEG` in radians, MANO joint order 1..15."""
    return np.deg2rad(np.array([tw for _, tw in ANATOMICAL_LIMITS_DEG]))


# ------------------------------------------------------------------------------- keypoint measures


def keypoint_model(model):
    """A 21-"vertex" `ManoModel` whose `forward` gives exactly `model`'s joints and keypoints, cheaply.

    Its vertices are the 16 rest joints (their shape directions regressed from the mesh, their weights
    one-hot on their own joint, so each "vertex" follows its joint) then the 5 fingertip vertices with
    their own shape, pose and skinning data; `J_regressor` picks the first 16. Keypoint fitting and
    sampling only need these, at a fraction of the full mesh's cost. `vertices` of the result are the
    keypoints in MANO order; `faces` is empty.
    """
    from .model import ManoModel

    if len(model.tip_ids) != 5:
        raise ValueError(f"model {model.name!r} has no fingertip vertices (tip_ids={model.tip_ids})")
    # Built with NumPy on the host: one-off array surgery, not worth a compilation per operation.
    tips = np.asarray(model.tip_ids)
    v, shapedirs, posedirs = (np.asarray(a) for a in (model.v_template, model.shapedirs, model.posedirs))
    reg = np.asarray(model.J_regressor)
    eye = np.eye(16, dtype=v.dtype)
    return ManoModel(
        v_template=jnp.asarray(np.concatenate([reg @ v, v[tips]])),
        shapedirs=jnp.asarray(np.concatenate([np.einsum("jv,vck->jck", reg, shapedirs), shapedirs[tips]])),
        posedirs=jnp.asarray(np.concatenate([np.zeros((16, 3, posedirs.shape[-1]), v.dtype), posedirs[tips]])),
        J_regressor=jnp.asarray(np.concatenate([eye, np.zeros((16, 5), v.dtype)], axis=1)),
        weights=jnp.asarray(np.concatenate([eye, np.asarray(model.weights)[tips]])),
        faces=jnp.zeros((0, 3), jnp.int32),
        hands_components=model.hands_components,
        hands_mean=model.hands_mean,
        hands_var=model.hands_var,
        parents=model.parents,
        tip_ids=tuple(range(16, 21)),
        side=model.side,
        name=f"{model.name} (keypoints only)",
        provenance=model.provenance,
    )



def to_openpose(keypoints: jax.Array, order: KeypointOrder) -> jax.Array:
    """(*, 21, 3) keypoints in `order` -> OpenPose order (the order used inside this module)."""
    keypoints = jnp.asarray(keypoints)
    if keypoints.ndim < 2 or keypoints.shape[-2:] != (21, 3):
        raise ValueError(f"keypoints: expected shape (*, 21, 3), got {tuple(keypoints.shape)}")
    if order == "openpose":
        return keypoints
    if order == "mano":
        return keypoints[..., jnp.asarray(OPENPOSE_ORDER), :]
    raise ValueError(f"order must be 'openpose' or 'mano', got {order!r}")


def _chains(kp: jax.Array) -> jax.Array:
    """(*, 21, 3) OpenPose keypoints -> (*, 5, 5, 3): per finger, wrist then its 4 keypoints."""
    wrist = jnp.broadcast_to(kp[..., None, :1, :], kp.shape[:-2] + (5, 1, 3))
    return jnp.concatenate([wrist, kp[..., 1:, :].reshape(*kp.shape[:-2], 5, 4, 3)], axis=-2)


def normalize_keypoints(keypoints, order: KeypointOrder = "openpose") -> tuple[jax.Array, jax.Array]:
    """Translate the wrist to the origin and scale the wrist-to-middle-MCP length to 1.

    Returns `(normalised (*, 21, 3) in the input order, scale (*,))` with scale in the input's units
    (metres for mano-jax keypoints).
    """
    kp = to_openpose(keypoints, order)
    scale = jnp.sqrt(jnp.sum((kp[..., 9, :] - kp[..., 0, :]) ** 2, axis=-1) + _EPS)
    keypoints = jnp.asarray(keypoints)
    out = (keypoints - keypoints[..., :1, :]) / scale[..., None, None]
    return out, scale


def bone_vectors(keypoints, order: KeypointOrder = "openpose") -> jax.Array:
    """(*, 21, 3) -> (*, 5, 4, 3) bone vectors per finger (`FINGERS`): root, proximal, middle, distal."""
    c = _chains(to_openpose(keypoints, order))
    return c[..., 1:, :] - c[..., :-1, :]


def bone_lengths(keypoints, order: KeypointOrder = "openpose") -> jax.Array:
    """(*, 21, 3) -> (*, 20) bone lengths in `BONE_NAMES` order (input units)."""
    b = bone_vectors(keypoints, order)
    return jnp.sqrt(jnp.sum(b**2, axis=-1) + _EPS).reshape(*b.shape[:-3], 20)


def root_bone_angles(keypoints, order: KeypointOrder = "openpose") -> jax.Array:
    """(*, 21, 3) -> (*, 4) angles (radians) between neighbouring root bones (wrist->thumb CMC and
    wrist->index MCP, index/middle, middle/ring, ring/pinky)."""
    r = _normalize(bone_vectors(keypoints, order)[..., 0, :])
    cos = _dot(r[..., :-1, :], r[..., 1:, :])
    sin = jnp.sqrt(jnp.sum(jnp.cross(r[..., :-1, :], r[..., 1:, :]) ** 2, axis=-1) + _EPS)
    return jnp.arctan2(sin, cos)


def palm_curvature(keypoints, order: KeypointOrder = "openpose", side: str = "right") -> jax.Array:
    """(*, 21, 3) -> (*, 3) signed dihedral angles (radians) between the planes of neighbouring root-bone
    pairs (thumb-index | index-middle, index-middle | middle-ring, middle-ring | ring-pinky), about the
    shared root bone; positive when the palm cups (folds towards the palm side), for either hand."""
    r = bone_vectors(keypoints, order)[..., 0, :]  # (*, 5, 3)
    normals = _normalize(jnp.cross(r[..., :-1, :], r[..., 1:, :]))  # (*, 4, 3)
    n1, n2, axis = normals[..., :-1, :], normals[..., 1:, :], _normalize(r[..., 1:-1, :])
    sin = _dot(jnp.cross(n1, n2), axis)
    return chirality(side) * jnp.arctan2(sin, _dot(n1, n2))


def _transport(v: jax.Array, u: jax.Array, w: jax.Array) -> jax.Array:
    """Rotate v by the minimal rotation taking unit u to unit w (parallel transport along a chain)."""
    c = _dot(u, w)[..., None]
    k = jnp.cross(u, w)
    return v * c + jnp.cross(k, v) + k * _dot(k, v)[..., None] / jnp.maximum(1.0 + c, 1e-6)


def _finger_frames(kp: jax.Array, side: str, thumb_tilt_deg) -> tuple[jax.Array, jax.Array]:
    """Unit bones (*, 5, 4, 3) and the root bones' frames (*, 5, 3, 3) of OpenPose keypoints."""
    bones = _normalize(bone_vectors(kp, "openpose"))
    n = palm_normal(kp[..., 0, :], kp[..., 5, :], kp[..., 17, :], side)
    n = jnp.broadcast_to(n[..., None, :], bones.shape[:-2] + (3,))
    frame = finger_frame(bones[..., 0, :], n, side)
    thumb = finger_frame(bones[..., 0, 0, :], tilt_thumb_palmar(frame[..., 0, :, :], thumb_tilt_deg), side)
    return bones, jnp.concatenate([thumb[..., None, :, :], frame[..., 1:, :, :]], axis=-3)


def _carry(frame: jax.Array, bone: jax.Array, side: str) -> jax.Array:
    """`frame` carried onto `bone` by the minimal rotation taking its `along` axis to `bone`."""
    return finger_frame(bone, _transport(frame[..., 1, :], frame[..., 0, :], bone), side)


def joint_angles(
    keypoints,
    order: KeypointOrder = "openpose",
    side: str = "right",
    thumb_tilt_deg=THUMB_TILT_DEG,
    rest_frames: jax.Array | None = None,
) -> jax.Array:
    """(*, 21, 3) -> (*, 15, 2) flexion and abduction (radians) of the proximal, middle and distal bones of
    each finger (`ANGLE_BONE_NAMES`).

    Frames: the root bone's frame has `along` = wrist->MCP and `palmar` = the palm normal (tilted for the
    thumb). Each bone's angles are measured in its reference frame: the parent's frame, or, with
    `rest_frames` (15, 3, 3) (rows of each bone's rest frame in its parent's frame coordinates, see
    `rest_bone_frames`), the parent's frame turned into the bone's rest orientation, so that a rest hand
    has zero angles. The frame passed down the finger is the reference frame carried onto the bone by the
    minimal rotation (no twist: keypoints cannot observe it), so `palmar` follows the curl of the finger.
    Without `rest_frames` this is Spurr et al.'s convention (angles relative to the parent bone).
    """
    kp = to_openpose(keypoints, order)
    bones, frame = _finger_frames(kp, side, thumb_tilt_deg)
    angles = []
    for level in range(1, 4):
        if rest_frames is not None:
            local = jnp.broadcast_to(rest_frames.reshape(5, 3, 3, 3)[:, level - 1], frame.shape)
            frame = jnp.einsum("...ij,...jk->...ik", local, frame)
        angles.append(flexion_abduction(bones[..., level, :], frame))
        frame = _carry(frame, bones[..., level, :], side)
    return jnp.stack(angles, axis=-2).reshape(*kp.shape[:-2], 15, 2)


def rest_bone_frames(keypoints, order: KeypointOrder = "openpose", side: str = "right",
                     thumb_tilt_deg=THUMB_TILT_DEG) -> jax.Array:  # fmt: skip
    """(21, 3) keypoints of a hand at rest -> (15, 3, 3) each bone's rest frame in its parent frame's
    coordinates (`ANGLE_BONE_NAMES` order), for `joint_angles(..., rest_frames=...)`."""
    kp = to_openpose(keypoints, order)
    bones, frame = _finger_frames(kp, side, thumb_tilt_deg)
    local = []
    for level in range(1, 4):
        child = _carry(frame, bones[..., level, :], side)
        local.append(jnp.einsum("...ij,...kj->...ik", child, frame))
        frame = child
    return jnp.stack(local, axis=-3).reshape(*kp.shape[:-2], 15, 3, 3)


# ----------------------------------------------------------------------------------------- limits

#: Names of the 4 root-bone angles and 3 palm-curvature angles (`root_bone_angles`, `palm_curvature`).
ROOT_ANGLE_NAMES = ("thumb-index", "index-middle", "middle-ring", "ring-pinky")
CURVATURE_NAMES = ("thumb-index|index-middle", "index-middle|middle-ring", "middle-ring|ring-pinky")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BiomechLimits:
    """Spurr et al.'s biomechanical limits for (*, 21, 3) keypoints (lengths normalised by the
    wrist-to-middle-MCP length, angles in radians).

    Build them with `from_model` (the model's shape space and the literature ranges of motion) or
    `from_keypoints` (learnt from data, as Spurr et al. do); evaluate with `terms`/`penalty`; explain with
    `report`. Keypoint order is chosen per call (`order="openpose"` default, or "mano").
    """

    bone_length: jax.Array
    """(20, 2) (min, max) normalised bone lengths, `BONE_NAMES` order."""
    root_angle: jax.Array
    """(4, 2) (min, max) angles between neighbouring root bones, radians (`ROOT_ANGLE_NAMES`)."""
    curvature: jax.Array
    """(3, 2) (min, max) signed palm dihedral angles, radians (`CURVATURE_NAMES`)."""
    polygons: jax.Array
    """(15, P, 2) convex (flexion, abduction) regions of the `ANGLE_BONE_NAMES` bones, radians."""
    rest_frames: jax.Array
    """(15, 3, 3) rest frame of each bone in its parent's frame (`rest_bone_frames`); identities measure
    angles relative to the parent bone (Spurr et al.), a model's flat hand makes its rest pose zero."""
    side: str = dataclasses.field(default="right", metadata=dict(static=True))
    """Which hand the keypoints are ("right"/"left"): decides the palm normal's sign."""
    thumb_tilt_deg: float = dataclasses.field(default=THUMB_TILT_DEG, metadata=dict(static=True))
    """See `THUMB_TILT_DEG`."""

    @classmethod
    def from_model(
        cls,
        model=None,
        *,
        joint_regions: Literal["sampled", "anatomical"] = "sampled",
        num_samples: int = 4096,
        beta_std: float = 1.0,
        length_margin: float = 0.1,
        angle_margin_deg: float = 5.0,
        palm_margin_deg: float = 10.0,
        thumb_margin_deg: float = 25.0,
        seed: int = 0,
    ) -> "BiomechLimits":
        """Limits for a hand model (default: the bundled open hand), from its shape space and the
        anatomical joint limits. Angles are measured from the model's flat hand (`rest_frames`).

        Bone lengths and palm angles: their range over `num_samples` shapes with betas ~ N(0,
        `beta_std`^2), widened by `length_margin` (relative), `palm_margin_deg` (the palm is rigid in MANO,
        but real palms arch) and `thumb_margin_deg` for angles involving the thumb's root bone (a
        detector's thumb-CMC keypoint moves with the thumb).

        Joint-angle regions: "anatomical" takes `ANATOMICAL_LIMITS_DEG` as they are (keypoint angles of
        untwisted poses match the joint angles to a few degrees); "sampled" poses the model `num_samples`
        times uniformly inside `mano_jax.priors.JointLimits.default` and takes the convex hull of the
        keypoint angles, widened by `angle_margin_deg`: every anatomically valid pose then passes,
        including the abduction that an MCP's (unobservable) twist adds to the bones after it. Sampling compiles a larger function (slow
        the first time in a process).
        """
        from .io import load_model
        from .priors import JointLimits

        if joint_regions not in ("sampled", "anatomical"):
            raise ValueError(f"joint_regions must be 'sampled' or 'anatomical', got {joint_regions!r}")
        if model is None:
            model = load_model()
        kp_model = keypoint_model(model)
        dtype, side = model.dtype, model.side
        betas = np.random.default_rng(seed).normal(0.0, beta_std, (num_samples, model.num_betas))
        betas[0] = 0.0
        # Rest keypoints are linear in betas: no posing needed for the palm.
        dirs = np.asarray(kp_model.shapedirs)[np.asarray(OPENPOSE_ORDER)]
        rest_kp = np.asarray(kp_model.v_template)[np.asarray(OPENPOSE_ORDER)] + np.einsum("kcs,ns->nkc", dirs, betas)
        lengths, root, curv, rest = (np.asarray(a, np.float64) for a in _shape_measures(jnp.asarray(rest_kp), side))
        margin = np.deg2rad(np.full(4, palm_margin_deg))
        margin[0] = np.deg2rad(thumb_margin_deg)
        if joint_regions == "anatomical":
            polygons = default_polygons_rad()[np.asarray(MANO_FINGER_JOINTS).ravel() - 1]
        else:
            angles = _sampled_angles(kp_model, JointLimits.default(model), jax.random.PRNGKey(seed),
                                     jnp.asarray(betas, dtype), jnp.asarray(rest, dtype))  # fmt: skip
            polygons = convex_polygons(np.asarray(angles, np.float64), margin=np.deg2rad(angle_margin_deg))
        return cls(
            bone_length=jnp.asarray(
                np.stack([lengths.min(0) * (1 - length_margin), lengths.max(0) * (1 + length_margin)], -1), dtype
            ),
            root_angle=jnp.asarray(np.stack([root.min(0) - margin, root.max(0) + margin], -1), dtype),
            curvature=jnp.asarray(np.stack([curv.min(0) - margin[:3], curv.max(0) + margin[:3]], -1), dtype),
            polygons=jnp.asarray(polygons, dtype),
            rest_frames=jnp.asarray(rest, dtype),
            side=side,
        )

    @classmethod
    def from_keypoints(
        cls,
        keypoints,
        order: KeypointOrder = "openpose",
        side: str = "right",
        *,
        rest_frames=None,
        length_margin: float = 0.05,
        angle_margin_deg: float = 3.0,
        dtype=jnp.float32,
    ) -> "BiomechLimits":
        """Limits learnt from an (N, 21, 3) keypoint set (N >= 3): ranges of the normalised bone lengths
        and palm angles and convex hulls of the joint angles (relative to `rest_frames`, default the
        parent bones), widened by the margins."""
        kp = np.asarray(keypoints, np.float64)
        if kp.ndim != 3 or kp.shape[1:] != (21, 3) or kp.shape[0] < 3:
            raise ValueError(f"keypoints: expected (N >= 3, 21, 3) samples, got {kp.shape}")
        if not np.all(np.isfinite(kp)):
            raise ValueError("keypoints: contains NaN or infinite values")
        rest = jnp.broadcast_to(jnp.eye(3), (15, 3, 3)) if rest_frames is None else jnp.asarray(rest_frames)
        measured = jax.jit(_measures, static_argnums=(1, 2))(to_openpose(jnp.asarray(kp), order), side,
                                                             THUMB_TILT_DEG, rest)  # fmt: skip
        return cls._from_measures(measured, side, rest, length_margin, angle_margin_deg, dtype)

    @classmethod
    def _from_measures(cls, measured, side, rest, length_margin, angle_margin_deg, dtype) -> "BiomechLimits":
        m = {k: np.asarray(v, np.float64) for k, v in measured.items()}
        margin = np.deg2rad(angle_margin_deg)

        def widened(values):
            return np.stack([values.min(0) - margin, values.max(0) + margin], -1)

        lengths = m["bone_length"]
        return cls(
            bone_length=jnp.asarray(
                np.stack([lengths.min(0) * (1 - length_margin), lengths.max(0) * (1 + length_margin)], -1), dtype
            ),
            root_angle=jnp.asarray(widened(m["root_angle"]), dtype),
            curvature=jnp.asarray(widened(m["curvature"]), dtype),
            polygons=jnp.asarray(convex_polygons(m["joint_angle"], margin=margin), dtype),
            rest_frames=jnp.asarray(rest, dtype),
            side=side,
        )

    def measures(self, keypoints, order: KeypointOrder = "openpose") -> dict[str, jax.Array]:
        """The constrained quantities: `bone_length` (*, 20) normalised, `root_angle` (*, 4),
        `curvature` (*, 3) and `joint_angle` (*, 15, 2), radians."""
        return _measures(to_openpose(keypoints, order), self.side, self.thumb_tilt_deg, self.rest_frames)

    def terms(self, keypoints, order: KeypointOrder = "openpose", margin: float = 0.0) -> dict[str, jax.Array]:
        """Each constraint's penalty, (*,): squared excess summed over bones/angles; zero inside the
        limits. `margin` shrinks every limit (same units: normalised length or radians)."""
        m = self.measures(keypoints, order)
        joint, _ = polygon_distance(m["joint_angle"], self.polygons, margin)
        return {
            "bone_length": jnp.sum(interval_penalty(m["bone_length"], self.bone_length, margin), -1),
            "root_angle": jnp.sum(interval_penalty(m["root_angle"], self.root_angle, margin), -1),
            "curvature": jnp.sum(interval_penalty(m["curvature"], self.curvature, margin), -1),
            "joint_angle": jnp.sum(joint, -1),
        }

    def penalty(self, keypoints, order: KeypointOrder = "openpose", weights: dict | None = None) -> jax.Array:
        """(*, 21, 3) -> (*,) weighted sum of `terms` (weights default to 1 each)."""
        weights = weights or {}
        return sum(weights.get(name, 1.0) * value for name, value in self.terms(keypoints, order).items())

    def report(self, keypoints, order: KeypointOrder = "openpose", *, length_tolerance: float = 0.0,
               angle_tolerance_deg: float = 0.0) -> list[dict]:  # fmt: skip
        """Which limits the keypoints (one hand or a batch, flattened) violate, and by how much.

        One dict per violation: `sample`, `constraint` ("bone_length", "root_angle", "curvature",
        "joint_angle"), `name`, `value` (normalised length, or degrees; (flexion, abduction) for joint
        angles), `amount` (how far outside: normalised length or degrees), over `length_tolerance` for
        bone lengths and `angle_tolerance_deg` for angles.
        """
        m = {k: np.asarray(v) for k, v in jax.jit(self.measures, static_argnums=1)(keypoints, order).items()}
        out = []
        scalar = (("bone_length", BONE_NAMES, 1.0, length_tolerance),
                  ("root_angle", ROOT_ANGLE_NAMES, 180 / np.pi, angle_tolerance_deg),
                  ("curvature", CURVATURE_NAMES, 180 / np.pi, angle_tolerance_deg))  # fmt: skip
        for key, names, unit, tolerance in scalar:
            values = m[key].reshape(-1, len(names))
            excess = np.asarray(interval_excess(jnp.asarray(values), getattr(self, key))) * unit
            for s, i in zip(*np.nonzero(np.abs(excess) > tolerance)):
                out.append(dict(sample=int(s), constraint=key, name=names[i], value=float(values[s, i] * unit),
                                amount=float(abs(excess[s, i]))))  # fmt: skip
        angles = m["joint_angle"].reshape(-1, 15, 2)
        _, excess = jax.jit(polygon_distance)(jnp.asarray(angles), self.polygons)
        excess = np.rad2deg(np.asarray(excess))
        for s, i in zip(*np.nonzero(excess > angle_tolerance_deg)):
            value = tuple(float(a) for a in np.rad2deg(angles[s, i]))
            out.append(dict(sample=int(s), constraint="joint_angle", name=ANGLE_BONE_NAMES[i], value=value,
                            amount=float(excess[s, i])))  # fmt: skip
        return out


def _measures(kp: jax.Array, side: str, thumb_tilt_deg: float, rest_frames: jax.Array) -> dict[str, jax.Array]:
    norm, _ = normalize_keypoints(kp)
    return {
        "bone_length": bone_lengths(norm),
        "root_angle": root_bone_angles(kp),
        "curvature": palm_curvature(kp, side=side),
        "joint_angle": joint_angles(kp, side=side, thumb_tilt_deg=thumb_tilt_deg, rest_frames=rest_frames),
    }


@functools.partial(jax.jit, static_argnums=1)
def _shape_measures(rest_kp: jax.Array, side: str):
    """Bone lengths, root angles and palm curvature of (N, 21, 3) rest hands, and the first's bone frames."""
    norm, _ = normalize_keypoints(rest_kp)
    return (bone_lengths(norm), root_bone_angles(rest_kp), palm_curvature(rest_kp, side=side),
            rest_bone_frames(rest_kp[0], side=side))  # fmt: skip


@jax.jit
def _sampled_angles(kp_model, limits, key, betas, rest):
    """Keypoint joint angles (N, 15, 2) of the model posed uniformly inside `limits` with shapes `betas`."""
    from .posing import forward

    poses = limits.sample(key, (betas.shape[0],))
    kp = forward(kp_model, hand_pose=poses, betas=betas, keypoint_order="openpose").keypoints
    return joint_angles(kp, side=kp_model.side, rest_frames=rest)
