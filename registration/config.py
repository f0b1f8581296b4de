"""`RegistrationConfig`: every setting of the registration pipeline, with documented defaults.

Lengths are metres. Energy weights are relative to the data terms, which are measured in millimetres
(a residual of 1 mm costs 1 per point, averaged over the points of a frame), so a weight of 1 on a prior
means "as costly as a 1 mm average misfit".
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class RegistrationConfig:
    """Settings of `register_sequence`. All fields have defaults that work for hand scans."""

    # --- input -------------------------------------------------------------------------------------
    side: Literal["right", "left"] = "right"
    """Hand side of the default model, used when no model is passed."""
    max_points: int = 5000
    """Points per frame used in the fit: frames are randomly subsampled to this many (fewer are padded and
    masked), so every frame shares one compiled solver."""
    solve_scale: bool | None = None
    """Solve a global scale between scans and model (stage 0 starts it, stage 1 refines it over the
    keyframes). None: only when the units are unknown."""
    unordered: bool | None = None
    """Treat the frames as an unordered set (one template, each frame initialised on its own, no temporal
    term). None: take it from the `ScanSequence`."""
    seed: int = 0
    """Seed of the point subsampling."""

    # --- data terms --------------------------------------------------------------------------------
    robust_scale: float = 0.004
    """Geman-McClure scale (metres) of the scan-to-model distances: points much farther than this from the
    model (outliers, unexplained forearm) get little weight."""
    point_to_point_weight: float = 0.1
    """Share of point-to-point distance added to the scan -> model point-to-plane residuals (keeps
    tangential sliding in check)."""
    model_to_scan_weight: float = 0.2
    """Weight of the model -> scan term relative to the scan -> model term."""
    model_to_scan_gate: float = 0.008
    """A model vertex takes part in the model -> scan term only when a scan point lies within this distance
    (metres) and that point's normal agrees with the vertex normal (it faces the sensor)."""
    forearm_margin: float = 0.01
    """Scan points farther than this (metres) beyond the model's wrist boundary, along the forearm, are cut."""
    scale_forearm_margin: float = 0.04
    """`forearm_margin` when the global scale is solved (unknown units). A scan that runs on into the
    forearm does not show where the hand ends, and a larger hand slid back along the forearm (its fingers
    flexed to reach the same tips) explains it as well: the scale is found from the rest of the hand."""
    keypoint_weight: float = 0.05
    """Weight of 3D keypoints (when given) in stages 1 and 2, per keypoint and mm^2, times confidence."""
    init_keypoint_weight: float = 1.0
    """Weight of 3D keypoints in the stage-0 initialisation."""

    # --- priors ------------------------------------------------------------------------------------
    pose_prior_weight: float = 0.005
    """Weight of the PCA-space (Mahalanobis) pose prior `mano_jax.priors.PosePrior`."""
    pose_prior_min_std: float = 0.05
    """Floor (radians) on the standard deviation of each PCA pose coefficient in the prior: a pose space
    learnt from few poses has near-zero variance in many directions, and real motion leaves that span.
    Much looser floors let a finger's PIP and DIP drift apart where partial scans do not see them."""
    joint_limit_weight: float = 1.0
    """Weight of the joint-angle limit penalty `mano_jax.priors.JointLimits`."""
    shape_prior_weight: float = 0.05
    """Weight of the shape prior (squared norm of `betas`, which are in population standard deviations).
    Every beta but the first moves the surface by a millimetre or less per standard deviation, so partial
    noisy scans hardly tell them apart from noise and pose error: at 0.001 they wandered to 1.5-2 standard
    deviations, off the subject's own (0.05 lowers the error on bench/registration.py's partial scans by
    0.12-0.15 mm). The per-vertex offsets carry the detail the betas then leave out."""

    # --- stage 0: initialisation --------------------------------------------------------------------
    init_points: int = 400
    """Scan points (and model vertices) used by the rigid orientation search."""
    init_icp_iterations: int = 25
    """Rigid ICP iterations per hypothesis."""
    init_shape_prior_weight: float = 1.0
    """Shape prior weight while stage 0 fits betas (and scale) to a single frame. One frame cannot tell a
    big hand from a flexed one, and a template sized on it biases the first tracking's poses, from which
    stage 1 starts and whose bias it keeps (at 0.05, bench/registration.py's partial scans got a hand 1.8%
    too large and 0.34 mm more error); the keyframes of stage 1 settle the betas instead."""
    init_refine: int = 4
    """Best rigid hypotheses refined with an articulated fit per frame of an unordered set (the first
    frame of a sequence gets a whole window's worth); the one that explains the frame's points best wins."""

    # --- stage 1: subject template -----------------------------------------------------------------
    num_keyframes: int = 8
    """Frames (spread through the sequence) over which the template is fitted; at most `window`."""
    template_rounds: int = 6
    """Rounds of (correspondences, betas + keyframe poses, offsets). The keyframes start from poses tracked
    with the stage-0 template, and size and finger flexion trade off slowly: each round moves them further
    from that start (bench/registration.py, partial scans: 4, 5, 6 rounds give 2.97, 2.92, 2.86 mm; full
    scans 1.27 -> 1.17 mm from 4 to 6; each round costs about 2.5 s)."""
    offset_directions: Literal["normal", "free"] = "normal"
    """Offsets along the template's vertex normals (one number per vertex) or in any direction. Free
    offsets can also slide vertices along the surface and bend the template, which trades off against
    the poses (a template bent at a knuckle fits a finger flexed the other way); normal offsets change
    the shape without that ambiguity."""
    offset_laplacian_weight: float = 4.0
    """Weight of the squared uniform Laplacian of the offsets (per vertex, mm^2): keeps them smooth."""
    offset_magnitude_weight: float = 0.02
    """Weight of the squared offsets (per vertex, mm^2): keeps them small."""

    # --- stage 2: pose tracking --------------------------------------------------------------------
    window: int = 10
    """Frames solved jointly in one window (frames are checkpointed a window at a time). New frames of a
    window start from a constant-velocity extrapolation of the frames before it."""
    overlap: int = 2
    """Frames a window shares with the previous one (re-solved with the new frames)."""
    track_advance: int = 2
    """While tracking, frames that join a window per correspondence round (each starts from its
    predecessors' fresh solution)."""
    track_prior_boost: float = 20.0
    """The pose prior is this much stronger while tracking with the initial template (whose shape is
    still rough): poses stay plausible until the subject template is known."""
    track_smoothing: float = 0.4
    """The temporal weights are multiplied by this while tracking with the initial template: frames
    joining a window start from an extrapolation, which strong smoothing would hold them to."""
    track_rounds: int = 2
    """Correspondence updates per window once all its frames are in (tracking from the initial template)."""
    refine_rounds: int = 2
    """Correspondence updates per window when refining with the fitted template (a third cost a tenth of the
    steady-state CPU time on bench/registration.py for 0.02 mm of partial-scan error)."""
    kernel_schedule: tuple[float, ...] = (3.0, 1.5)
    """Robust-kernel widths and model -> scan gates (multiples of `robust_scale`, `model_to_scan_gate`) of a
    tracking window's first correspondence rounds (the last round always uses the configured ones): a
    finger that starts a centimetre off its scan points would see them as outliers under the narrow kernel
    and stay there."""
    finger_hypotheses: bool = True
    """While tracking with the initial template, re-fit each window's last frame from poses with one
    finger opened or curled, and move that finger in the whole window when that fits clearly better
    (fingers otherwise stay stuck in a wrong pose once their scan points are out of the kernel's reach)."""
    hypothesis_margin: float = 0.05
    """A finger hypothesis must lower the frame's energy by this share to be taken."""
    hypothesis_gate: float = 1.25
    """Finger hypotheses are tried only in the first window and in windows where a frame has this many
    times the median share (over the frames committed so far, at least 1%) of scan points a centimetre or
    more from the model: a stuck finger leaves its points that far off, and trying hypotheses in every
    window doubled the tracking time."""
    gauss_newton_steps: int = 2
    """Gauss-Newton steps per correspondence update."""
    velocity_weight: float = 0.02
    """Weight of the squared velocity of marker vertices between frames (per marker, mm^2)."""
    acceleration_weight: float = 5.0
    """Weight of the squared acceleration of marker vertices (per marker, mm^2)."""
    num_markers: int = 64
    """Vertices (spread over the surface) on which temporal smoothness is measured."""
    divergence_factor: float = 4.0
    """A frame whose final cost exceeds this multiple of the median over its window (or is not finite) has
    diverged and is retried from its neighbours."""

    # --- correspondences ---------------------------------------------------------------------------
    candidate_vertices: int = 1
    """Each scan point's closest point is searched on the triangles around its this-many nearest model
    vertices (1 finds the exact closest triangle for 99% of points on the open hand mesh, and an adjacent one,
    3 micrometres farther on average, for the rest; bench/registration.py measures it)."""
    nearest_neighbours: Literal["kdtree", "brute"] = "kdtree"
    """How nearest model vertices / scan points are found: a SciPy KD-tree on the host (fastest on CPU,
    see bench/registration.py) or brute force inside the compiled graph (better on GPU)."""

    def __post_init__(self):
        if self.side not in ("right", "left"):
            raise ValueError(f"RegistrationConfig.side must be 'right' or 'left', got {self.side!r}")
        if self.nearest_neighbours not in ("kdtree", "brute"):
            raise ValueError(
                f"RegistrationConfig.nearest_neighbours must be 'kdtree' or 'brute', got {self.nearest_neighbours!r}"
            )
        if self.offset_directions not in ("normal", "free"):
            raise ValueError(
                f"RegistrationConfig.offset_directions must be 'normal' or 'free', got {self.offset_directions!r}"
            )
        if self.num_keyframes > self.window:
            raise ValueError(
                f"RegistrationConfig: num_keyframes ({self.num_keyframes}) must not exceed window ({self.window})"
            )
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"RegistrationConfig: need 0 <= overlap < window, got {self.overlap}, {self.window}")
        for name in ("max_points", "init_points", "num_keyframes", "window", "num_markers", "candidate_vertices", "track_advance"):
            if getattr(self, name) < 1:
                raise ValueError(f"RegistrationConfig.{name} must be positive, got {getattr(self, name)}")

    def replace(self, **changes) -> "RegistrationConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
