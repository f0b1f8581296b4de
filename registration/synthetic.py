"""Synthetic scan sequences with known ground truth, for tests, benchmarks and the demo.

`make_sequence` poses a subject (the model's template + `betas` + small smooth per-vertex `offsets`) through a
smooth known motion and scans every frame the way a real capture would see it:

- **partial** (default): a single-view depth sensor `sensor_distance` in front of the palm casts a grid of
  rays (perspective); each ray's first hit on the hand (or forearm) is a point, so only the visible side is
  scanned and the grid is thinned at random to the requested count;
- **full**: points sampled uniformly (area-weighted) over the whole surface;
- a **forearm**: the model mesh is cut at the wrist, real scans are not, so a tube continuing the wrist's
  boundary loop along the forearm axis is scanned too;
- Gaussian **noise** (`noise` metres standard deviation per coordinate) and **outliers** (`outlier_ratio` of
  the points: 60% uniform in a box 5 cm around the hand, 40% near-surface clutter 5-30 mm off the surface).

Frame t of the ground truth follows the registration's convention (see `registration.result`):
`scale * forward(model.replace(v_template=v_template + offsets), betas, global_orient[t], hand_pose[t],
transl[t])`. All lengths are metres (times `scale`, which is 1 unless unknown-units data is asked for).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .scans import ScanSequence

#: Point labels in `GroundTruth.labels`.
HAND, FOREARM, OUTLIER = 0, 1, 2

# Finger chains as MANO joint ids (MCP, PIP, DIP) with the index of their tip in `ManoModel.tip_ids`.
_FINGERS = {
    "thumb": ((13, 14, 15), 0),
    "index": ((1, 2, 3), 1),
    "middle": ((4, 5, 6), 2),
    "ring": ((10, 11, 12), 3),
    "pinky": ((7, 8, 9), 4),
}
# Peak flexion (radians) of MCP, PIP, DIP: up to a loose fist; the thumb bends less.
_FLEX_AMPLITUDE = {"thumb": (0.35, 0.45, 0.55), "default": (1.0, 1.2, 0.8)}


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """What a synthetic sequence was made from. Lengths in metres (times `scale`)."""

    betas: np.ndarray
    """(S,) shape coefficients of the subject."""
    offsets: np.ndarray
    """(V, 3) per-vertex offsets added to the model's template, metres."""
    global_orient: np.ndarray
    """(T, 3) axis-angle wrist rotation per frame, radians."""
    hand_pose: np.ndarray
    """(T, 45) axis-angle pose of joints 1..15 per frame (flat-hand convention), radians."""
    transl: np.ndarray
    """(T, 3) translation per frame, model metres."""
    vertices: np.ndarray
    """(T, V, 3) posed subject vertices in scan coordinates (metres x `scale`)."""
    keypoints: np.ndarray
    """(T, 21, 3) posed keypoints (MANO order) in scan coordinates."""
    scale: float
    """Scan units per metre (1 unless the sequence imitates unknown units)."""
    labels: tuple[np.ndarray, ...]
    """Per frame (N_i,) int8 label of each scan point: HAND 0, FOREARM 1, OUTLIER 2."""
    sensor_origin: np.ndarray
    """(3,) position of the virtual depth sensor (partial scans), scan coordinates."""

    def to_result(self, model):
        """The ground truth as a `RegistrationResult` of `model` (what a perfect registration returns)."""
        from .result import RegistrationResult

        return RegistrationResult(
            betas=self.betas,
            offsets=self.offsets,
            global_orient=self.global_orient,
            hand_pose=self.hand_pose,
            transl=self.transl,
            scale=self.scale,
            model_name=model.name,
            side=model.side,
        )

    def save(self, path) -> None:
        """Write the arrays (and `scale`) to an `.npz`, atomically; labels as `labels_<t>`."""
        from mano_jax._atomic import atomic_path

        arrays = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), np.ndarray)
        }
        arrays.update({f"labels_{t}": labels for t, labels in enumerate(self.labels)})
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, scale=np.array(self.scale), **arrays)


def make_sequence(
    model=None,
    *,
    num_frames: int = 60,
    points_per_frame: int = 5000,
    partial: bool = True,
    noise: float = 0.001,
    outlier_ratio: float = 0.05,
    forearm: bool = True,
    seed: int = 0,
    offset_scale: float = 0.002,
    beta_scale: float = 1.0,
    unordered: bool = False,
    scale: float = 1.0,
    keypoint_noise: float | None = None,
    fps: float = 30.0,
    sensor_distance: float = 0.5,
    forearm_length: float = 0.08,
) -> tuple[ScanSequence, GroundTruth]:
    """A synthetic scan sequence of one subject and its ground truth.

    Args:
      model: the hand model (default: `mano_jax.load_model()`).
      num_frames: T.
      points_per_frame: points per scan, outliers and forearm included.
      partial: single-view depth-sensor scans (True) or full surface samples (False).
      noise: standard deviation of the Gaussian noise per coordinate, metres.
      outlier_ratio: share of each scan's points that are outliers.
      forearm: also scan a forearm continuing beyond the wrist.
      seed: random seed (subject, motion, sampling, noise).
      offset_scale: RMS of the subject's per-vertex offsets, metres (a smooth displacement along the
        template's normals, so it changes the surface and is not explained by betas).
      beta_scale: standard deviation of the subject's betas (clipped at 2 standard deviations).
      unordered: independent random poses per frame (an unordered scan set) instead of smooth motion.
      scale: multiply the scans (and ground-truth geometry) by this, imitating unknown units; the
        sequence is then flagged `units="unknown"`.
      keypoint_noise: if given, attach ground-truth keypoints with this Gaussian noise (metres) to the
        scans.
      fps: frame rate of the smooth motion (its speeds are in seconds).
      sensor_distance: distance from the sensor to the hand, metres.
      forearm_length: length of the scanned forearm, metres.
    """
    import jax
    import jax.numpy as jnp

    from mano_jax import forward

    if model is None:
        from mano_jax import load_model

        model = load_model()
    if num_frames < 1 or points_per_frame < 10:
        raise ValueError(f"need num_frames >= 1 and points_per_frame >= 10, got {num_frames}, {points_per_frame}")
    if not 0 <= outlier_ratio < 1:
        raise ValueError(f"outlier_ratio must be in [0, 1), got {outlier_ratio}")
    rng = np.random.default_rng(seed)
    faces = np.asarray(model.faces)
    betas, offsets = make_subject(model, rng, offset_scale=offset_scale, beta_scale=beta_scale)
    if unordered:
        global_orient, hand_pose, transl = random_poses(model, num_frames, rng)
    else:
        global_orient, hand_pose, transl = smooth_motion(model, num_frames, fps=fps, phase=rng.uniform(0, 2 * np.pi))

    dtype = model.dtype
    subject = model.replace(v_template=model.v_template + jnp.asarray(offsets, dtype))
    out = jax.jit(forward)(
        subject,
        hand_pose=jnp.asarray(hand_pose, dtype),
        betas=jnp.asarray(np.broadcast_to(betas, (num_frames, betas.shape[0])), dtype),
        global_orient=jnp.asarray(global_orient, dtype),
        transl=jnp.asarray(transl, dtype),
    )
    vertices = np.asarray(out.vertices, np.float64)
    joints = np.asarray(out.joints, np.float64)
    keypoints = np.asarray(out.keypoints, np.float64)

    wrist_loop = _wrist_loop(faces, np.asarray(model.v_template), np.asarray(model.J_regressor)[0]) if forearm else None
    # The sensor looks at the palm of the first frame's hand, from `sensor_distance` away.
    centre = vertices[0].mean(axis=0)
    palm_normal = _palm_normal(joints[0], model.side)
    sensor = centre + sensor_distance * palm_normal

    points, labels, pitch = [], [], None
    for t in range(num_frames):
        verts, tri, is_forearm = vertices[t], faces, None
        if forearm:
            # Joint 4 (middle MCP) hangs off the wrist alone, so wrist->MCP follows the global rotation only.
            axis = joints[t, 0] - joints[t, 4]
            tube_v, tube_f = _forearm_tube(verts[wrist_loop], axis / np.linalg.norm(axis), forearm_length)
            tri = np.concatenate([faces, tube_f + len(verts)])
            verts = np.concatenate([verts, tube_v])
            is_forearm = np.arange(len(tri)) >= len(faces)
        n_outliers = int(round(outlier_ratio * points_per_frame))
        n_surface = points_per_frame - n_outliers
        if partial:
            p, face, pitch = _depth_scan(verts, tri, sensor, n_surface, rng, pitch)
        else:
            p, face = _surface_samples(verts, tri, n_surface, rng)
        lab = np.where(is_forearm[face], FOREARM, HAND) if forearm else np.full(len(p), HAND)
        p = p + rng.normal(0.0, noise, p.shape)
        out_p = _outliers(p, n_outliers, rng)
        p = np.concatenate([p, out_p])
        lab = np.concatenate([lab, np.full(len(out_p), OUTLIER)]).astype(np.int8)
        order = rng.permutation(len(p))
        points.append(scale * p[order])
        labels.append(lab[order])

    kp_seen = None
    if keypoint_noise is not None:
        kp_seen = scale * (keypoints + rng.normal(0.0, keypoint_noise, keypoints.shape))
    scans = ScanSequence(
        points=tuple(points),
        normals=(None,) * num_frames,
        names=tuple(f"synthetic_{t:04d}" for t in range(num_frames)),
        unit_scale=1.0,
        units="m" if scale == 1.0 else "unknown",
        keypoints=kp_seen,
        keypoint_confidence=None if kp_seen is None else np.ones((num_frames, 21)),
        unordered=unordered,
    )
    truth = GroundTruth(
        betas=betas,
        offsets=offsets,
        global_orient=global_orient,
        hand_pose=hand_pose,
        transl=transl,
        vertices=scale * vertices,
        keypoints=scale * keypoints,
        scale=float(scale),
        labels=tuple(labels),
        sensor_origin=scale * sensor,
    )
    return scans, truth


def make_subject(model, rng: np.random.Generator, *, offset_scale: float = 0.002, beta_scale: float = 1.0):
    """(betas (S,), offsets (V, 3)) of a random subject: betas ~ N(0, beta_scale^2) clipped at +-2 sd,
    offsets a Laplacian-smoothed random displacement along the template's vertex normals with RMS
    `offset_scale` metres."""
    import scipy.sparse
    import trimesh

    s = model.num_betas
    betas = np.clip(rng.normal(0.0, beta_scale, s), -2 * beta_scale, 2 * beta_scale) if beta_scale > 0 else np.zeros(s)
    template = np.asarray(model.v_template, np.float64)
    faces = np.asarray(model.faces)
    if offset_scale <= 0:
        return betas, np.zeros_like(template)
    mesh = trimesh.Trimesh(template, faces, process=False)
    edges = mesh.edges_unique
    v = len(template)
    adjacency = scipy.sparse.coo_matrix((np.ones(2 * len(edges)), (edges.ravel(), edges[:, ::-1].ravel())), (v, v)).tocsr()
    degree = np.maximum(np.asarray(adjacency.sum(axis=1)).ravel(), 1)
    height = rng.normal(size=v)
    # Repeated neighbour averaging leaves bumps a few centimetres wide: body-shape detail rather than noise.
    for _ in range(60):
        height = 0.5 * height + 0.5 * (adjacency @ height) / degree
    height -= height.mean()
    height *= offset_scale / np.sqrt(np.mean(height**2))
    return betas, height[:, None] * np.asarray(mesh.vertex_normals)


def _finger_axes(model) -> dict[str, tuple[np.ndarray, ...]]:
    """Per finger and joint (MCP, PIP, DIP) the rest-pose flexion axis: a positive rotation turns the bone
    towards the joint's flexion direction in the frames `JointLimits` measures angles in (the palm for the
    fingers; across the palm towards the little finger for the thumb, where its MCP and IP hinges bend --
    the palm normal would be palmar abduction), so the motion stays inside the default joint limits."""
    from mano_jax.priors import rest_frames

    frames = rest_frames(model)
    axes = {}
    for name, (chain, _) in _FINGERS.items():
        flex = [np.cross(frames[j - 1, 0], frames[j - 1, 1]) for j in chain]
        axes[name] = tuple(a / np.linalg.norm(a) for a in flex)
    return axes


def _palm_normal(joints: np.ndarray, side: str) -> np.ndarray:
    """Unit normal pointing out of the palm (the side fingers curl to), from the wrist and the index and
    pinky MCP joints; mirrored for a left hand."""
    n = np.cross(joints[1] - joints[0], joints[7] - joints[0])
    n = n / np.linalg.norm(n)
    return n if side == "right" else -n


def _pose_from_flexion(axes, flexion: dict[str, np.ndarray], spread: np.ndarray, palm: np.ndarray) -> np.ndarray:
    """(T, 45) hand pose from per-finger flexion levels (T,) in [0, 1] and a spread angle (T,) radians."""
    t = len(spread)
    pose = np.zeros((t, 15, 3))
    spread_sign = {"index": -1.0, "middle": 0.0, "ring": 0.5, "pinky": 1.0, "thumb": -0.5}
    for name, (chain, _) in _FINGERS.items():
        amplitude = _FLEX_AMPLITUDE.get(name, _FLEX_AMPLITUDE["default"])
        for k, joint in enumerate(chain):
            pose[:, joint - 1] = (amplitude[k] * flexion[name])[:, None] * axes[name][k][None, :]
        pose[:, chain[0] - 1] += (spread_sign[name] * spread)[:, None] * palm[None, :]
    return pose.reshape(t, 45)


def smooth_motion(model, num_frames: int, *, fps: float = 30.0, phase: float = 0.0):
    """(global_orient (T, 3), hand_pose (T, 45), transl (T, 3)) of a smooth, plausible motion.

    The hand turns up to ~35 degrees about its long axis and ~20 degrees about the other two, drifts a few
    centimetres, and the fingers open and close in a wave (each finger lags the previous one), PIP and DIP
    following the MCP as real fingers do; the fingers spread a little while open.
    """
    time = np.arange(num_frames) / fps
    axes = _finger_axes(model)
    rest = np.asarray(model.J_regressor @ model.v_template, np.float64)
    palm = _palm_normal(rest, model.side)
    flexion = {}
    for k, name in enumerate(("index", "middle", "ring", "pinky", "thumb")):
        flexion[name] = 0.5 - 0.5 * np.cos(2 * np.pi * time / 2.0 + phase - 0.6 * k)
    spread = 0.12 * (1.0 - flexion["middle"]) - 0.04
    hand_pose = _pose_from_flexion(axes, flexion, spread, palm)

    long_axis = rest[4] - rest[0]
    long_axis /= np.linalg.norm(long_axis)
    side_axis = np.cross(long_axis, palm)
    global_orient = (
        (0.6 * np.sin(2 * np.pi * time / 4.0 + phase))[:, None] * long_axis[None]
        + (0.35 * np.sin(2 * np.pi * time / 3.0 + 0.5 * phase))[:, None] * side_axis[None]
        + (0.3 * np.sin(2 * np.pi * time / 5.0 + 2 * phase))[:, None] * palm[None]
    )
    transl = np.stack(
        [
            0.03 * np.sin(2 * np.pi * time / 3.5 + phase),
            0.02 * np.sin(2 * np.pi * time / 4.5 + 1.0),
            0.015 * time,
        ],
        axis=1,
    )
    return global_orient, hand_pose, transl


def random_poses(model, num_frames: int, rng: np.random.Generator):
    """(global_orient, hand_pose, transl) of independent random plausible poses (an unordered scan set):
    random flexion per finger, orientation within ~+-35 degrees of facing the sensor, +-3 cm shifts."""
    axes = _finger_axes(model)
    rest = np.asarray(model.J_regressor @ model.v_template, np.float64)
    palm = _palm_normal(rest, model.side)
    flexion = {name: rng.uniform(0.0, 1.0, num_frames) for name in _FINGERS}
    spread = rng.uniform(-0.05, 0.12, num_frames)
    hand_pose = _pose_from_flexion(axes, flexion, spread, palm)
    global_orient = rng.uniform(-0.6, 0.6, (num_frames, 3))
    transl = rng.uniform(-0.03, 0.03, (num_frames, 3))
    return global_orient, hand_pose, transl


def _wrist_loop(faces: np.ndarray, template: np.ndarray, wrist_weights: np.ndarray) -> np.ndarray:
    """Vertex ids of the open boundary loop nearest the wrist joint, in order around the loop."""
    from mano_jax.mesh import boundary_loops

    loops = boundary_loops(faces)
    if not loops:
        raise ValueError("the model mesh has no open boundary at the wrist to attach a forearm to; use forearm=False")
    wrist = wrist_weights @ template
    return min(loops, key=lambda loop: np.linalg.norm(template[loop].mean(axis=0) - wrist))


def _forearm_tube(loop: np.ndarray, axis: np.ndarray, length: float, rings: int = 8):
    """(vertices, faces) of a tube that extrudes the wrist loop (L, 3) along `axis`, widening by 15%."""
    centre = loop.mean(axis=0)
    steps = np.linspace(0.0, 1.0, rings + 1)[1:]
    # Each ring is the wrist loop widened about its centre and pushed along the forearm axis.
    verts = np.concatenate(
        [loop]
        + [centre + (1.0 + 0.15 * s) * (loop - centre) + s * length * axis for s in steps]
    )
    n = len(loop)
    i = np.arange(n)
    j = (i + 1) % n
    faces = []
    for r in range(rings):
        a, b = r * n, (r + 1) * n
        faces.append(np.stack([a + i, b + i, a + j], axis=1))
        faces.append(np.stack([a + j, b + i, b + j], axis=1))
    # The first ring is the hand's own boundary, duplicated so the tube is a separate piece.
    return verts, np.concatenate(faces)


def _surface_samples(verts: np.ndarray, faces: np.ndarray, count: int, rng: np.random.Generator):
    """`count` points uniform over the surface (area-weighted) and the face each lies on."""
    tri = verts[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    face = rng.choice(len(faces), count, p=area / area.sum())
    r1, r2 = rng.random(count), rng.random(count)
    flip = r1 + r2 > 1
    r1, r2 = np.where(flip, 1 - r1, r1), np.where(flip, 1 - r2, r2)
    t = tri[face]
    return t[:, 0] + r1[:, None] * (t[:, 1] - t[:, 0]) + r2[:, None] * (t[:, 2] - t[:, 0]), face


def _depth_scan(verts, faces, origin, count: int, rng: np.random.Generator, pitch: float | None = None):
    """Points a pinhole depth sensor at `origin`, looking at the mesh's centre, sees: the first hit of each
    ray of a pixel grid fine enough to give at least `count` hits, thinned at random to `count`.

    `pitch`: the grid's starting pixel pitch (view-angle tangent); returns (points, faces hit, a pitch that
    gives about 1.5 `count` hits on this view, to start the next frame from).
    """
    forward = verts.mean(axis=0) - origin
    forward /= np.linalg.norm(forward)
    helper = np.array([0.0, 1.0, 0.0]) if abs(forward[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    right = np.cross(helper, forward)
    right /= np.linalg.norm(right)
    up = np.cross(forward, right)
    cam = (verts - origin) @ np.stack([right, up, forward], axis=1)
    uv = cam[:, :2] / cam[:, 2:3]  # image-plane coordinates (tangent of the view angle)
    lo = uv.min(axis=0)
    if pitch is None:
        pitch = 0.001 / np.median(cam[:, 2])  # ~1 mm on the hand
    for _ in range(8):
        hits, face = _raycast_grid(cam, faces, uv, lo, pitch)
        if len(hits) >= count:
            break
        pitch *= np.sqrt(len(hits) / (1.5 * count)) if len(hits) else 0.5
    else:
        raise RuntimeError(f"virtual sensor sees only {len(hits)} points, fewer than the {count} asked for")
    keep = rng.choice(len(hits), count, replace=False)
    world = hits[keep] @ np.stack([right, up, forward], axis=0) + origin
    # Hits scale with 1 / pitch^2: aim the next frame at 1.5x the need (margin for a changing view).
    return world, face[keep], pitch * np.sqrt(len(hits) / (1.5 * count))


def _raycast_grid(cam: np.ndarray, faces: np.ndarray, uv: np.ndarray, lo: np.ndarray, pitch: float):
    """First hits (camera coordinates) of the rays through a pixel grid of `pitch` starting at `lo`, and
    the face hit. Each triangle is tested only against the pixels of its own bounding box."""
    tri_uv = uv[faces]
    i0 = np.ceil((tri_uv[..., 0].min(axis=1) - lo[0]) / pitch).astype(int)
    i1 = np.floor((tri_uv[..., 0].max(axis=1) - lo[0]) / pitch).astype(int)
    j0 = np.ceil((tri_uv[..., 1].min(axis=1) - lo[1]) / pitch).astype(int)
    j1 = np.floor((tri_uv[..., 1].max(axis=1) - lo[1]) / pitch).astype(int)
    rows, cols = np.maximum(i1 - i0 + 1, 0), np.maximum(j1 - j0 + 1, 0)
    count = rows * cols
    f_idx = np.repeat(np.arange(len(faces)), count)
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    pi = i0[f_idx] + local // cols[f_idx]
    pj = j0[f_idx] + local % cols[f_idx]
    # Möller-Trumbore from the camera centre along the (unnormalised) ray (u, v, 1): t is then the depth.
    d = np.stack([lo[0] + pi * pitch, lo[1] + pj * pitch, np.ones(len(pi))], axis=1)
    tri = cam[faces[f_idx]]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    p = np.cross(d, e2)
    det = np.einsum("ij,ij->i", e1, p)
    ok = np.abs(det) > 1e-18
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = -tri[:, 0]
    b1 = np.einsum("ij,ij->i", s, p) * inv
    q = np.cross(s, e1)
    b2 = np.einsum("ij,ij->i", d, q) * inv
    depth = np.einsum("ij,ij->i", e2, q) * inv
    hit = ok & (b1 >= 0) & (b2 >= 0) & (b1 + b2 <= 1) & (depth > 0)
    pixel = (pi.astype(np.int64) << 32) | pj.astype(np.int64)
    order = np.nonzero(hit)[0]
    order = order[np.lexsort((depth[order], pixel[order]))]
    first = order[np.unique(pixel[order], return_index=True)[1]]
    # The point from its barycentric coordinates lies on the triangle even where a ray grazes a sliver
    # (there `depth` loses digits).
    points = tri[first, 0] + b1[first, None] * e1[first] + b2[first, None] * e2[first]
    return points, f_idx[first]


def _outliers(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` outliers: 60% uniform in a box 5 cm around `points`, 40% clutter 5-30 mm off them."""
    if count == 0:
        return np.zeros((0, 3))
    n_box = int(round(0.6 * count))
    lo, hi = points.min(axis=0) - 0.05, points.max(axis=0) + 0.05
    box = rng.uniform(lo, hi, (n_box, 3))
    direction = rng.normal(size=(count - n_box, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    near = points[rng.integers(0, len(points), count - n_box)] + rng.uniform(0.005, 0.03, (count - n_box, 1)) * direction
    return np.concatenate([box, near])
