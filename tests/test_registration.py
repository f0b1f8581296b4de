"""Tests of the registration pipeline (stages 0-2, checkpoints) on small synthetic sequences.

Every registration here uses the same configuration and sizes, so the solvers compile once per process.
Tolerances are far below what a failed fit gives (a hand off by a finger's width is 10+ mm).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import mano_jax
from registration import pipeline, stages
from registration.config import RegistrationConfig
from registration.correspondences import closest_on_candidates, closest_on_triangles, vertex_faces
from registration.result import RegistrationResult, load_result, save_result
from registration.synthetic import make_sequence

FRAMES = 6
POINTS = 1500
CONFIG = RegistrationConfig(
    max_points=POINTS, window=6, overlap=2, num_keyframes=4, template_rounds=3, init_points=300
)


@pytest.fixture(scope="module")
def open_right():
    return mano_jax.load_model()


def vertex_error_mm(result: RegistrationResult, model, truth) -> np.ndarray:
    """(T,) mean distance between registered and true vertices per frame, mm."""
    return np.linalg.norm(result.posed_vertices(model) - truth.vertices, axis=-1).mean(axis=1) * 1000


@pytest.fixture(scope="module")
def full_sequence(open_right):
    return make_sequence(
        open_right, num_frames=FRAMES, points_per_frame=POINTS, partial=False, noise=0.0, outlier_ratio=0.0,
        forearm=False, seed=1,
    )


@pytest.fixture(scope="module")
def full_result(open_right, full_sequence):
    return pipeline.register_sequence(full_sequence[0], open_right, CONFIG, progress=False)


def test_recovers_known_pose_and_shape_from_full_scans(open_right, full_sequence, full_result):
    _, truth = full_sequence
    err = vertex_error_mm(full_result, open_right, truth)
    assert err.max() < 4.0, err
    # The fitted surface passes through the (noiseless) scans.
    assert np.all(full_result.frame_residual < 0.0005), full_result.frame_residual
    assert full_result.frame_residual.shape == (FRAMES,)
    assert abs(full_result.scale - 1.0) < 1e-12


def test_result_round_trips_through_params_file(tmp_path, full_result):
    save_result(full_result, tmp_path / "params.npz")
    back = load_result(tmp_path)
    for name in ("betas", "offsets", "global_orient", "hand_pose", "transl", "frame_residual"):
        np.testing.assert_array_equal(getattr(back, name), getattr(full_result, name))
    assert back.keyframes == full_result.keyframes and back.model_name == full_result.model_name
    (tmp_path / "broken.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="broken.npz"):
        load_result(tmp_path / "broken.npz")


@pytest.fixture(scope="module")
def partial_sequence(open_right):
    return make_sequence(open_right, num_frames=FRAMES, points_per_frame=POINTS, seed=2)


@pytest.fixture(scope="module")
def partial_result(open_right, partial_sequence):
    return pipeline.register_sequence(partial_sequence[0], open_right, CONFIG, progress=False)


def test_partial_noisy_scans_with_outliers_and_forearm(open_right, partial_sequence, partial_result):
    err = vertex_error_mm(partial_result, open_right, partial_sequence[1])
    assert err.mean() < 8.0, err
    assert np.median(partial_result.frame_residual) < 0.0015


def test_scans_far_from_their_origin_fit_as_well(open_right, partial_sequence, partial_result):
    # A scanner's coordinates can put the hand metres from the origin, turned any way.
    scans, truth = partial_sequence
    turn, shift = Rotation.from_rotvec([0.3, -1.0, 2.2]), np.array([0.8, -1.8, 2.6])
    moved = scans.replace(
        points=tuple(turn.apply(p) + shift for p in scans.points),
        normals=tuple(None if n is None else turn.apply(n) for n in scans.normals),
    )
    result = pipeline.register_sequence(moved, open_right, CONFIG, progress=False)
    back = turn.inv().apply((result.posed_vertices(open_right) - shift).reshape(-1, 3)).reshape(truth.vertices.shape)
    err = 1000 * np.linalg.norm(back - truth.vertices, axis=-1).mean()
    assert err < vertex_error_mm(partial_result, open_right, truth).mean() + 0.5, err


def test_bad_frame_is_bridged_without_nan(open_right, full_sequence):
    scans, truth = full_sequence
    points = list(scans.points)
    points[3] = np.zeros((0, 3))
    gap = scans.replace(points=tuple(points), bad_frames=(3,))
    result = pipeline.register_sequence(gap, open_right, CONFIG, progress=False)
    assert result.bad_frames == (3,)
    for name in ("betas", "offsets", "global_orient", "hand_pose", "transl", "frame_residual", "frame_cost"):
        assert np.all(np.isfinite(getattr(result, name))), name
    # The smoothness term carries the gap frame along with its neighbours.
    err = vertex_error_mm(result, open_right, truth)
    assert err[3] < 6.0, err


def test_resume_skips_finished_stages(open_right, full_sequence, tmp_path, monkeypatch):
    scans, _ = full_sequence
    # Keep stage 2's checkpoint as it was after its first window: what an interrupt there leaves behind.
    windows = []
    save = pipeline._Checkpoint.save

    def keep_first_window(self, name, **arrays):
        if name == "stage2" and not windows:
            windows.append({k: np.array(v) for k, v in arrays.items()})
        save(self, name, **arrays)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline._Checkpoint, "save", keep_first_window)
        first = pipeline.register_sequence(scans, open_right, CONFIG, checkpoint_dir=tmp_path, progress=False)
    assert {p.name for p in tmp_path.glob("*.npz")} >= {"stage0.npz", "track.npz", "stage1.npz", "stage2.npz"}
    assert int(windows[0]["next"]) == CONFIG.window - CONFIG.overlap
    np.savez(tmp_path / "stage2.npz", **windows[0])

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage was recomputed")

    monkeypatch.setattr(pipeline, "initialise", must_not_run)
    monkeypatch.setattr(pipeline, "fit_template", must_not_run)
    second = pipeline.register_sequence(scans, open_right, CONFIG, checkpoint_dir=tmp_path, progress=False)
    np.testing.assert_allclose(second.betas, first.betas)
    np.testing.assert_allclose(second.hand_pose, first.hand_pose, atol=1e-4)


def test_finger_hypotheses_free_a_finger_stuck_curled(open_right, full_sequence):
    scans, truth = full_sequence
    problem = pipeline.prepare(scans, open_right, CONFIG)
    hand = stages.make_hand(open_right, truth.offsets, CONFIG.num_markers)
    # The solvers work relative to the scans' median (`problem.origin`).
    true_poses = pipeline.Poses(
        truth.hand_pose.copy(), Rotation.from_rotvec(truth.global_orient).as_matrix(), truth.transl - problem.origin
    )
    stuck = true_poses.copy()
    ring = pipeline._FINGER_PARAMS[pipeline._FINGER_NAMES.index("ring")]
    limits = problem.priors.limits
    curled = np.array(limits.angles(jnp.asarray(stuck.hand_pose)))
    curled[:, 9:12, 0] = np.deg2rad([70.0, 100.0, 70.0])  # ring MCP, PIP, DIP (MANO joints 10-12)
    stuck.hand_pose[:, ring] = np.asarray(limits.pose_from_angles(jnp.asarray(curled)))[:, ring]
    ids = np.arange(FRAMES)
    weights = problem.weights(temporal=True)
    boundary = pipeline._boundary(problem, hand, jnp.asarray(truth.betas), stuck, np.zeros(FRAMES, bool), 0, True)
    stuck, _, _, cost, _, _ = pipeline._rounds(problem, hand, ids, stuck, truth.betas, weights, 2, boundary=boundary)

    def ring_error_deg(poses):
        return np.rad2deg(np.abs(poses.hand_pose[:, ring] - truth.hand_pose[:, ring]).max())

    assert ring_error_deg(stuck) > 30.0  # tracking alone leaves it curled
    freed = pipeline._finger_hypotheses(problem, hand, ids, stuck, cost, truth.betas, weights, boundary, FRAMES - 1, 2)
    assert freed is not None
    assert ring_error_deg(freed[0]) < 10.0, ring_error_deg(freed[0])
    assert np.sum(freed[1]) < np.sum(cost)


def test_checkpoint_of_another_input_is_not_reused(open_right, full_sequence, tmp_path):
    scans, _ = full_sequence
    stale = {"frames": np.array([0]), "betas": np.full(10, 3.0), "scale": np.array(1.0)}
    stale.update(pipeline.Poses.identity(1).arrays(""))
    np.savez(tmp_path / "stage0.npz", **stale)
    (tmp_path / "checkpoint.json").write_text('{"format": "x", "fingerprint": "another input"}')
    ckpt = pipeline._Checkpoint(tmp_path, pipeline._fingerprint(pipeline.prepare(scans, open_right, CONFIG)))
    assert ckpt.load("stage0") is None


def test_unknown_units_scale_is_recovered(open_right):
    # A subject of the mean shape: otherwise its size (betas) and the scale explain each other.
    scans, truth = make_sequence(
        open_right, num_frames=FRAMES, points_per_frame=POINTS, partial=False, noise=0.0, outlier_ratio=0.0,
        forearm=False, seed=3, scale=3.7, beta_scale=0.0, offset_scale=0.0,
    )
    assert scans.units == "unknown"
    result = pipeline.register_sequence(scans, open_right, CONFIG, progress=False)
    assert abs(result.scale / 3.7 - 1.0) < 0.03, result.scale
    err = vertex_error_mm(result, open_right, truth) / 3.7
    assert err.max() < 4.0, err


def test_unknown_units_with_partial_scans_and_a_forearm(open_right):
    # The forearm makes the scans look larger than their hand and hides where the hand ends; stage 0 once
    # sized the hand from the scan's spread and placed it a whole hand off (117 mm).
    scans, truth = make_sequence(open_right, num_frames=FRAMES, points_per_frame=POINTS, seed=3, scale=3.7)
    assert scans.units == "unknown"
    result = pipeline.register_sequence(scans, open_right, CONFIG, progress=False)
    err = vertex_error_mm(result, open_right, truth) / 3.7
    assert err.mean() < 5.0, err
    verts = result.posed_vertices(open_right)
    size = np.linalg.norm(verts - verts.mean(axis=1, keepdims=True), axis=-1).mean()
    true_size = np.linalg.norm(truth.vertices - truth.vertices.mean(axis=1, keepdims=True), axis=-1).mean()
    assert abs(size / true_size - 1.0) < 0.03, size / true_size


@pytest.mark.parametrize("forearm, warned", [(False, False), (True, True)])
def test_long_scan_in_unknown_units_is_flagged(open_right, forearm, warned):
    # Unknown units with a long forearm can fail unseen (an oversized hand wraps hand and forearm).
    scans, _ = make_sequence(open_right, num_frames=1, points_per_frame=POINTS, seed=4, scale=3.7, forearm=forearm, forearm_length=0.25)
    problem = pipeline.prepare(scans, open_right, CONFIG)
    assert (pipeline.long_scan_warning(problem, 0) is not None) == warned
    assert pipeline.long_scan_warning(pipeline.prepare(scans, open_right, CONFIG.replace(solve_scale=False)), 0) is None


def test_stage0_places_the_hand_at_the_end_of_a_long_forearm(open_right):
    # 25 cm of forearm: a rigid hand in a rest pose fits the forearm nearly as well as the curled hand, so
    # the hand turned round onto the forearm used to win (378 mm off).
    scans, truth = make_sequence(open_right, num_frames=2, points_per_frame=POINTS, seed=3, forearm_length=0.25)
    reg = pipeline.Registration(scans, open_right, CONFIG, progress=False)
    reg.stage0()
    err = 1000 * np.linalg.norm(reg.posed_vertices()[0] - truth.vertices[0], axis=-1).mean()
    assert err < 10.0, err


def test_stage0_sizes_the_hand_on_a_long_forearm_in_unknown_units(open_right):
    # 15 cm of forearm, unknown units: a hand 25% too small at the forearm's far end, the real hand cut away
    # as forearm, cost less than the right placement held at the size the rigid search gave it (9% small);
    # stage 0 put the hand 216 mm off.
    scans, truth = make_sequence(
        open_right, num_frames=FRAMES, points_per_frame=POINTS, seed=6, scale=3.7, forearm_length=0.15
    )
    reg = pipeline.Registration(scans, open_right, CONFIG, progress=False)
    out = reg.stage0()
    err = 1000 * np.linalg.norm(reg.posed_vertices()[0] - truth.vertices[0], axis=-1).mean() / 3.7
    assert err < 20.0, err
    assert abs(out["scale"] / 3.7 - 1.0) < 0.1, out["scale"]


def test_random_orientation_is_found_by_stage0(open_right):
    scans, truth = make_sequence(
        open_right, num_frames=1, points_per_frame=POINTS, partial=False, noise=0.0, outlier_ratio=0.0,
        forearm=False, seed=4,
    )
    turn = Rotation.from_rotvec([2.1, -1.3, 0.7])
    problem = pipeline.prepare(scans.replace(points=(turn.apply(scans.points[0]),)), open_right, CONFIG)
    best = pipeline.initialise(problem, [0])
    poses, _, _ = best[0]
    true_rot = turn.as_matrix() @ Rotation.from_rotvec(truth.global_orient[0]).as_matrix()
    angle = np.linalg.norm(Rotation.from_matrix(poses.rot[0] @ true_rot.T).as_rotvec())
    assert np.rad2deg(angle) < 10.0


def test_unordered_set_fits_each_frame(open_right):
    scans, truth = make_sequence(
        open_right, num_frames=4, points_per_frame=POINTS, partial=False, noise=0.0, outlier_ratio=0.0,
        forearm=False, seed=5, unordered=True,
    )
    assert scans.unordered
    result = pipeline.register_sequence(scans, open_right, CONFIG, progress=False)
    assert result.unordered
    err = vertex_error_mm(result, open_right, truth)
    assert err.max() < 6.0, err


def test_left_hand(open_right):
    left = mano_jax.load_model("open-left")
    scans, truth = make_sequence(
        left, num_frames=FRAMES, points_per_frame=POINTS, partial=False, noise=0.0, outlier_ratio=0.0,
        forearm=False, seed=6,
    )
    result = pipeline.register_sequence(scans, left, CONFIG, progress=False)
    assert result.side == "left"
    err = vertex_error_mm(result, left, truth)
    assert err.max() < 4.0, err


def test_analytic_jacobian_matches_autodiff(mano_right):
    """The solvers' hand-written Jacobian against jax.jacfwd of `mano_jax.forward` (778-vertex fixture
    with pose blend shapes, float64)."""
    rng = np.random.default_rng(0)
    pose = jnp.asarray(rng.normal(size=45) * 0.4)
    betas = jnp.asarray(rng.normal(size=10))
    rot = mano_jax.axis_angle_to_matrix(jnp.asarray(rng.normal(size=3)))
    transl = jnp.asarray(rng.normal(size=3) * 0.1)
    scale = 1.7
    hand = stages.make_hand(mano_right, np.zeros((mano_right.num_vertices, 3)), 8)
    verts, jv, kp, jk = stages.linearise(hand, pose, rot, transl, betas, scale)

    def world(x):
        r = mano_jax.axis_angle_to_matrix(x[45:48]) @ rot
        out = mano_jax.forward(
            mano_right, hand_pose=x[:45], betas=x[51:61], global_orient=mano_jax.matrix_to_axis_angle(r),
            transl=x[48:51],
        )
        return jnp.exp(x[61]) * out.vertices, jnp.exp(x[61]) * out.keypoints

    x0 = jnp.concatenate([pose, jnp.zeros(3), transl, betas, jnp.log(jnp.asarray([scale]))])
    (v_ref, k_ref), (jv_ref, jk_ref) = world(x0), jax.jacfwd(world)(x0)
    np.testing.assert_allclose(verts, v_ref, atol=1e-12)
    np.testing.assert_allclose(kp, k_ref, atol=1e-12)
    np.testing.assert_allclose(jv, jv_ref, atol=1e-10)
    np.testing.assert_allclose(jk, jk_ref, atol=1e-10)


def test_closest_point_on_triangles_matches_brute_force():
    import trimesh

    rng = np.random.default_rng(0)
    tri = rng.normal(size=(400, 3, 3))
    points = rng.normal(size=(400, 3)) * 2
    ref = trimesh.triangles.closest_point(tri, points)
    d2, bary = closest_on_triangles(jnp.asarray(points), jnp.asarray(tri[:, 0]), jnp.asarray(tri[:, 1]), jnp.asarray(tri[:, 2]))
    np.testing.assert_allclose(np.einsum("nk,nkc->nc", np.asarray(bary), tri), ref, atol=1e-9)
    np.testing.assert_allclose(np.sqrt(np.asarray(d2)), np.linalg.norm(ref - points, axis=1), atol=1e-9)
    # Candidates from a vertex's one-ring: the closest of them is found, padding is ignored.
    sphere = trimesh.creation.icosphere(2)
    faces = np.asarray(sphere.faces)
    cand = vertex_faces(faces, len(sphere.vertices))
    query = sphere.vertices[:50] * 1.1
    face, _, dist = closest_on_candidates(jnp.asarray(query), jnp.asarray(sphere.vertices), jnp.asarray(faces), jnp.asarray(np.where(cand[:50] < 0, cand[:50, :1], cand[:50])))
    assert np.all(np.isin(np.asarray(face)[:, None], cand[:50]).any(axis=1))
    np.testing.assert_allclose(np.asarray(dist), 0.1, atol=0.02)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="overlap"):
        RegistrationConfig(window=4, overlap=4, num_keyframes=4)
    with pytest.raises(ValueError, match="num_keyframes"):
        RegistrationConfig(window=4, num_keyframes=5)
    with pytest.raises(ValueError, match="side"):
        RegistrationConfig(side="middle")
    assert dataclasses.asdict(CONFIG)["max_points"] == POINTS


def test_no_usable_frame_is_a_clear_error(open_right):
    from registration.scans import ScanSequence

    empty = ScanSequence(points=(np.zeros((0, 3)),) * 2, normals=(None, None), names=("a", "b"), bad_frames=(0, 1))
    with pytest.raises(ValueError, match="no frame of the sequence has usable points"):
        pipeline.register_sequence(empty, open_right, CONFIG, progress=False)
