"""Keypoint fitting on synthetic data from the bundled open hand (fixed seeds): accuracy and speed.

    PYTHONPATH=. python bench/keypoints.py [--samples 64] [--frames 100]

Scenarios (the evidence of issue 6), all with the default `KeypointFitConfig` unless stated:
- 3D keypoints without noise (sigma_3d = 1 mm): mean joint (21 keypoints) and vertex error;
- 3D keypoints with 5 mm RMS noise: joint-limit violations of the fitted poses, mean joint error vs noise;
- 2D keypoints with 2 px noise, known intrinsics (f = 1000 px), hand 0.5 m away: Procrustes-aligned error;
- weak perspective, 2D only (1 px noise): share of samples whose fit converges (mean reprojection < 3 px);
- a 100-frame sequence (3D, 5 mm noise): frames per second (compiled; first call reported separately) and
  keypoint jitter of the smoothed vs the frame-by-frame fit.
Independent samples are fitted in one call each (`shared_shape=False, smooth=False`: every sample its own
hand). Prints a table and writes bench/results/keypoints.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.interpolate import CubicSpline
from scipy.spatial.transform import Rotation

# The repository root first: run as a script, this folder's registration.py would shadow the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mano_jax import forward, load_model  # noqa: E402
from mano_jax._atomic import atomic_path  # noqa: E402
from mano_jax.priors import JointLimits  # noqa: E402
from registration.camera import PinholeCamera  # noqa: E402
from registration.keypoints import (  # noqa: E402
    KeypointFitConfig,
    fit_keypoints,
    procrustes_error,
    sample_plausible_hands,
)

INDEPENDENT = dict(shared_shape=False, smooth=False)


def hands(model, n, seed, distance=None):
    poses, betas = sample_plausible_hands(model, n, seed=seed)
    rng = np.random.default_rng(seed)
    orient = Rotation.random(n, random_state=seed).as_rotvec()
    transl = rng.normal(size=(n, 3)) * 0.1
    if distance is not None:
        transl[:, 2] = distance
    out = forward(model, hand_pose=poses, betas=betas, global_orient=orient, transl=transl, keypoint_order="openpose")
    return np.asarray(out.keypoints, np.float64), np.asarray(out.vertices, np.float64)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="independent samples per scenario")
    parser.add_argument("--frames", type=int, default=100, help="length of the sequence")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "keypoints.json"))
    args = parser.parse_args(argv)
    model = load_model()  # float32, as users get it
    limits = JointLimits.default(model)
    n = args.samples
    results = {"samples": n, "dtype": str(model.dtype), "machine": platform.machine(), "cpus": jax.device_count()}

    kp, verts = hands(model, n, seed=100)
    config = KeypointFitConfig(sigma_3d=0.001, **INDEPENDENT)
    fit, seconds = timed(lambda: fit_keypoints(kp, model=model, config=config))
    results["3d_clean"] = {
        "mean_joint_error_mm": 1000 * float(np.linalg.norm(fit.keypoints - kp, axis=-1).mean()),
        "mean_vertex_error_mm": 1000 * float(np.linalg.norm(fit.vertices(model) - verts, axis=-1).mean()),
        "worst_sample_joint_error_mm": 1000 * float(np.linalg.norm(fit.keypoints - kp, axis=-1).mean(1).max()),
        "seconds_with_compile": seconds,
    }

    kp, _ = hands(model, n, seed=101)
    noise = np.random.default_rng(0).normal(size=kp.shape) * 0.005 / np.sqrt(3)
    fit, seconds = timed(lambda: fit_keypoints(kp + noise, model=model, config=KeypointFitConfig(**INDEPENDENT)))
    violations = limits.violations(jnp.asarray(fit.hand_pose, model.dtype))
    results["3d_noise_5mm"] = {
        "mean_noise_mm": 1000 * float(np.linalg.norm(noise, axis=-1).mean()),
        "mean_joint_error_mm": 1000 * float(np.linalg.norm(fit.keypoints - kp, axis=-1).mean()),
        "poses_violating_limits": len({v["frame"] for v in violations}),
        "largest_violation_deg": max((v["amount_deg"] for v in violations), default=0.0),
        "seconds": seconds,
    }

    kp, _ = hands(model, n, seed=102, distance=0.5)
    camera = PinholeCamera.create(fx=1000.0, fy=1000.0, cx=640.0, cy=360.0)
    pixels = np.asarray(camera.project(jnp.asarray(kp, jnp.float32)), np.float64)
    pixels += np.random.default_rng(1).normal(size=pixels.shape) * 2.0
    config = KeypointFitConfig(**INDEPENDENT)
    fit, seconds = timed(lambda: fit_keypoints(pixels, camera=camera, model=model, config=config))
    pa = np.array([procrustes_error(fit.keypoints[i], kp[i]) for i in range(n)])
    results["2d_pinhole_2px"] = {
        "procrustes_mean_joint_error_mm": 1000 * float(pa.mean()),
        "procrustes_worst_sample_mm": 1000 * float(pa.max()),
        "mean_reprojection_error_px": float(fit.frame_error.mean()),
        "seconds_with_compile": seconds,
    }

    m = max(n, 100)
    kp, _ = hands(model, m, seed=103, distance=0.5)
    pixels = 2000.0 * kp[..., :2] + np.array([320.0, 240.0]) + np.random.default_rng(2).normal(size=(m, 21, 2))
    fit, seconds = timed(lambda: fit_keypoints(pixels, camera="weak-perspective", model=model,
                                               config=KeypointFitConfig(**INDEPENDENT)))  # fmt: skip
    pa = np.array([procrustes_error(fit.keypoints[i], kp[i]) for i in range(m)])
    results["2d_weak_perspective_1px"] = {
        "samples": m,
        "converged_share": float(np.mean(fit.frame_error < 3.0)),
        "mean_reprojection_error_px": float(fit.frame_error.mean()),
        "procrustes_mean_joint_error_mm": 1000 * float(pa.mean()),
        "seconds_with_compile": seconds,
    }

    t = args.frames
    keys, betas = sample_plausible_hands(model, 6, seed=104)
    phase = np.linspace(0, 5, t)
    angle = np.linspace(0, 2 * np.pi, t)
    seq = forward(model, hand_pose=CubicSpline(np.arange(6), keys)(phase), betas=np.broadcast_to(betas[0], (t, 10)),
                  global_orient=np.stack([0.3 * np.sin(angle), 0.5 * np.cos(angle), 0.2 * np.sin(2 * angle)], 1),
                  transl=np.stack([0.05 * np.sin(angle), 0.03 * np.cos(angle), 0.02 * np.sin(3 * angle)], 1),
                  keypoint_order="openpose")  # fmt: skip
    gt = np.asarray(seq.keypoints, np.float64)
    observed = gt + np.random.default_rng(3).normal(size=gt.shape) * 0.005 / np.sqrt(3)

    def jitter(x):
        return 1000 * float(np.linalg.norm(x[2:] - 2 * x[1:-1] + x[:-2], axis=-1).mean())

    _, first = timed(lambda: fit_keypoints(observed, model=model))
    smooth, warm = timed(lambda: fit_keypoints(observed, model=model))
    rough = fit_keypoints(observed, model=model, config=KeypointFitConfig(smooth=False))
    results["sequence"] = {
        "frames": t,
        "seconds_first_call_with_compile": first,
        "seconds": warm,
        "frames_per_second": t / warm,
        "mean_joint_error_mm": 1000 * float(np.linalg.norm(smooth.keypoints - gt, axis=-1).mean()),
        "mean_joint_error_unsmoothed_mm": 1000 * float(np.linalg.norm(rough.keypoints - gt, axis=-1).mean()),
        "jitter_mm_per_frame2": jitter(smooth.keypoints),
        "jitter_unsmoothed_mm_per_frame2": jitter(rough.keypoints),
        "jitter_ground_truth_mm_per_frame2": jitter(gt),
        "jitter_input_mm_per_frame2": jitter(observed),
    }

    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=2) + "\n")
    for name, values in results.items():
        if isinstance(values, dict):
            print(f"{name}:")
            for key, value in values.items():
                print(f"  {key:40s} {value:.3f}" if isinstance(value, float) else f"  {key:40s} {value}")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
