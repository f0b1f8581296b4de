"""Fitting the hand model to 3D and 2D keypoints (registration.keypoints) on synthetic data from the bundled
open hand: known poses and shapes, fixed seeds. Full-size numbers: bench/keypoints.py.

Compilation dominates the cost, so the tests share a few problem sizes: 3D fits use 8 frames (one subject,
each frame its own pose and orientation), 2D fits 6 frames.
"""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mano_jax import forward, load_model
from mano_jax.priors import JointLimits
from registration.camera import CameraError, PinholeCamera, load_camera
from registration.keypoints import (
    KeypointFitConfig,
    KeypointFitError,
    fit_keypoints,
    load_keypoints,
    procrustes_error,
    sample_plausible_hands,
    write_outputs,
)
from registration.result import load_result

FRAMES_3D, FRAMES_2D = 8, 6


@pytest.fixture(scope="module")
def model():
    return load_model(dtype=jnp.float64)


@pytest.fixture(scope="module")
def limits(model):
    return JointLimits.default(model)


def synthetic(model, frames, seed, *, distance=None):
    """Posed model (ManoOutput, OpenPose order) of `frames` plausible poses of one random subject."""
    poses, betas = sample_plausible_hands(model, frames, seed=seed)
    rng = np.random.default_rng(seed)
    orient = Rotation.random(frames, random_state=seed).as_rotvec()
    transl = rng.normal(size=(frames, 3)) * 0.1
    if distance is not None:
        transl[:, 2] = distance
    out = forward(model, hand_pose=poses, betas=np.broadcast_to(betas[0], (frames, model.num_betas)),
                  global_orient=orient, transl=transl, keypoint_order="openpose")  # fmt: skip
    return out, poses


def test_3d_keypoints_without_noise_are_fitted_below_a_millimetre(model, limits):
    truth, _ = synthetic(model, FRAMES_3D, seed=10)
    config = KeypointFitConfig(sigma_3d=0.001, smooth=False)  # frames are unrelated: no smoothing
    result = fit_keypoints(np.asarray(truth.keypoints), model=model, config=config)
    joint_error = np.linalg.norm(result.keypoints - np.asarray(truth.keypoints), axis=-1).mean()
    vertex_error = np.linalg.norm(result.vertices(model) - np.asarray(truth.vertices), axis=-1).mean()
    assert joint_error < 0.001
    assert vertex_error < 0.003
    np.testing.assert_allclose(result.frame_error, np.linalg.norm(result.keypoints - truth.keypoints, axis=-1).mean(1))


def test_3d_keypoints_with_5mm_noise_respect_the_joint_limits_and_beat_the_noise(model, limits):
    truth, _ = synthetic(model, FRAMES_3D, seed=11)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=truth.keypoints.shape) * 0.005 / np.sqrt(3)  # 5 mm RMS displacement
    result = fit_keypoints(np.asarray(truth.keypoints) + noise, model=model, config=KeypointFitConfig(smooth=False))
    assert limits.violations(result.hand_pose) == []
    joint_error = np.linalg.norm(result.keypoints - np.asarray(truth.keypoints), axis=-1).mean()
    assert joint_error < 0.005
    assert joint_error < np.linalg.norm(noise, axis=-1).mean()


def test_sequence_fit_is_smoother_than_frame_by_frame(model, tmp_path):
    frames = FRAMES_3D
    poses, betas = sample_plausible_hands(model, 2, seed=12)
    s = np.linspace(0.0, 1.0, frames)[:, None]
    truth = forward(model, hand_pose=(1 - s) * poses[0] + s * poses[1], betas=np.broadcast_to(betas[0], (frames, 10)),
                    global_orient=np.stack([0.3 * s[:, 0], 0.2 * np.sin(3 * s[:, 0]), np.zeros(frames)], 1),
                    transl=0.03 * np.concatenate([s, s**2, np.zeros_like(s)], 1), keypoint_order="openpose")  # fmt: skip
    gt = np.asarray(truth.keypoints)
    observed = gt + np.random.default_rng(1).normal(size=gt.shape) * 0.004
    observed[3, [4, 8]] = np.nan  # two fingertips lost in one frame
    smooth = fit_keypoints(observed, model=model)
    rough = fit_keypoints(observed, model=model, config=KeypointFitConfig(smooth=False))

    def jitter(x):
        return np.linalg.norm(x[2:] - 2 * x[1:-1] + x[:-2], axis=-1).mean()

    assert smooth.betas.shape == (10,)
    assert np.isfinite(smooth.keypoints).all()
    assert jitter(smooth.keypoints) < jitter(rough.keypoints)
    assert np.linalg.norm(smooth.keypoints - gt, axis=-1).mean() < np.linalg.norm(rough.keypoints - gt, axis=-1).mean()

    # The output directory, as a registration's.
    report = write_outputs(smooth, tmp_path, model, observed)
    for name in ("params.npz", "keypoints.npz", "report.json", "preview.png", "meshes/frame_0007.ply"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "camera.json").exists()
    saved = load_result(tmp_path)
    np.testing.assert_allclose(saved.hand_pose, smooth.hand_pose)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["error_unit"] == "mm" and len(on_disk["frames"]) == frames
    assert on_disk["frames"][3]["keypoints_used"] == 19
    assert report["summary"]["mean_error_mm"] == pytest.approx(1000 * np.nanmean(smooth.frame_error))


@pytest.fixture(scope="module")
def images(model):
    """Six hands 0.5 m in front of a 1000 px camera and their 3D keypoints (camera frame)."""
    truth, _ = synthetic(model, FRAMES_2D, seed=13, distance=0.5)
    camera = PinholeCamera.create(fx=1000.0, fy=1000.0, cx=640.0, cy=360.0, dtype=jnp.float64)
    return np.asarray(truth.keypoints), camera


def test_2d_keypoints_with_known_intrinsics_give_the_3d_hand_within_8mm(model, images):
    kp3d, camera = images
    noise = np.random.default_rng(2).normal(size=(FRAMES_2D, 21, 2)) * 2.0
    pixels = np.asarray(camera.project(jnp.asarray(kp3d))) + noise
    result = fit_keypoints(pixels, camera=camera, model=model, config=KeypointFitConfig(smooth=False))
    errors = [procrustes_error(result.keypoints[t], kp3d[t]) for t in range(FRAMES_2D)]
    assert np.mean(errors) <= 0.008
    assert result.projected.shape == (FRAMES_2D, 21, 2) and np.all(result.frame_error < 5.0)


def test_weak_perspective_fit_converges_from_the_default_start(model, images):
    kp3d, _ = images
    pixels = 2000.0 * kp3d[..., :2] + np.array([320.0, 240.0])
    pixels += np.random.default_rng(3).normal(size=pixels.shape)
    result = fit_keypoints(pixels, camera="weak-perspective", model=model, config=KeypointFitConfig(smooth=False))
    converged = result.frame_error < 3.0  # mean reprojection error in pixels, with 1 px noise
    assert converged.mean() >= 0.95
    np.testing.assert_allclose(result.scale, 2000.0, rtol=0.1)  # scale x hand size is what the image fixes


def test_bad_inputs_are_reported_clearly(model, images):
    kp3d, camera = images
    with pytest.raises(KeypointFitError, match="expected shape"):
        fit_keypoints(np.zeros((2, 20, 3)), model=model)
    with pytest.raises(KeypointFitError, match="need a camera"):
        fit_keypoints(kp3d[0, :, :2], model=model)
    with pytest.raises(KeypointFitError, match="only used with 2D"):
        fit_keypoints(kp3d[0], camera=camera, model=model)
    with pytest.raises(KeypointFitError, match="millimetres"):
        fit_keypoints(kp3d[0] * 1000, model=model)
    with pytest.raises(KeypointFitError, match="confidence"):
        fit_keypoints(kp3d[0], confidence=-np.ones(21), model=model)
    with pytest.raises(KeypointFitError, match="no frame has a usable keypoint"):
        fit_keypoints(np.full((21, 3), np.nan), model=model)


def test_camera_and_keypoint_files(tmp_path):
    (tmp_path / "cam.json").write_text(json.dumps({"fx": 900, "fy": 910, "cx": 320, "cy": 240, "t": [0, 0, 0.1]}))
    camera = load_camera(tmp_path / "cam.json")
    assert float(camera.K[1, 1]) == 910 and float(camera.t[2]) == pytest.approx(0.1)
    (tmp_path / "weak.json").write_text('{"type": "weak-perspective"}')
    assert load_camera(tmp_path / "weak.json") == "weak-perspective"
    (tmp_path / "bad.json").write_text(json.dumps({"fx": 900, "cx": 320}))
    with pytest.raises(CameraError, match=r"bad\.json.*missing fy, cy"):
        load_camera(tmp_path / "bad.json")
    mirror = [[1, 0, 0], [0, 1, 0], [0, 0, -1]]
    (tmp_path / "rot.json").write_text(json.dumps({"fx": 1, "fy": 1, "cx": 0, "cy": 0, "R": mirror}))
    with pytest.raises(CameraError, match="rotation"):
        load_camera(tmp_path / "rot.json")

    # OpenPose output: a directory of per-frame files, the most confident right hand, an empty frame.
    frames = tmp_path / "openpose"
    frames.mkdir()
    hand = np.concatenate([np.arange(42.0).reshape(21, 2), np.full((21, 1), 0.9)], 1)
    weak = hand.copy()
    weak[:, 2] = 0.1
    people = [{"hand_right_keypoints_2d": weak.ravel().tolist()}, {"hand_right_keypoints_2d": hand.ravel().tolist()}]
    (frames / "f_2.json").write_text(json.dumps({"people": people}))
    (frames / "f_10.json").write_text(json.dumps({"people": []}))
    kp, conf = load_keypoints(frames)
    assert kp.shape == (2, 21, 2) and conf.shape == (2, 21)
    np.testing.assert_allclose(kp[0], hand[:, :2])  # f_2 before f_10 (natural order)
    assert np.all(conf[0] == 0.9) and np.all(conf[1] == 0)
    with pytest.raises(KeypointFitError, match="no such keypoint file"):
        load_keypoints(tmp_path / "missing.npy")


def test_cli_reports_user_errors_in_one_line(tmp_path):
    np.save(tmp_path / "kp.npy", np.zeros((21, 2)))
    run = subprocess.run(
        [sys.executable, "-c", "import sys, argparse; from registration.cli_keypoints import add_commands; "
         "p = argparse.ArgumentParser(); add_commands(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); "
         "sys.exit(a.func(a))", "fit-keypoints", str(tmp_path / "kp.npy"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2
    assert "2D keypoints need --camera FILE or --weak-perspective" in run.stderr
    assert "Traceback" not in run.stderr
