"""`register_sequence`: register a scanned hand sequence (or an unordered scan set) in stages.

1. Stage 0 (`initialise`): on the first good frame, a multi-hypothesis rigid search over orientations
   (the scan's principal axes with sign flips and turns about the long axis, plus 60 rotations spread
   over all orientations; and the keypoints' alignment when keypoints are given) and, for unknown units,
   over sizes; the best hypotheses of each group (hand pointing either way along the scan, each starting
   size) refined with an articulated fit and compared by `_placement_cost`; then the shape (betas) and,
   for unknown units, a global scale.
2. Tracking with that first template (`track`): windows of frames solved jointly, each new frame
   starting from a constant-velocity extrapolation of the frames before it.
3. Stage 1 (`fit_template`): betas + smooth per-vertex offsets (and, for unknown units, the global scale
   again) fitted jointly over keyframes spread through the sequence, each keyframe with its own pose.
4. Stage 2 (`track` again): every frame re-fitted with the subject template, temporal smoothness on
   velocity and acceleration, starting from step 2's poses.

An unordered set runs stage 0 on every frame, stage 1, and stage 2 without temporal terms.
With `checkpoint_dir`, each stage (and each window of tracking) is saved atomically as it finishes and a
re-run resumes; an interrupt loses at most the window in progress. All lengths are metres.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from mano_jax import lbs
from mano_jax._atomic import atomic_path
from mano_jax.model import ManoModel
from mano_jax.priors import JointLimits, PosePrior

from . import stages
from .config import RegistrationConfig
from .correspondences import closest_on_candidates, estimate_normals, vertex_faces, vertex_neighbours, vertex_normals
from .result import RegistrationResult
from .scans import ScanSequence

logger = logging.getLogger("registration")

_MIN_FRAME_POINTS = 30
# Stage-0 articulated refinement rounds: (robust scale, pose prior weight) multipliers.
_INIT_SCHEDULE = ((8.0, 100.0), (4.0, 30.0), (2.0, 10.0)) + ((1.0, 1.0),) * 5
# Stage-0 shifts (metres, towards the fingers) of each rigid placement refined.
_INIT_SHIFTS = (0.0, 0.02)
# Length / width of a scan above which a solved scale is not trusted (`long_scan_warning`).
_LONG_SCAN = 3.0
# Stage-0 starting sizes for unknown units, times the scan's spread over the model's (a scan that runs on
# up the forearm, or has outliers, is wider than its hand); `rigid_candidates` adds one from the width.
_INIT_SIZES = (1.0, 0.7, 0.5)
# Rounds in which each stage-0 candidate's own scale is solved (unknown units) before they are compared.
_RESCALE_ROUNDS = 3
# Cost, added to a stage-0 candidate's placement cost when the scale is solved, of its model surface being
# all more than two robust scales from the scan (a partial view leaves about half of the right hand's
# uncovered, two thirds or more of a hand far too large).
_UNCOVERED_COST = 0.1
# Frames (spread through the sequence, the first included) whose stage 0 decides the size of a long scan.
_SIZE_FRAMES = 3
_OFFSET_CG_ITERATIONS = 150
_CHECKPOINT_FORMAT = "mano-jax-registration-checkpoint/3"


class RegistrationError(ValueError):
    """The registration cannot proceed on this input (e.g. no frame has usable points)."""


# ------------------------------------------------------------------------------------------------------
# The prepared problem (host data shared by all stages)
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    """A scan sequence prepared for the solvers: fixed-size point arrays, normals, search trees.

    Points are in the scans' metres, less `origin`; `scale` (scan units per model metre) is 1 until stage 0
    solves it. The solvers' translations are relative to `origin` too (`Registration` adds it back).
    """

    model: ManoModel
    config: RegistrationConfig
    points: np.ndarray
    """(T, N, 3) scan points less `origin` (padded with zeros), scan metres."""
    mask: np.ndarray
    """(T, N) 1 for real points."""
    normals: np.ndarray
    """(T, N, 3) unit normals (from the file, else estimated)."""
    counts: np.ndarray
    """(T,) real points per frame."""
    keypoints: np.ndarray
    """(T, 21, 3) keypoints less `origin` (zeros if none), scan metres."""
    keypoint_conf: np.ndarray
    """(T, 21) keypoint confidences (0 if none)."""
    valid: np.ndarray
    """(T,) True for frames with enough points."""
    names: tuple[str, ...]
    unordered: bool
    solve_scale: bool
    priors: stages.Priors
    vertex_faces: np.ndarray
    mesh: stages.Mesh
    cut_offset: float
    origin: np.ndarray
    """(3,) the median of the sequence's points, scan units. Scans in a sensor's or a scanner's coordinates
    can lie a metre or more from their origin, where float32 keeps only ~0.1 micrometre of each coordinate
    and the solvers' squared distances lose far more (1.6 m away, the mean error tripled)."""
    scale: float = 1.0
    _trees: dict = dataclasses.field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return self.points.shape[0]

    @property
    def good_frames(self) -> np.ndarray:
        return np.flatnonzero(self.valid)

    def tree(self, frame: int) -> cKDTree:
        if frame not in self._trees:
            self._trees[frame] = cKDTree(self.points[frame, : self.counts[frame]])
        return self._trees[frame]

    def weights(self, *, temporal: bool, keypoint_weight=None) -> stages.Weights:
        return stages.Weights.from_config(
            self.config, self.cut_offset, self.model.dtype, temporal=temporal, keypoint_weight=keypoint_weight
        )

    def frames(self, ids, scale: float, *, slot_scales=None) -> stages.Frames:
        """A device batch of frames `ids` (-1 = padding) with points divided by `scale` (per slot if
        `slot_scales` is given)."""
        ids = np.asarray(ids)
        real = ids >= 0
        safe = np.where(real, ids, 0)
        div = np.full(len(ids), scale) if slot_scales is None else np.asarray(slot_scales, np.float64)
        dt = self.model.dtype
        f = lambda x: jnp.asarray(x, dt)  # noqa: E731
        return stages.Frames(
            points=f(self.points[safe] / div[:, None, None]),
            mask=f(self.mask[safe] * real[:, None]),
            normals=f(self.normals[safe]),
            keypoints=f(self.keypoints[safe] / div[:, None, None]),
            keypoint_conf=f(self.keypoint_conf[safe] * real[:, None]),
            valid=f(self.valid[safe] & real),
            active=f(real),
        )


def prepare(scans, model: ManoModel, config: RegistrationConfig) -> Problem:
    """Subsample/pad every frame to `config.max_points`, estimate missing normals, set up priors."""
    if not isinstance(scans, ScanSequence):
        scans = ScanSequence.from_arrays([np.asarray(s, np.float64) for s in scans], units="m")
    t = scans.num_frames
    if t == 0:
        raise RegistrationError("the scan sequence has no frames")
    n = config.max_points
    rng = np.random.default_rng(config.seed)
    points = np.zeros((t, n, 3))
    normals = np.zeros((t, n, 3))
    normals[..., 2] = 1.0
    mask = np.zeros((t, n))
    counts = np.zeros(t, np.int64)
    valid = np.zeros(t, bool)
    bad = set(scans.bad_frames)
    for i, (p, nrm) in enumerate(zip(scans.points, scans.normals)):
        p = np.asarray(p, np.float64)
        finite = np.all(np.isfinite(p), axis=1)
        if nrm is not None:
            finite &= np.all(np.isfinite(nrm), axis=1)
        p = p[finite]
        nrm = None if nrm is None else np.asarray(nrm, np.float64)[finite]
        if i in bad or len(p) < _MIN_FRAME_POINTS:
            if i not in bad:
                logger.warning("frame %d (%s): only %d usable points; treated as a gap", i, scans.names[i], len(p))
            continue
        if len(p) > n:
            keep = rng.choice(len(p), n, replace=False)
            p = p[keep]
            nrm = None if nrm is None else nrm[keep]
        if nrm is None:
            nrm = estimate_normals(p)
        m = len(p)
        points[i, :m] = p
        normals[i, :m] = nrm
        mask[i, :m] = 1.0
        counts[i] = m
        valid[i] = True
    if not valid.any():
        raise RegistrationError("no frame of the sequence has usable points (all frames are empty or bad)")
    origin = np.median(points[mask > 0], axis=0)
    points = np.where(mask[..., None] > 0, points - origin, 0.0)

    keypoints = np.zeros((t, 21, 3))
    conf = np.zeros((t, 21))
    if scans.keypoints is not None:
        kp = np.asarray(scans.keypoints, np.float64)
        c = np.ones((t, 21)) if scans.keypoint_confidence is None else np.asarray(scans.keypoint_confidence, np.float64)
        ok = np.all(np.isfinite(kp), axis=-1) & np.isfinite(c)
        keypoints = np.where(ok[..., None], kp - origin, 0.0)
        conf = np.where(ok, np.clip(c, 0.0, 1.0), 0.0)

    unordered = scans.unordered if config.unordered is None else config.unordered
    solve_scale = (scans.units == "unknown") if config.solve_scale is None else config.solve_scale
    faces = np.asarray(model.faces)
    edges, degree = vertex_neighbours(faces, model.num_vertices)
    return Problem(
        model=model,
        config=config,
        points=points,
        mask=mask,
        normals=normals,
        counts=counts,
        keypoints=keypoints,
        keypoint_conf=conf,
        valid=valid,
        names=tuple(scans.names),
        unordered=bool(unordered),
        solve_scale=bool(solve_scale),
        priors=stages.Priors(
            pose=PosePrior.from_model(model, min_std=config.pose_prior_min_std), limits=JointLimits.default(model)
        ),
        vertex_faces=vertex_faces(faces, model.num_vertices),
        mesh=stages.Mesh(edges=jnp.asarray(edges), degree=jnp.asarray(degree, model.dtype)),
        cut_offset=stages.wrist_cut_offset(model, config.scale_forearm_margin if solve_scale else config.forearm_margin),
        origin=origin,
    )


# ------------------------------------------------------------------------------------------------------
# Correspondence search
# ------------------------------------------------------------------------------------------------------


@jax.jit
def _posed_batch(hand, params, betas, scale):
    return stages.posed(hand, params, betas, scale)


def _posed_window(problem: Problem, hand, poses: "Poses", betas, scale):
    """`_posed_batch` of a few frames padded to a window's worth: every caller then shares one compiled
    shape (each distinct batch size cost seconds of compilation)."""
    n = len(poses.transl)
    padded = poses.take(np.minimum(np.arange(max(problem.config.window, n)), n - 1))
    verts, keypoints = _posed_batch(hand, padded.device(problem.model.dtype), betas, scale)
    return verts[:n], keypoints[:n]


def _closest_faces(verts, points, cand, faces):
    """(B, N) the closest triangle to each point among its candidates (B, N, K)."""
    return jax.vmap(lambda v, p, c: closest_on_candidates(p, v, faces, c)[0])(verts, points, cand)


@functools.partial(jax.jit, static_argnames=("k_nearest",))
def _match_brute(verts, points, mask, vertex_faces_table, faces, *, k_nearest: int):
    def one(args):
        v, p, m = args
        d2 = jnp.sum(p * p, -1)[:, None] - 2.0 * p @ v.T + jnp.sum(v * v, -1)[None, :]
        _, nearest = jax.lax.top_k(-d2, k_nearest)
        cand = vertex_faces_table[nearest].reshape(p.shape[0], -1)
        cand = jnp.where(cand < 0, jnp.broadcast_to(cand[:, :1], cand.shape), cand)
        scan_nn = jnp.argmin(jnp.where(m[:, None] > 0, d2, jnp.inf), axis=0).astype(jnp.int32)
        return closest_on_candidates(p, v, faces, cand)[0], scan_nn

    return jax.lax.map(one, (verts, points, mask))


_closest_faces_jit = jax.jit(_closest_faces)


def match(problem: Problem, ids, verts, scale: float, slot_scales=None) -> stages.Matches:
    """Correspondences for a batch of frames `ids` (-1 = padding) given the posed model vertices
    `verts` (B, V, 3) in the same units as the frames' points divided by `scale` (or `slot_scales`).

    Nearest model vertices of the scan points (and nearest scan points of the model vertices) come from
    KD-trees on the host or brute force in the graph (`config.nearest_neighbours`); the closest
    triangle among those vertices' neighbours is then chosen in the graph.
    """
    ids = np.asarray(ids)
    k = problem.config.candidate_vertices
    div = np.full(len(ids), scale) if slot_scales is None else np.asarray(slot_scales, np.float64)
    vf = problem.vertex_faces
    safe = np.where(ids >= 0, ids, 0)
    dt = problem.model.dtype
    pts = jnp.asarray(problem.points[safe] / div[:, None, None], dt)
    faces = problem.model.faces
    if problem.config.nearest_neighbours == "brute":
        tri, scan_nn = _match_brute(
            jnp.asarray(verts, dt), pts, jnp.asarray(problem.mask[safe] * (ids >= 0)[:, None], dt), jnp.asarray(vf), faces,
            k_nearest=k,
        )
        return stages.Matches(faces=tri, scan_nn=scan_nn)
    verts_np = np.asarray(verts, np.float64)
    b, v = verts_np.shape[:2]
    n = problem.points.shape[1]
    width = k * vf.shape[1]
    cand = np.broadcast_to(np.resize(vf[0], width), (b, n, width)).copy()
    scan_nn = np.zeros((b, v), np.int32)
    for slot, f in enumerate(ids):
        if f < 0 or not problem.valid[f]:
            continue
        c = problem.counts[f]
        _, nearest = cKDTree(verts_np[slot]).query(problem.points[f, :c] / div[slot], k=k, workers=-1)
        rows = vf[nearest.reshape(c, k)].reshape(c, width)
        # Pad entries (-1) of low-valence vertices repeat the row's first triangle.
        cand[slot, :c] = np.where(rows < 0, rows[:, :1], rows)
        _, scan_nn[slot] = problem.tree(f).query(verts_np[slot] * div[slot], k=1, workers=-1)
    tri = _closest_faces_jit(jnp.asarray(verts, dt), pts, jnp.asarray(cand, jnp.int32), faces)
    return stages.Matches(faces=tri, scan_nn=jnp.asarray(scan_nn, jnp.int32))


# ------------------------------------------------------------------------------------------------------
# Parameter containers on the host
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Poses:
    """Per-frame pose parameters on the host (float64)."""

    hand_pose: np.ndarray  # (T, 45)
    rot: np.ndarray  # (T, 3, 3)
    transl: np.ndarray  # (T, 3)

    @classmethod
    def identity(cls, t: int) -> "Poses":
        return cls(np.zeros((t, 45)), np.tile(np.eye(3), (t, 1, 1)), np.zeros((t, 3)))

    def take(self, ids) -> "Poses":
        ids = np.asarray(ids)
        return Poses(self.hand_pose[ids].copy(), self.rot[ids].copy(), self.transl[ids].copy())

    def put(self, ids, other: "Poses") -> None:
        self.hand_pose[ids] = other.hand_pose
        self.rot[ids] = other.rot
        self.transl[ids] = other.transl

    def device(self, dtype) -> stages.Params:
        return stages.Params(
            hand_pose=jnp.asarray(self.hand_pose, dtype),
            rot=jnp.asarray(self.rot, dtype),
            transl=jnp.asarray(self.transl, dtype),
        )

    @classmethod
    def from_device(cls, p: stages.Params) -> "Poses":
        rot = np.asarray(p.rot, np.float64)
        # Re-orthonormalise: many small rotation updates drift off SO(3) in float32.
        u, _, vt = np.linalg.svd(rot)
        rot = u @ vt
        return cls(np.asarray(p.hand_pose, np.float64), rot, np.asarray(p.transl, np.float64))

    def copy(self) -> "Poses":
        return Poses(self.hand_pose.copy(), self.rot.copy(), self.transl.copy())

    def finite(self) -> np.ndarray:
        return (
            np.all(np.isfinite(self.hand_pose), 1)
            & np.all(np.isfinite(self.rot), (1, 2))
            & np.all(np.isfinite(self.transl), 1)
        )

    def arrays(self, prefix: str) -> dict:
        return {f"{prefix}hand_pose": self.hand_pose, f"{prefix}rot": self.rot, f"{prefix}transl": self.transl}

    @classmethod
    def from_arrays(cls, data, prefix: str) -> "Poses":
        return cls(*(np.array(data[f"{prefix}{k}"]) for k in ("hand_pose", "rot", "transl")))


def _rounds(problem, hand, ids, poses: Poses, betas, weights, rounds, *, frame_scale=None, log_scale=0.0,
            shape_mask=None, boundary=None, slot_scales=None, widen=()):
    """`rounds` x (correspondences, Gauss-Newton steps) on a batch of frames `ids` (-1 = padding).

    Points are divided by `frame_scale` (default the problem's scale; or per slot `slot_scales`); the
    model is scaled by exp(`log_scale`). `shape_mask` (S + 1,) selects shared betas / log scale to solve.
    `widen`: robust-kernel and gate multipliers of the first rounds (never the last, so the energies and
    distances returned are the configured ones).
    Returns (Poses, betas, log scale, energy (B,), distances (B, N), kept points (B, N)).
    """
    dt = problem.model.dtype
    frame_scale = problem.scale if frame_scale is None else frame_scale
    frames = problem.frames(ids, frame_scale, slot_scales=slot_scales)
    params = poses.device(dt)
    shape = jnp.asarray(np.append(np.asarray(betas, np.float64), log_scale), dt)
    mask = jnp.zeros(shape.shape, dt) if shape_mask is None else jnp.asarray(shape_mask, dt)
    if boundary is None:
        m = hand.markers.shape[0]
        boundary = (jnp.zeros((2, m, 3), dt), jnp.zeros((2,), dt))
    verts, _ = _posed_batch(hand, params, shape[:-1], jnp.exp(shape[-1]))
    steps = jnp.asarray(problem.config.gauss_newton_steps, jnp.int32)
    for r in range(rounds):
        wide = widen[r] if r < min(len(widen), rounds - 1) else 1.0
        w = dataclasses.replace(weights, robust_scale=weights.robust_scale * wide, gate=weights.gate * wide)
        matches = match(problem, ids, verts, frame_scale, slot_scales)
        params, shape, cost, verts, dist, rd = stages.solve(
            hand, problem.priors, frames, matches, params, shape, mask, boundary[0], boundary[1], w, steps
        )
    shape = np.asarray(shape, np.float64)
    return (
        Poses.from_device(params),
        shape[:-1],
        float(shape[-1]),
        np.asarray(cost, np.float64),
        np.asarray(dist, np.float64),
        np.asarray(rd.keep) > 0,
    )


# ------------------------------------------------------------------------------------------------------
# Stage 0: initialisation
# ------------------------------------------------------------------------------------------------------


def _principal_axes(x: np.ndarray) -> np.ndarray:
    """(3, 3) principal axes of a point set as columns, largest variance first, right-handed."""
    c = x - np.median(x, axis=0)
    _, vecs = np.linalg.eigh(c.T @ c)
    axes = vecs[:, ::-1]
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1
    return axes


def _robust_extents(x: np.ndarray) -> np.ndarray:
    """(3,) 2nd-98th percentile extents of a point set along its principal axes, largest first."""
    return np.ptp(np.percentile(x @ _principal_axes(x), [2, 98], axis=0), axis=0)


def _robust_size(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((x - np.median(x, axis=0)) ** 2, axis=1))))


def _scan_centres(scan: np.ndarray, length: float) -> np.ndarray:
    """(3, 3) where the hand may be centred in a scan: its median, and each end of its long axis (a hand
    `length` long placed against the end), where the hand lies when the scan runs on up the forearm."""
    axis = _principal_axes(scan)[:, 0]
    along = (scan - np.median(scan, axis=0)) @ axis
    centres = [np.median(scan, axis=0)]
    for end, inward in ((np.percentile(along, 2), 1.0), (np.percentile(along, 98), -1.0)):
        middle = end + inward * min(0.5 * length, abs(end))
        slab = np.abs(along - middle) <= 0.5 * length
        centres.append(np.median(scan[slab], axis=0) if slab.any() else centres[0])
    return np.asarray(centres)


def long_scan_warning(problem: Problem, frame: int) -> str | None:
    """A warning when the scale is solved on a frame much longer than wide, or None.

    With unknown units, a scan running far up the forearm can be fitted by a hand far too large (or too
    small) and placed wrong, and an oversized hand wrapped round hand and forearm explains the scan so well
    that no residual shows it. Length over width (2nd-98th percentile extents along the principal axes) on
    6-frame synthetic sequences: a hand alone about 2, with 8 cm of forearm 2.1-3.1, 15 cm 2.8-4.0, 25 cm
    3.6-5.4. Above 3 the warning is given, and stage 0 sizes the hand on the clearest of a few frames
    (`Registration._size_from_clearest_frame`, two to four times slower); it also flags some scans that
    fit well."""
    if not problem.solve_scale:
        return None
    extent = _robust_extents(problem.points[frame, : problem.counts[frame]])
    ratio = extent[0] / max(extent[1], 1e-12)
    if ratio <= _LONG_SCAN:
        return None
    return (
        f"frame {frame} ({problem.names[frame]}) is {ratio:.1f} times as long as it is wide (a long forearm?): "
        "with unknown units the solved scale may be wrong; give the units (--units m|mm) or crop the forearm"
    )


def _hypotheses(scan: np.ndarray, model_pts: np.ndarray) -> np.ndarray:
    """(H, 3, 3) starting rotations: principal-axes alignments (4 sign choices x 4 turns about the long
    axis) and the 60 rotations of the icosahedral group (no two more than ~45 degrees from one another)
    taken in the principal axes' frames, so that the search does not depend on how the scanner's axes are
    turned (a hand fitted as scanned was lost when the same scans were turned)."""
    es, em = _principal_axes(scan), _principal_axes(model_pts)
    rots = []
    for s1 in (1.0, -1.0):
        for s2 in (1.0, -1.0):
            flip = np.diag([s1, s2, s1 * s2])
            align = es @ flip @ em.T
            for turn in (0.0, 0.5 * np.pi, np.pi, 1.5 * np.pi):
                rots.append(Rotation.from_rotvec(turn * es[:, 0]).as_matrix() @ align)
    rots.extend(es @ Rotation.create_group("I").as_matrix() @ em.T)
    return np.asarray(rots)


def _keypoint_alignment(model_kp: np.ndarray, kp: np.ndarray, conf: np.ndarray, solve_scale: bool):
    """Similarity aligning the rest model's palm keypoints (wrist, MCPs) to observed ones, or None."""
    palm = np.array([0, 1, 4, 7, 10, 13])
    w = conf[palm]
    if np.count_nonzero(w > 0) < 3:
        return None
    rot, transl, scale = lbs.procrustes(jnp.asarray(model_kp[palm]), jnp.asarray(kp[palm]), jnp.asarray(w), solve_scale=solve_scale)
    return np.asarray(rot), np.asarray(transl), float(scale)


def _start_poses(model: ManoModel) -> np.ndarray:
    """(P, 45) hand poses stage 0 starts from: flat, half-curled and the model's mean hand."""
    return np.asarray(model.hands_mean, np.float64)[None] * np.array([[0.0], [0.5], [1.0]])


def _distinct(cands: list, count: int, num_starts: int) -> list:
    """Up to `count` of `cands` (sorted by cost) that are distinct placements; while fewer than
    `num_starts` are kept, one per start pose (the articulated fit needs the finger configurations as
    much as the orientations)."""
    chosen = []
    for cand in cands:
        same = any(
            cand[0] == c[0]
            and (
                len(chosen) < num_starts
                or (
                    np.linalg.norm(Rotation.from_matrix(cand[1] @ c[1].T).as_rotvec()) < np.deg2rad(10)
                    and np.linalg.norm(cand[2] - c[2]) < 0.005 * cand[3]
                )
            )
            for c in chosen
        )
        if not same:
            chosen.append(cand)
        if len(chosen) == count:
            break
    return chosen


def rigid_candidates(problem: Problem, frame: int, solve_scale: bool, scale: float, count: int, seed: int = 0):
    """Stage 0a: the `count` best distinct rigid placements of the model in frame `frame`, the model
    held in each of the start poses (a flat hand placed on a curled one would sit off towards the wrist).

    Returns (hand pose (H, 45), rot (H, 3, 3), transl (H, 3) in forward's convention, scale (H,),
    cost (H,))."""
    cfg = problem.config
    model = problem.model
    dt = model.dtype
    f = lambda x: jnp.asarray(x, dt)  # noqa: E731
    rng = np.random.default_rng(seed + frame)
    pts = problem.points[frame, : problem.counts[frame]]
    sub = pts[rng.choice(len(pts), min(cfg.init_points, len(pts)), replace=False)]
    starts = _start_poses(model)
    rest_v = np.asarray(model.v_template, np.float64)
    picks = stages.farthest_points(rest_v, min(cfg.init_points, len(rest_v)))
    out = _posed_window(
        problem, stages.make_hand(model, np.zeros_like(rest_v), cfg.num_markers),
        Poses(starts, np.tile(np.eye(3), (len(starts), 1, 1)), np.zeros((len(starts), 3))),
        jnp.zeros(model.num_betas, dt), jnp.ones((), dt),
    )
    posed_v, posed_kp = np.asarray(out[0], np.float64), np.asarray(out[1], np.float64)
    wrist = posed_kp[0, 0]
    _, hand_dir = stages._hand_direction(model, rest_v)
    long_axis = _principal_axes(sub)[:, 0]
    results = []  # (pose index, rot, transl (ICP convention), scale, cost, starting size index)
    model_length = 0.0
    for p_idx, verts in enumerate(posed_v):
        mpts = verts[picks]
        turns = _hypotheses(sub, mpts)
        length = np.ptp(mpts @ _principal_axes(mpts)[:, 0])
        model_length = max(model_length, length)
        sizes, free = [scale], [False]
        if solve_scale:
            # Also the size at which the hand is as wide as the scan, held while the rigid search runs: a
            # long forearm stretches the spread far more than the width, and draws a hand whose size is
            # free to grow along it.
            width = _robust_extents(sub)[1] / _robust_extents(mpts)[1]
            sizes = np.append(_robust_size(sub) / _robust_size(mpts) * np.asarray(_INIT_SIZES), width)
            free = [True] * len(_INIT_SIZES) + [False]
        rots, trans, scales, size_idx, solve = [], [], [], [], []
        for k, s0 in enumerate(sizes):
            for centre in _scan_centres(sub, s0 * length):
                rots.append(turns)
                trans.append(centre - s0 * turns @ np.median(mpts, axis=0))
                scales.append(np.full(len(turns), s0))
                size_idx.append(np.full(len(turns), k))
                solve.append(np.full(len(turns), float(free[k])))
        rots, trans, scales, size_idx, solve = (np.concatenate(x) for x in (rots, trans, scales, size_idx, solve))
        if problem.keypoint_conf[frame].any():
            aligned = _keypoint_alignment(posed_kp[p_idx], problem.keypoints[frame], problem.keypoint_conf[frame], solve_scale)
            if aligned is not None:
                rots = np.concatenate([rots, aligned[0][None]])
                trans = np.concatenate([trans, aligned[1][None]])
                scales = np.concatenate([scales, [aligned[2] if solve_scale else scale]])
                size_idx = np.append(size_idx, -1)
                solve = np.append(solve, float(solve_scale))
        rot, transl, sc, cost = stages.rigid_search(
            f(sub), f(np.ones(len(sub))), f(mpts), f(rots), f(trans), f(scales),
            f(solve), f(cfg.robust_scale), f(wrist), f(hand_dir), f(problem.cut_offset),
            iterations=cfg.init_icp_iterations,
        )
        rot, transl, sc, cost = (np.asarray(x, np.float64) for x in (rot, transl, sc, cost))
        u, _, vt = np.linalg.svd(rot)
        results.extend((p_idx, *cand) for cand in zip(u @ vt, transl, sc, cost, size_idx))
    # The best placements of each group (hand pointing either way along the scan's long axis, each
    # starting size), interleaved: a rigid hand in a rest pose explains a curled hand's points barely
    # better than a forearm's, so the hand turned round onto the forearm can lead the ranking, and only
    # the articulated fit (`initialise`) tells the two apart.
    # With the scale solved, a hand far longer than the whole scan can wrap it all, forearm and outliers
    # included, at a low cost; even a fist scanned with no forearm is not half the length of a flat hand.
    too_large = 2.0 * _robust_extents(sub)[0] / model_length if solve_scale else np.inf
    groups = {}
    for cand in sorted(results, key=lambda r: r[4] if np.isfinite(r[4]) else np.inf):
        if np.isfinite(cand[4]) and cand[3] <= too_large:
            groups.setdefault((cand[5], bool((cand[1] @ hand_dir) @ long_axis >= 0)), []).append(cand)
    ranked = [_distinct(g, count, len(starts)) for g in groups.values()]
    ranked.sort(key=lambda g: g[0][4])
    chosen = [c for level in itertools.zip_longest(*ranked) for c in level if c is not None][: max(count, len(ranked))]
    if not chosen:
        raise RegistrationError(f"frame {frame} ({problem.names[frame]}): the rigid search found no finite placement")
    p_idx = np.array([c[0] for c in chosen])
    rot = np.stack([c[1] for c in chosen])
    sc = np.array([c[3] for c in chosen])
    # ICP placed s R m + t; in forward's convention (rotation about the rest wrist) the translation is
    # t / s - J0 + R J0.
    t_fwd = np.stack([c[2] for c in chosen]) / sc[:, None] - wrist[None] + np.einsum("hij,j->hi", rot, wrist)
    return starts[p_idx], rot, t_fwd, sc, np.array([c[4] for c in chosen])


def _placement_cost(problem: Problem, ids, dist, kept, slot_scales, ref_scales) -> np.ndarray:
    """(B,) how badly each slot's fit explains its frame's points (`stages.placement_cost`, as in the rigid
    search).

    The fit's energy cannot compare placements: it averages over the points kept, so a hand that cuts
    most of the scan away as forearm scores best. Distances are measured in the scans' units, with the
    robust scale of the configured one at `ref_scales` (B,), the same for all slots of a frame: in the
    model's units a larger hand would see the same scan noise smaller."""
    sigma2 = (problem.config.robust_scale * np.asarray(ref_scales)[:, None]) ** 2
    d2 = (dist * np.asarray(slot_scales)[:, None]) ** 2
    valid = np.arange(dist.shape[1])[None, :] < np.asarray([problem.counts[i] if i >= 0 else 0 for i in ids])[:, None]
    return stages.placement_cost(d2, sigma2, kept.astype(np.float64), valid.astype(np.float64))


def _with_own_scale(problem: Problem, hand, frame: int, cand: tuple, ref_scale: float) -> tuple:
    """A refined stage-0 candidate (Poses of one frame, scale, placement cost) of `frame` with its own
    scale solved (`initial_shape`) and the share of its surface far from the scan added to its cost; the
    candidate unchanged if that fails.

    Each candidate keeps the size the rigid search gave it, which a forearm skews: a hand of the right size
    and place but 9% small cost more than one 25% too small at the forearm's far end until both had their
    own scale. A hand far too large wrapped round hand and forearm explains every scan point; what gives it
    away is how much of its surface has no scan point near (bench/registration.py --robustness, unknown
    units with 15 and 25 cm of forearm)."""
    cfg, dt = problem.config, problem.model.dtype
    poses, betas, scale, cost = initial_shape(problem, frame, cand[0], cand[1], True, ref_scale, rounds=_RESCALE_ROUNDS)
    if not (np.isfinite(cost) and poses.finite()[0]):
        return cand
    verts, _ = _posed_window(problem, hand, poses, jnp.asarray(betas, dt), jnp.asarray(scale, dt))
    near, _ = problem.tree(frame).query(np.asarray(verts[0]), distance_upper_bound=2.0 * cfg.robust_scale * ref_scale)
    return poses, scale, cost + _UNCOVERED_COST * float(np.mean(~np.isfinite(near)))


def initialise(problem: Problem, frames, *, solve_scale=None, scale=None, per_frame=None) -> dict:
    """Stage 0 for each frame in `frames`: rigid multi-hypothesis search (`rigid_candidates`), then an
    articulated refinement of the best placements, packed into windows; the lowest `_placement_cost` wins
    per frame.

    The refinement is annealed: a wide robust kernel and a strong PCA pose prior first (the hand moves
    as a plausible whole while far from the data), then the configured ones. When the scale is solved,
    each refined candidate then gets its own (`initial_shape`), and the share of its surface far from the
    scan is added to its cost (`_UNCOVERED_COST`).

    Returns {frame: (Poses of one frame, scale, placement cost)}.
    """
    cfg = problem.config
    model = problem.model
    solve_scale = problem.solve_scale if solve_scale is None else solve_scale
    scale = problem.scale if scale is None else scale
    per_frame = per_frame or (cfg.window if len(frames) == 1 else cfg.init_refine)
    hand = stages.make_hand(model, np.zeros((model.num_vertices, 3)), cfg.num_markers)
    base = problem.weights(temporal=False, keypoint_weight=cfg.init_keypoint_weight)
    slots = []  # (frame, hand pose, rot, transl, scale)
    _, hand_dir = stages._hand_direction(model, np.asarray(model.v_template, np.float64))
    # Scans that run on into the forearm pull a rigid fit towards the wrist: also try each placement moved
    # towards the fingers; but not when the scale is solved, which lets the hand slide, and there are twice
    # as many groups of candidates to try (`rigid_candidates`).
    shifts = (0.0,) if solve_scale else _INIT_SHIFTS
    for f in frames:
        pose, rot, transl, sc, _ = rigid_candidates(problem, f, solve_scale, scale, -(-per_frame // len(shifts)), cfg.seed)
        variants = [
            (f, pose[h], rot[h], transl[h] + shift * rot[h] @ hand_dir, sc[h]) for h in range(len(sc)) for shift in shifts
        ]
        slots.extend(variants[:per_frame])
    # One robust scale (in scan units) per frame for `_placement_cost`, at the median size of its
    # candidates (that of a far too large one would let it explain everything).
    ref_scale = {f: float(np.median([c[4] for c in slots if c[0] == f])) for f in frames}
    best = {}
    w = cfg.window
    for start in range(0, len(slots), w):
        chunk = slots[start : start + w]
        pad = w - len(chunk)
        ids = [c[0] for c in chunk] + [-1] * pad
        poses = Poses(
            np.stack([c[1] for c in chunk] + [np.zeros(45)] * pad),
            np.stack([c[2] for c in chunk] + [np.eye(3)] * pad),
            np.stack([c[3] for c in chunk] + [np.zeros(3)] * pad),
        )
        slot_scales = np.array([c[4] for c in chunk] + [1.0] * pad)
        for wide, prior in _INIT_SCHEDULE:
            weights = dataclasses.replace(
                base, robust_scale=base.robust_scale * wide, gate=base.gate * wide, pose_prior=base.pose_prior * prior
            )
            poses, _, _, _, dist, kept = _rounds(
                problem, hand, ids, poses, np.zeros(model.num_betas), weights, 1, slot_scales=slot_scales
            )
        cost = _placement_cost(problem, ids, dist, kept, slot_scales, [ref_scale.get(i, 1.0) for i in ids])
        for k, c in enumerate(chunk):
            f = c[0]
            if not (np.isfinite(cost[k]) and poses.finite()[k]):
                continue
            cand = (poses.take([k]), slot_scales[k], float(cost[k]))
            if solve_scale:
                cand = _with_own_scale(problem, hand, f, cand, ref_scale[f])
            if f not in best or cand[2] < best[f][2]:
                best[f] = cand
    missing = [f for f in frames if f not in best]
    if missing:
        raise RegistrationError(
            f"stage 0 diverged on frame(s) {missing} ({', '.join(problem.names[f] for f in missing)})"
        )
    return best


def initial_shape(problem: Problem, frame: int, poses: Poses, scale: float, solve_scale: bool, ref_scale=None, *,
                  rounds=None):
    """Stage 0 shape: betas (and the global scale when solved) from one frame, in `rounds` rounds (default
    `config.template_rounds`). Returns (poses, betas, scale, `_placement_cost` at the robust scale of the
    configured one at `ref_scale`, default `scale`)."""
    cfg = problem.config
    ids = [frame] + [-1] * (cfg.window - 1)
    slot_poses = Poses.identity(cfg.window)
    slot_poses.put([0], poses)
    s = problem.model.num_betas
    hand = stages.make_hand(problem.model, np.zeros((problem.model.num_vertices, 3)), cfg.num_markers)
    mask = np.append(np.ones(s), 1.0 if solve_scale else 0.0)
    # One frame cannot tell a long finger from a flexed one: betas stay near the mean (the keyframes of
    # stage 1 settle them) while the scale, when solved, is found.
    weights = problem.weights(temporal=False)
    weights = dataclasses.replace(weights, shape_prior=jnp.asarray(cfg.init_shape_prior_weight, weights.shape_prior.dtype))
    # Raw scan units: the solver scales the model by the (solved) scale.
    slot_poses, betas, log_scale, _, dist, kept = _rounds(
        problem, hand, ids, slot_poses, np.zeros(s), weights, rounds or cfg.template_rounds,
        frame_scale=1.0, log_scale=np.log(scale), shape_mask=mask,
    )
    ones = np.ones(cfg.window)
    cost = _placement_cost(problem, ids, dist, kept, ones, ones * (scale if ref_scale is None else ref_scale))[0]
    return slot_poses.take([0]), betas, float(np.exp(log_scale)), float(cost)


# ------------------------------------------------------------------------------------------------------
# Stage 1: subject template
# ------------------------------------------------------------------------------------------------------


def choose_keyframes(problem: Problem, count: int) -> np.ndarray:
    """`count` good frames spread evenly through the sequence."""
    good = problem.good_frames
    if len(good) <= count:
        return good
    return good[np.unique(np.round(np.linspace(0, len(good) - 1, count)).astype(int))]


def fit_template(problem: Problem, poses: Poses, betas, keyframes, *, progress=False):
    """Stage 1: betas + per-vertex offsets over `keyframes` (at most `config.window`), each with its own
    pose (starting from `poses` of those frames), and for unknown units the global scale, starting from
    `problem.scale`. Returns (betas (S,), offsets (V, 3), keyframe Poses, scale)."""
    from tqdm.auto import tqdm

    cfg = problem.config
    dt = problem.model.dtype
    k = cfg.window
    keyframes = np.asarray(keyframes)
    ids = np.full(k, -1)
    ids[: len(keyframes)] = keyframes
    slot_poses = Poses.identity(k)
    slot_poses.put(np.arange(len(keyframes)), poses)
    offsets = np.zeros((problem.model.num_vertices, 3))
    scale = problem.scale
    weights = problem.weights(temporal=False)
    lap = jnp.asarray(cfg.offset_laplacian_weight, dt)
    mag = jnp.asarray(cfg.offset_magnitude_weight, dt)
    # Stage 0 sized the hand on one frame, where a big hand and a flexed one look alike (and a forearm
    # can pass for palm): the keyframes' poses settle the scale. In raw scan units the solver scales the
    # model.
    mask = np.append(np.ones(problem.model.num_betas), 1.0 if problem.solve_scale else 0.0)
    directions = _offset_directions(problem.model, cfg.offset_directions)
    for _ in tqdm(range(cfg.template_rounds), desc="stage 1: template", disable=not progress, leave=False):
        hand = stages.make_hand(problem.model, offsets, cfg.num_markers)
        slot_poses, betas, log_scale, *_ = _rounds(
            problem, hand, ids, slot_poses, betas, weights, 1, shape_mask=mask, frame_scale=1.0, log_scale=np.log(scale)
        )
        scale = float(np.exp(log_scale))
        params = slot_poses.device(dt)
        verts, _ = _posed_batch(hand, params, jnp.asarray(betas, dt), jnp.ones((), dt))
        matches = match(problem, ids, verts, scale)
        new, new_betas = stages.solve_template(
            hand, problem.mesh, jnp.asarray(offsets, dt), directions, problem.frames(ids, scale), matches, params,
            jnp.asarray(betas, dt), weights, lap, mag, iterations=_OFFSET_CG_ITERATIONS,
        )
        new, new_betas = np.asarray(new, np.float64), np.asarray(new_betas, np.float64)
        if np.all(np.isfinite(new)) and np.all(np.isfinite(new_betas)):
            offsets, betas = new, new_betas
        else:
            logger.warning("stage 1: the template solve was not finite; keeping the previous template")
    return betas, offsets, slot_poses.take(np.arange(len(keyframes))), scale


def _offset_directions(model: ManoModel, kind: str) -> jax.Array:
    """(V, 3, D) directions the offsets may take: the template's vertex normals, or any direction."""
    v = model.num_vertices
    if kind == "free":
        return jnp.broadcast_to(jnp.eye(3, dtype=model.dtype), (v, 3, 3))
    normals = vertex_normals(model.v_template, model.faces)
    return normals[:, :, None]


# ------------------------------------------------------------------------------------------------------
# Stage 2: tracking
# ------------------------------------------------------------------------------------------------------


def _rotvec(r):
    return Rotation.from_matrix(r).as_rotvec()


def _extrapolate(poses: Poses, last: int, prev: int | None, steps: int) -> Poses:
    """Constant-velocity extrapolation `steps` frames past frame `last` (velocity from `prev`)."""
    out = Poses.identity(1)
    if prev is None:
        return poses.take([last])
    out.hand_pose[0] = poses.hand_pose[last] + steps * (poses.hand_pose[last] - poses.hand_pose[prev])
    out.transl[0] = poses.transl[last] + steps * (poses.transl[last] - poses.transl[prev])
    turn = _rotvec(poses.rot[last] @ poses.rot[prev].T)
    out.rot[0] = Rotation.from_rotvec(steps * turn).as_matrix() @ poses.rot[last]
    return out


def _fill_from_neighbours(poses: Poses, bad: np.ndarray, good: np.ndarray) -> None:
    """Give each frame in `bad` the parameters of the nearest frame in `good`."""
    good = np.asarray(good)
    for f in bad:
        nearest = good[np.argmin(np.abs(good - f))]
        poses.put([f], poses.take([nearest]))


def track(
    problem: Problem,
    hand: stages.Hand,
    betas,
    poses: Poses,
    *,
    start: int,
    solved: np.ndarray,
    extrapolate: bool,
    rounds: int,
    temporal: bool = True,
    energy: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    estimated: np.ndarray | None = None,
    prior_boost: float = 1.0,
    smoothing: float = 1.0,
    hypotheses: bool = False,
    on_window=None,
    progress=False,
    desc="stage 2: tracking",
):
    """Fit the frames window by window, from frame `start` to the end.

    `poses` (T frames) is updated in place; `solved` (T,) bool marks frames whose parameters are final
    (they serve as fixed boundary frames). With `extrapolate`, frames not yet `estimated` (T,) bool are
    reached progressively: `config.track_advance` more frames join the window per correspondence round,
    each starting from a constant-velocity extrapolation of the two frames before it (so every frame
    starts next to its neighbour's solution); otherwise frames start from their entry in `poses`.
    `energy` and `residual` (T,) receive each committed frame's final energy and median scan-to-model
    distance (scan metres). With `hypotheses`, each window's last committed frame is checked for a
    finger stuck in the wrong basin (`_finger_hypotheses`). `on_window(next_start)` is called after each
    window's frames are committed.

    Returns the frames that diverged and were retried.
    """
    from tqdm.auto import tqdm

    cfg = problem.config
    dt = problem.model.dtype
    t_total = problem.num_frames
    w = cfg.window
    step = w - cfg.overlap if temporal else w
    weights = problem.weights(temporal=temporal)
    weights = dataclasses.replace(
        weights,
        pose_prior=weights.pose_prior * prior_boost,
        velocity=weights.velocity * smoothing,
        acceleration=weights.acceleration * smoothing,
    )
    estimated = solved.copy() if estimated is None else estimated
    energy = np.zeros(t_total) if energy is None else energy
    residual = np.zeros(t_total) if residual is None else residual
    retried = []
    far_share = np.full(t_total, np.nan)
    b_jnp = jnp.asarray(betas, dt)
    windows = list(range(start, t_total, step)) if start < t_total else []
    # The last window may be shorter than a step: its end is the sequence end anyway.
    bar = tqdm(total=len(windows), desc=desc, disable=not progress, leave=False)
    for s in windows:
        ids = np.arange(s, s + w)
        ids = np.where(ids < t_total, ids, -1)
        real = ids[ids >= 0]
        boundary = _boundary(problem, hand, b_jnp, poses, solved, s, temporal)
        window_poses = poses.take(np.where(ids >= 0, ids, real[-1]))
        if extrapolate and temporal:
            _progress_through(problem, hand, ids, window_poses, betas, weights, boundary, poses, estimated, s)
        new, _, _, cost, dist, keep = _rounds(
            problem, hand, ids, window_poses, betas, weights, rounds, boundary=boundary, widen=cfg.kernel_schedule
        )
        estimated[real] = True
        diverged = _diverged(problem, ids, new, cost, cfg.divergence_factor)
        if diverged.any():
            retry = new.copy()
            good_slots = np.flatnonzero(~diverged & (ids >= 0))
            if len(good_slots):
                _fill_from_neighbours(retry, np.flatnonzero(diverged), good_slots)
            else:
                retry = window_poses.copy()
            new2, _, _, cost2, dist2, keep2 = _rounds(problem, hand, ids, retry, betas, weights, rounds, boundary=boundary)
            diverged2 = _diverged(problem, ids, new2, cost2, cfg.divergence_factor)
            frames_retried = [int(ids[k]) for k in np.flatnonzero(diverged)]
            logger.warning("frames %s diverged; retried from their neighbours (%s)", frames_retried,
                           "recovered" if not diverged2.any() else f"still off: {[int(ids[k]) for k in np.flatnonzero(diverged2)]}")
            retried.extend(frames_retried)
            if np.sum(np.where(np.isfinite(cost2), cost2, 1e30)) < np.sum(np.where(np.isfinite(cost), cost, 1e30)):
                new, cost, dist, keep, diverged = new2, cost2, dist2, keep2, diverged2
            bad_slots = np.flatnonzero(~new.finite() & (ids >= 0))
            if len(bad_slots):
                ok = np.flatnonzero(new.finite() & (ids >= 0))
                if len(ok):
                    _fill_from_neighbours(new, bad_slots, ok)
                else:
                    new = window_poses.copy()
        last_window = s == windows[-1]
        commit = np.arange(w) if (last_window or not temporal) else np.arange(step)
        commit = commit[ids[commit] >= 0]
        if hypotheses and temporal and _finger_off(problem, ids, dist, keep, far_share):
            better = _finger_hypotheses(problem, hand, ids, new, cost, betas, weights, boundary, commit[-1], rounds)
            if better is not None:
                new, cost, dist, keep = better
        frames_c = ids[commit]
        poses.put(frames_c, new.take(commit))
        solved[frames_c] = True
        # Overlap frames keep the new estimate as the next window's starting point.
        rest = np.arange(w)[ids >= 0]
        rest = rest[~np.isin(rest, commit)]
        poses.put(ids[rest], new.take(rest))
        energy[frames_c] = cost[commit]
        for k, f in zip(commit, frames_c):
            d = dist[k][keep[k]] * problem.scale
            residual[f] = float(np.median(d)) if len(d) and problem.valid[f] else 0.0
            far_share[f] = np.mean(d >= _FAR) if len(d) and problem.valid[f] else np.nan
        if on_window is not None:
            on_window(s + step if not last_window else t_total)
        bar.update(1)
    bar.close()
    return retried


# Hand-pose entries (axis-angle of MANO joints 1..15) of each finger: index, middle, pinky, ring, thumb.
_FINGER_PARAMS = tuple(np.arange(3 * (j - 1), 3 * (j + 2)) for j in (1, 4, 7, 10, 13))
_FINGER_NAMES = ("index", "middle", "pinky", "ring", "thumb")


# Scan points this far (metres) from the model are beyond the robust kernel's reach: a stuck finger's.
_FAR = 0.01


def _finger_off(problem, ids, dist, keep, far_share) -> bool:
    """Whether a frame of the window has clearly more far scan points than the frames committed so far
    (`far_share` (T,), NaN where not committed): the only windows worth the finger hypotheses' cost."""
    seen = far_share[np.isfinite(far_share)]
    if not len(seen):
        return True
    gate = max(problem.config.hypothesis_gate * float(np.median(seen)), 0.01)
    for k in np.flatnonzero(ids >= 0):
        d = dist[k][keep[k]] * problem.scale
        if problem.valid[ids[k]] and len(d) and np.mean(d >= _FAR) > gate:
            return True
    return False


def _finger_hypotheses(problem, hand, ids, poses: Poses, cost, betas, weights, boundary, slot, rounds):
    """Escape a finger stuck in a wrong local minimum, which tracking alone never leaves: a finger fitted
    curled while the scan's finger opens (its points lie centimetres away, outliers to the robust kernel)
    stays curled for the rest of the sequence.

    The window's frame in `slot` is re-fitted on its own from its current pose and from poses with one
    finger opened flat or set to the model's mean curl (as many as a window-sized batch holds). When a
    changed finger wins clearly, that finger is moved in every frame of the window and the window
    re-solved; the re-solved window is kept if its energy is lower. Returns (poses, cost, dist, keep) or
    None.
    """
    w = len(ids)
    frame = ids[slot]
    if frame < 0 or not problem.valid[frame] or not np.isfinite(cost[slot]):
        return None
    mean = np.asarray(problem.model.hands_mean, np.float64)
    start = poses.take(np.full(w, slot))
    changed = [None]
    # Opened fingers first: a short window may not hold every hypothesis.
    for opened in (True, False):
        for k, idx in enumerate(_FINGER_PARAMS):
            target = np.zeros(len(idx)) if opened else mean[idx]
            if len(changed) < w and not np.allclose(start.hand_pose[0, idx], target, atol=0.1):
                start.hand_pose[len(changed), idx] = target
                changed.append((k, idx))
    alone = dataclasses.replace(weights, velocity=weights.velocity * 0, acceleration=weights.acceleration * 0)
    batch = np.where(np.arange(w) < len(changed), frame, -1)
    tried, _, _, c, _, _ = _rounds(problem, hand, batch, start, betas, alone, rounds, widen=problem.config.kernel_schedule)
    c = np.where(np.isfinite(c) & tried.finite(), c, np.inf)[: len(changed)]
    best = int(np.argmin(c))
    if best == 0 or c[best] > (1.0 - problem.config.hypothesis_margin) * c[0]:
        return None
    finger, idx = changed[best]
    moved = poses.copy()
    moved.hand_pose[:, idx] += tried.hand_pose[best, idx] - poses.hand_pose[slot, idx]
    new, _, _, cost2, dist2, keep2 = _rounds(
        problem, hand, ids, moved, betas, weights, rounds, boundary=boundary, widen=problem.config.kernel_schedule
    )
    real = ids >= 0
    if not np.all(np.isfinite(cost2[real])) or np.sum(cost2[real]) >= np.sum(cost[real]):
        return None
    logger.info("frames %s: %s finger moved out of a local minimum", ids[real].tolist(), _FINGER_NAMES[finger])
    return new, cost2, dist2, keep2


def _progress_through(problem, hand, ids, window_poses: Poses, betas, weights, boundary, poses: Poses, estimated, s):
    """Reach the window's new frames a few at a time, each extrapolated from the frames before it."""
    cfg = problem.config
    n_real = int(np.count_nonzero(ids >= 0))
    known = 0
    while known < n_real and estimated[ids[known]]:
        known += 1
    # The two frames before the window (when estimated) and the window's slots, in order.
    before = [f for f in (s - 2, s - 1) if f >= 0 and estimated[f]]
    ext = Poses(
        np.concatenate([poses.hand_pose[before], window_poses.hand_pose]),
        np.concatenate([poses.rot[before], window_poses.rot]),
        np.concatenate([poses.transl[before], window_poses.transl]),
    )
    shift = len(before)
    reach = max(known, 1) if shift == 0 else known
    while reach < n_real:
        new_reach = min(reach + cfg.track_advance, n_real)
        for k in range(reach, new_reach):
            last = k + shift - 1
            ext.put([k + shift], _extrapolate(ext, last, last - 1 if last >= 1 else None, 1))
        reach = new_reach
        ids_r = np.where(np.arange(len(ids)) < reach, ids, -1)
        sub = ext.take(np.arange(shift, shift + len(ids)))
        new, *_ = _rounds(problem, hand, ids_r, sub, betas, weights, 1, boundary=boundary)
        ext.put(np.arange(shift, shift + reach), new.take(np.arange(reach)))
    window_poses.put(np.arange(len(ids)), ext.take(np.arange(shift, shift + len(ids))))


def _boundary(problem, hand, betas, poses: Poses, solved, s, temporal):
    dt = problem.model.dtype
    m = hand.markers.shape[0]
    prev = np.array([s - 2, s - 1])
    ok = (prev >= 0) & temporal
    ok = ok & np.array([solved[p] if p >= 0 else False for p in prev])
    if not ok.any():
        return jnp.zeros((2, m, 3), dt), jnp.zeros((2,), dt)
    safe = np.where(prev >= 0, prev, 0)
    verts, _ = _posed_window(problem, hand, poses.take(safe), betas, jnp.ones((), dt))
    return verts[:, hand.markers], jnp.asarray(ok, dt)


def _diverged(problem, ids, poses: Poses, cost, factor) -> np.ndarray:
    real = ids >= 0
    has_data = np.array([problem.valid[f] if f >= 0 else False for f in ids])
    finite = np.isfinite(cost) & poses.finite()
    ref = cost[real & has_data & finite]
    if not len(ref):
        return real & ~finite
    med = np.median(ref)
    return real & (~finite | (has_data & (cost > factor * max(med, 1e-3))))


# ------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------


class _Checkpoint:
    """Stage results in a directory, each file written atomically, tied to one input and config."""

    def __init__(self, directory, fingerprint: str):
        self.dir = None if directory is None else Path(directory)
        self.fingerprint = fingerprint
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "checkpoint.json"
        if meta.exists():
            try:
                stored = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError):
                stored = {}
            if stored.get("fingerprint") != fingerprint or stored.get("format") != _CHECKPOINT_FORMAT:
                logger.warning("checkpoint in %s belongs to another input or configuration; starting over", self.dir)
                for f in self.dir.glob("*.npz"):
                    f.unlink()
        with atomic_path(meta) as tmp:
            tmp.write_text(json.dumps({"format": _CHECKPOINT_FORMAT, "fingerprint": fingerprint}))

    def load(self, name: str):
        if self.dir is None or not (self.dir / f"{name}.npz").exists():
            return None
        try:
            with np.load(self.dir / f"{name}.npz", allow_pickle=False) as data:
                return {k: np.array(data[k]) for k in data.files}
        except (OSError, ValueError, EOFError) as e:
            logger.warning("checkpoint %s is unreadable (%s); recomputing it", name, e)
            return None

    def save(self, name: str, **arrays):
        if self.dir is None:
            return
        with atomic_path(self.dir / f"{name}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)


def _fingerprint(problem: Problem) -> str:
    h = hashlib.sha256()
    cfg = dataclasses.asdict(problem.config)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(problem.model.name.encode())
    for a in (problem.model.v_template, problem.model.shapedirs, problem.model.faces):
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    for a in (problem.points, problem.mask, problem.keypoints, problem.keypoint_conf):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(bytes([problem.unordered, problem.solve_scale]))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------
# The whole pipeline
# ------------------------------------------------------------------------------------------------------


def _default_model(config: RegistrationConfig) -> ManoModel:
    from mano_jax import load_model

    return load_model("open-left" if config.side == "left" else "open-right")


class Registration:
    """The pipeline as steps, for notebooks: `stage0()`, `stage1()` (which first tracks the sequence with
    the stage-0 template to get the keyframes' poses), `stage2()`, then `result()`.

    Each step returns what it found (plain NumPy) and saves it to `checkpoint_dir` when given; a step
    already in the checkpoint is loaded instead of recomputed. `register_sequence` runs all steps.

        reg = Registration(scans, model, config)
        reg.stage0()      # {"frames", "betas", "scale", "poses"}
        reg.stage1()      # {"betas", "offsets", "keyframes", "poses"} (poses of the initial tracking)
        reg.stage2()      # {"poses", "residual"}
        result = reg.result()
        reg.posed_vertices()  # (T, V, 3) the current fit, scan coordinates
    """

    def __init__(self, scans, model: ManoModel | None = None, config: RegistrationConfig | None = None, *,
                 checkpoint_dir=None, progress: bool = True):
        t0 = time.perf_counter()
        self.config = config or RegistrationConfig()
        self.model = model if model is not None else _default_model(self.config)
        self.progress = progress
        self.problem = prepare(scans, self.model, self.config)
        self.checkpoint = _Checkpoint(checkpoint_dir, _fingerprint(self.problem))
        t = self.problem.num_frames
        self.first = int(self.problem.good_frames[0])
        self.poses = Poses.identity(t)
        self.betas = np.zeros(self.model.num_betas)
        self.offsets = np.zeros((self.model.num_vertices, 3))
        self.keyframes = np.zeros(0, np.int64)
        self.energy = np.zeros(t)
        self.residual = np.zeros(t)
        self.retried: list[int] = []
        self.times = {"prepare": time.perf_counter() - t0}
        self._done = set()

    # -- steps ----------------------------------------------------------------------------------------

    def stage0(self) -> dict:
        """Initialise the first good frame (every good frame of an unordered set): orientation, position,
        coarse pose, betas and, for unknown units, the global scale."""
        t0 = time.perf_counter()
        problem, good, first = self.problem, self.problem.good_frames, self.first
        saved = self.checkpoint.load("stage0")
        if saved is not None:
            init_poses = Poses.from_arrays(saved, "")
            self.betas, problem.scale = saved["betas"], float(saved["scale"])
            frames = saved["frames"]
        else:
            best = initialise(problem, [first])
            if (warning := long_scan_warning(problem, first)) is not None:
                logger.warning(warning)
                best = self._size_from_clearest_frame(best)
            pose0, scale0, _ = best[first]
            pose0, self.betas, problem.scale, _ = initial_shape(problem, first, pose0, scale0, problem.solve_scale)
            best = {first: (pose0, problem.scale, 0.0)}
            frames = np.array([first])
            if problem.unordered:
                rest = [int(f) for f in good if f != first]
                if rest:
                    best |= initialise(problem, rest, solve_scale=False, scale=problem.scale)
                frames = good
            init_poses = Poses.identity(len(frames))
            for k, f in enumerate(frames):
                init_poses.put([k], best[int(f)][0])
            self.checkpoint.save(
                "stage0", frames=np.asarray(frames), betas=self.betas, scale=np.array(problem.scale), **init_poses.arrays("")
            )
        self.poses.put(np.asarray(frames), init_poses)
        if not problem.unordered:
            self.poses.put(np.arange(self.poses.transl.shape[0]), init_poses.take(np.zeros(self.poses.transl.shape[0], int)))
        self.times["stage0"] = time.perf_counter() - t0
        logger.info("stage 0: frame %d placed; scale %.4g; %.1f s", first, problem.scale, self.times["stage0"])
        self._done.add("stage0")
        return {"frames": np.asarray(frames), "betas": self.betas.copy(), "scale": problem.scale, "poses": self._in_scan(init_poses)}

    def _size_from_clearest_frame(self, best: dict) -> dict:
        """Stage 0 of the first frame again at the size found on the frame that fits most clearly of a few
        spread through the sequence (unknown units, long scans).

        On a scan that runs far up the forearm, a hand of the wrong size (one wrapped round hand and
        forearm, or one at the forearm's far end) can explain the first frame best while no candidate of
        the right size fits it well; other poses and views of the same hand are clearer
        (bench/registration.py --robustness, unknown units with 25 cm of forearm)."""
        problem, first = self.problem, self.first
        others = [int(f) for f in choose_keyframes(problem, _SIZE_FRAMES) if f != first]
        if not others:
            return best
        best = best | initialise(problem, others, per_frame=self.config.window)
        clearest = min(best, key=lambda f: best[f][2])
        logger.info("stage 0: size from frame %d (placement costs %s)", clearest,
                    ", ".join(f"{f}: {c[2]:.3f}" for f, c in sorted(best.items())))
        if clearest == first:
            return best
        return initialise(problem, [first], solve_scale=False, scale=best[clearest][1])

    def track_initial(self) -> Poses:
        """Track the sequence with the stage-0 template (poses for stage 1's keyframes)."""
        self._require("stage0")
        t0 = time.perf_counter()
        problem, cfg, t = self.problem, self.config, self.problem.num_frames
        if not problem.unordered:
            solved, start, _ = self._resume("track")
            hand0 = stages.make_hand(self.model, np.zeros_like(self.offsets), cfg.num_markers)

            def save(next_start):
                self.checkpoint.save(
                    "track", solved=solved, next=np.array(next_start), retried=np.asarray(self.retried, np.int64),
                    **self.poses.arrays(""),
                )

            estimated = solved.copy()
            estimated[self.first] = True
            r = track(
                problem, hand0, self.betas, self.poses, start=start, solved=solved, extrapolate=True,
                estimated=estimated, prior_boost=cfg.track_prior_boost, smoothing=cfg.track_smoothing,
                rounds=cfg.track_rounds, hypotheses=cfg.finger_hypotheses, on_window=save,
                progress=self.progress, desc="tracking (initial template)",
            )
            self.retried += r
            if r:
                save(t)
            self._fill_leading_gap()
        self.times["track"] = time.perf_counter() - t0
        self._done.add("track")
        return self._in_scan(self.poses)

    def stage1(self) -> dict:
        """Fit the subject template (betas + offsets) over keyframes spread through the sequence."""
        if "track" not in self._done:
            self.track_initial()
        t0 = time.perf_counter()
        saved = self.checkpoint.load("stage1")
        before = self.problem.scale
        if saved is not None:
            self.betas, self.offsets, self.keyframes = saved["betas"], saved["offsets"], saved["keyframes"]
            self.problem.scale = float(saved["scale"])
        else:
            self.keyframes = choose_keyframes(self.problem, self.config.num_keyframes)
            self.betas, self.offsets, _, self.problem.scale = fit_template(
                self.problem, self.poses.take(self.keyframes), self.betas, self.keyframes, progress=self.progress
            )
            self.checkpoint.save("stage1", betas=self.betas, offsets=self.offsets, keyframes=self.keyframes,
                                 scale=np.array(self.problem.scale))
        # A new scale (unknown units) moves every point of the model but the origin: keep the tracked
        # wrists where they were.
        if self.problem.scale != before:
            wrist, _ = stages._hand_direction(self.model, np.asarray(self.model.v_template, np.float64))
            self.poses.transl[:] = (before / self.problem.scale) * (self.poses.transl + wrist) - wrist
        self.times["stage1"] = time.perf_counter() - t0
        self._done.add("stage1")
        return {"betas": self.betas.copy(), "offsets": self.offsets.copy(), "keyframes": self.keyframes.copy(),
                "poses": self._in_scan(self.poses)}

    def stage2(self) -> dict:
        """Track every frame with the subject template (temporal smoothness for sequences)."""
        self._require("stage1")
        t0 = time.perf_counter()
        problem, cfg, t = self.problem, self.config, self.problem.num_frames
        hand = stages.make_hand(self.model, self.offsets, cfg.num_markers)
        solved, start, saved = self._resume("stage2")
        if saved is not None:
            self.energy, self.residual = saved["energy"], saved["residual"]

        def save(next_start):
            self.checkpoint.save(
                "stage2", solved=solved, next=np.array(next_start), energy=self.energy, residual=self.residual,
                retried=np.asarray(self.retried, np.int64), **self.poses.arrays(""),
            )

        if problem.unordered:
            r = _track_unordered(problem, hand, self.betas, self.poses, problem.good_frames, solved, self.energy,
                                 self.residual, save, self.progress)
        else:
            r = track(
                problem, hand, self.betas, self.poses, start=start, solved=solved, extrapolate=False,
                rounds=cfg.refine_rounds, energy=self.energy, residual=self.residual, on_window=save,
                progress=self.progress,
            )
        self.retried += r
        self._fill_leading_gap()
        bad_params = np.flatnonzero(~self.poses.finite())
        if len(bad_params):
            ok = np.flatnonzero(self.poses.finite())
            if not len(ok):
                raise RegistrationError("every frame's fit diverged")
            _fill_from_neighbours(self.poses, bad_params, ok)
            self.retried += [int(f) for f in bad_params]
        save(t)
        self.times["stage2"] = time.perf_counter() - t0
        self._done.add("stage2")
        for f in range(t):
            if problem.valid[f]:
                logger.info("frame %d (%s): median scan-to-model distance %.2f mm", f, problem.names[f], 1000 * self.residual[f])
        return {"poses": self._in_scan(self.poses), "residual": self.residual.copy()}

    # -- results --------------------------------------------------------------------------------------

    def result(self) -> RegistrationResult:
        """The `RegistrationResult` of the steps run so far (all of them for a final result)."""
        problem = self.problem
        times = dict(self.times)
        times["total"] = sum(times.values())
        return RegistrationResult(
            betas=np.asarray(self.betas, np.float64),
            offsets=np.asarray(self.offsets, np.float64),
            global_orient=Rotation.from_matrix(self.poses.rot).as_rotvec(),
            hand_pose=self.poses.hand_pose.copy(),
            transl=self._in_scan(self.poses).transl,
            scale=float(problem.scale),
            model_name=self.model.name,
            side=self.model.side,
            frame_residual=np.where(problem.valid, self.residual, 0.0),
            frame_cost=np.where(problem.valid, self.energy, 0.0),
            bad_frames=tuple(int(f) for f in np.flatnonzero(~problem.valid)),
            retried_frames=tuple(sorted(set(int(f) for f in self.retried))),
            keyframes=tuple(int(k) for k in self.keyframes),
            unordered=problem.unordered,
            stage_times=times,
            config=self.config.to_dict(),
        )

    def _in_scan(self, poses: Poses) -> Poses:
        """`poses` with translations in the scans' coordinates (the solvers' are relative to `origin`)."""
        out = poses.copy()
        out.transl += self.problem.origin / self.problem.scale
        return out

    def posed_vertices(self) -> np.ndarray:
        """(T, V, 3) the current fit in scan coordinates."""
        return self.result().posed_vertices(self.model)

    def _resume(self, name):
        """Tracking state from checkpoint `name`: (solved frames (T,), next window start, stored arrays or
        None); the stored poses and retried frames are taken over."""
        saved = self.checkpoint.load(name)
        if saved is None:
            return np.zeros(self.problem.num_frames, bool), self.first, None
        self.poses = Poses.from_arrays(saved, "")
        self.retried = list(saved["retried"])
        return saved["solved"].astype(bool), int(saved["next"]), saved

    def _require(self, step):
        if step not in self._done:
            raise RuntimeError(f"run {step}() first")

    def _fill_leading_gap(self):
        if self.first > 0:
            _fill_from_neighbours(self.poses, np.arange(self.first), self.problem.good_frames)


def register_sequence(
    scans,
    model: ManoModel | None = None,
    config: RegistrationConfig | None = None,
    *,
    checkpoint_dir=None,
    progress: bool = True,
) -> RegistrationResult:
    """Register a scan sequence of one hand (or an unordered scan set of one subject).

    Args:
      scans: a `ScanSequence` (`registration.scans.load_scans`) or a list of (N_i, 3) arrays in metres.
      model: the hand model (default: the bundled open hand of `config.side`). Its side decides the side.
      config: `RegistrationConfig` (defaults documented there).
      checkpoint_dir: where stage results are saved as they finish; re-running with the same input and
        config resumes from them.
      progress: show progress bars.

    Returns a `RegistrationResult`; parameters are never NaN (frames without data are bridged).
    """
    reg = Registration(scans, model, config, checkpoint_dir=checkpoint_dir, progress=progress)
    reg.stage0()
    reg.stage1()
    reg.stage2()
    return reg.result()


def _track_unordered(problem, hand, betas, poses, frames, solved, energy, residual, save, progress):
    """Stage 2 for an unordered set: every good frame on its own (no temporal term), in windows."""
    ids_all = np.asarray(frames)
    todo = ids_all[~solved[ids_all]]
    # `track` on a compacted view of the frames still to do: they are independent, any grouping works.
    view = dataclasses.replace(
        problem,
        points=problem.points[todo],
        mask=problem.mask[todo],
        normals=problem.normals[todo],
        counts=problem.counts[todo],
        keypoints=problem.keypoints[todo],
        keypoint_conf=problem.keypoint_conf[todo],
        valid=problem.valid[todo],
        names=tuple(problem.names[f] for f in todo),
        _trees={},
    )
    sub_poses = poses.take(todo)
    sub_solved = np.zeros(len(todo), bool)
    sub_energy = np.zeros(len(todo))
    sub_residual = np.zeros(len(todo))

    def on_window(next_start):
        done = np.flatnonzero(sub_solved)
        poses.put(todo[done], sub_poses.take(done))
        energy[todo[done]], residual[todo[done]] = sub_energy[done], sub_residual[done]
        solved[todo[done]] = True
        save(next_start)

    r = track(
        view, hand, betas, sub_poses, start=0, solved=sub_solved, extrapolate=False,
        rounds=problem.config.refine_rounds + 1, temporal=False, energy=sub_energy, residual=sub_residual,
        on_window=on_window, progress=progress,
    )
    return [int(todo[k]) for k in r]
