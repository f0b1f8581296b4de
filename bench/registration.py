"""Benchmark of scan-sequence registration on synthetic sequences with ground truth (fixed seeds).

Measures, for a 60-frame sequence of 5,000-point scans from the default model (subject shape = betas +
smooth per-vertex offsets, smooth known motion):

- full noiseless scans and single-view partial scans with 1 mm noise, 5% outliers and a forearm:
  mean per-vertex error (mm), jitter (mean vertex acceleration, mm/frame^2) against the ground truth's,
  median scan-to-model distance (mm, exact point-to-triangle; per frame, averaged over frames) over all
  scan points and over the points sampled on the hand, with the true surface's own values for scale,
  retried frames;
- time: the first registration in the process (compilation included) and a second one of the same
  sequence (steady state): steady-state frames per second = frames / second; compile time = the time JAX
  reports spending on tracing, lowering and XLA compilation during the first (first - second is no measure
  of it: compilation overlaps host work, and load changes between runs); wall and CPU seconds (the CPU may
  be shared: CPU seconds show the work done);
- nearest-neighbour search for the scan -> model correspondences: SciPy KD-tree on the host vs brute
  force in the graph, for a window of frames, and how often the candidate triangles around the nearest
  vertex miss the exact closest triangle.

Targets (issue 4): error <= 1.5 mm full / <= 3 mm partial, jitter within 10% of the ground truth's,
median scan-to-model <= 1 mm on the partial scans, <= 60 s end to end on 2 CPU cores. The median target
is checked on the hand's points: over all points the true surface itself scores about 1 mm (1 mm noise,
and the 5% outliers and the forearm lie off the hand model), so that number says little about the fit.

    PYTHONPATH=. .venv/bin/python bench/registration.py [--frames 60] [--points 5000] [--out bench/results/registration.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mano_jax  # noqa: E402
from mano_jax._atomic import atomic_path  # noqa: E402
from registration import pipeline  # noqa: E402
from registration.config import RegistrationConfig  # noqa: E402
from registration.correspondences import closest_on_candidates  # noqa: E402
from registration.outputs import scan_to_mesh_distance  # noqa: E402
from registration.synthetic import HAND, make_sequence  # noqa: E402

SEED_FULL = 11
SEED_PARTIAL = 12


def jitter_mm(vertices: np.ndarray) -> float:
    """Mean vertex acceleration (mm/frame^2) of a (T, V, 3) sequence in metres."""
    return float(np.linalg.norm(vertices[2:] - 2 * vertices[1:-1] + vertices[:-2], axis=-1).mean() * 1000)


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0]


def _count_compile_time(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile_time)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def register_twice(model, scans, config) -> tuple:
    compile0 = _compile_seconds[0]
    first, wall1, cpu1 = timed(lambda: pipeline.register_sequence(scans, model, config, progress=False))
    compile1 = _compile_seconds[0]
    second, wall2, cpu2 = timed(lambda: pipeline.register_sequence(scans, model, config, progress=False))
    timing = {
        "first_run_wall_s": wall1,
        "first_run_cpu_s": cpu1,
        "first_run_compile_s": compile1 - compile0,
        "steady_run_wall_s": wall2,
        "steady_run_cpu_s": cpu2,
        "steady_run_compile_s": _compile_seconds[0] - compile1,
        "steady_state_fps": scans.num_frames / wall2,
    }
    return second, timing


def median_distances_mm(scans, truth, vertices, faces, hand_only: bool) -> np.ndarray:
    """(T,) median distance (mm) from each frame's scan points to the mesh `vertices`: all points, or only
    the points sampled on the hand (`hand_only`: the synthetic outliers and forearm left out)."""
    out = []
    for points, labels, v in zip(scans.points, truth.labels, vertices):
        if hand_only:
            points = points[labels == HAND]
        out.append(np.median(scan_to_mesh_distance(points, v, faces)) * 1000)
    return np.asarray(out)


def evaluate(model, scans, truth, result) -> dict:
    posed = result.posed_vertices(model)
    err = np.linalg.norm(posed - truth.vertices, axis=-1).mean(axis=1) * 1000
    faces = np.asarray(model.faces)
    medians = median_distances_mm(scans, truth, posed, faces, hand_only=False)
    hand = median_distances_mm(scans, truth, posed, faces, hand_only=True)
    fit_jitter, true_jitter = jitter_mm(posed), jitter_mm(truth.vertices)
    return {
        "mean_vertex_error_mm": float(err.mean()),
        "worst_frame_vertex_error_mm": float(err.max()),
        "jitter_mm_per_frame2": fit_jitter,
        "ground_truth_jitter_mm_per_frame2": true_jitter,
        "jitter_ratio": fit_jitter / true_jitter,
        "median_scan_to_model_mm": float(np.mean(medians)),
        "worst_frame_median_scan_to_model_mm": float(medians.max()),
        "median_scan_to_model_hand_points_mm": float(np.mean(hand)),
        "worst_frame_median_scan_to_model_hand_points_mm": float(hand.max()),
        # The true surface itself, for scale: what noise, outliers and the forearm leave at a perfect fit.
        "ground_truth_median_scan_to_model_mm": float(
            np.mean(median_distances_mm(scans, truth, truth.vertices, faces, hand_only=False))
        ),
        "ground_truth_median_scan_to_model_hand_points_mm": float(
            np.mean(median_distances_mm(scans, truth, truth.vertices, faces, hand_only=True))
        ),
        "retried_frames": list(result.retried_frames),
        "stage_seconds": {k: round(v, 2) for k, v in result.stage_times.items()},
    }


def robustness(frames: int = 20, points: int = 2000, seeds=(5, 6, 7), only=None) -> dict:
    """Mean per-vertex error (mm) of short partial sequences (one per seed) as scanned (hand 0.5 m from the
    sensor, 8 cm of forearm), moved 1.6 m and turned (a scanner's coordinates), with 15 or 25 cm of
    forearm, and in unknown units (x 3.7, the scale solved) with 8, 15 or 25 cm of forearm. `only`: names
    of the cases to run (default all)."""
    from scipy.spatial.transform import Rotation

    model = mano_jax.load_model()
    config = RegistrationConfig(max_points=points)
    turn, shift = Rotation.from_rotvec([0.3, -1.0, 2.2]), np.array([0.4, -0.9, 1.3])
    out = {"frames": frames, "points_per_frame": points, "seeds": list(seeds), "load_average_at_start": list(os.getloadavg())}
    cases = (  # name, forearm length, moved, scale
        ("as_scanned", 0.08, False, 1.0), ("moved_1.6m_and_turned", 0.08, True, 1.0), ("forearm_15cm", 0.15, False, 1.0),
        ("forearm_25cm", 0.25, False, 1.0), ("unknown_units", 0.08, False, 3.7), ("unknown_units_forearm_15cm", 0.15, False, 3.7),
        ("unknown_units_forearm_25cm", 0.25, False, 3.7),
    )  # fmt: skip
    unknown = set(only or ()) - {c[0] for c in cases}
    if unknown:
        raise SystemExit(f"--cases: no robustness case named {', '.join(sorted(unknown))} (cases: {', '.join(c[0] for c in cases)})")
    for name, forearm_length, moved, scale in cases:
        if only and name not in only:
            continue
        errors, walls = [], []
        for seed in seeds:
            scans, truth = make_sequence(
                model, num_frames=frames, points_per_frame=points, seed=seed, forearm_length=forearm_length, scale=scale
            )
            if moved:
                scans = scans.replace(
                    points=tuple(turn.apply(p) + shift for p in scans.points),
                    normals=tuple(None if n is None else turn.apply(n) for n in scans.normals),
                )
            result, wall, _ = timed(lambda: pipeline.register_sequence(scans, model, config, progress=False))
            verts = result.posed_vertices(model)
            if moved:
                verts = turn.inv().apply((verts - shift).reshape(-1, 3)).reshape(verts.shape)
            errors.append(float(1000 * np.linalg.norm(verts - truth.vertices, axis=-1).mean() / scale))
            walls.append(wall)
        out[name] = {"mean_vertex_error_mm": errors, "worst_mm": max(errors), "wall_s": walls}
        print(name, out[name], flush=True)
    return out


def correspondence_search(model, scans, config, window: int) -> dict:
    """KD-tree vs brute-force nearest neighbours for one window of frames, same inputs, same run."""
    out = {}
    problem = pipeline.prepare(scans, model, config)
    ids = np.arange(window)
    hand = pipeline.stages.make_hand(model, np.zeros((model.num_vertices, 3)), 8)
    dt = model.dtype
    verts, _ = pipeline._posed_batch(
        hand, pipeline.Poses.identity(window).device(dt), jnp.zeros(model.num_betas, dt), jnp.ones((), dt)
    )
    # Place the hand on the scans so the search is realistic: the frames' centroids.
    shift = problem.points[ids].sum(1) / problem.counts[ids][:, None] - np.asarray(verts).mean(1)
    verts = verts + jnp.asarray(shift[:, None, :], dt)
    for method in ("kdtree", "brute"):
        problem.config = config.replace(nearest_neighbours=method)
        jax.block_until_ready(pipeline.match(problem, ids, verts, 1.0).faces)  # warm-up / compile
        reps = 5
        _, wall, cpu = timed(lambda: [jax.block_until_ready(pipeline.match(problem, ids, verts, 1.0).faces) for _ in range(reps)])
        out[method] = {"wall_ms_per_frame": 1000 * wall / reps / window, "cpu_ms_per_frame": 1000 * cpu / reps / window}
    # Candidate triangles (one-ring of the nearest vertex) against the exact closest triangle.
    problem.config = config
    matches = pipeline.match(problem, ids[:1], verts[:1], 1.0)
    n = min(int(problem.counts[0]), 1000)
    pts = jnp.asarray(problem.points[0, :n], dt)
    faces = model.faces
    everything = jnp.broadcast_to(jnp.arange(faces.shape[0])[None], (n, faces.shape[0]))
    _, _, exact = jax.jit(closest_on_candidates)(pts, verts[0], faces, everything)
    chosen = np.asarray(matches.faces[0, :n])
    _, _, d_chosen = closest_on_candidates(pts, verts[0], faces, jnp.asarray(chosen[:, None]))
    excess = np.asarray(d_chosen) - np.asarray(exact)
    out["candidate_miss_share"] = float(np.mean(excess > 1e-6))
    out["candidate_mean_excess_um"] = float(excess.mean() * 1e6)
    out["points"] = int(problem.points.shape[1])
    out["vertices"] = int(model.num_vertices)
    out["chosen"] = config.nearest_neighbours
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--points", type=int, default=5000)
    parser.add_argument("--out", default="bench/results/registration.json")
    parser.add_argument(
        "--robustness", action="store_true",
        help="only the robustness cases (stored under 'robustness' in --out, the other entries kept)",
    )
    parser.add_argument("--cases", nargs="+", help="with --robustness: only these cases (the others' results kept)")
    args = parser.parse_args(argv)
    if args.robustness:
        out = Path(args.out)
        report = json.loads(out.read_text()) if out.exists() else {}
        report["robustness"] = report.get("robustness", {}) | robustness(only=args.cases)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
        print(json.dumps(report["robustness"], indent=1))
        return

    model = mano_jax.load_model()
    config = RegistrationConfig(max_points=args.points)
    report = {
        "frames": args.frames,
        "points_per_frame": args.points,
        "model": model.name,
        "vertices": model.num_vertices,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "jax": jax.__version__,
    }
    partial_scans, partial_truth = make_sequence(model, num_frames=args.frames, points_per_frame=args.points, seed=SEED_PARTIAL)
    full_scans, full_truth = make_sequence(
        model, num_frames=args.frames, points_per_frame=args.points, partial=False, noise=0.0, outlier_ratio=0.0,
        forearm=False, seed=SEED_FULL,
    )

    result, timing = register_twice(model, partial_scans, config)
    report["partial_noisy"] = evaluate(model, partial_scans, partial_truth, result) | {"timing": timing}
    print(json.dumps({"partial_noisy": report["partial_noisy"]}, indent=1), flush=True)

    full_result, full_wall, full_cpu = timed(lambda: pipeline.register_sequence(full_scans, model, config, progress=False))
    report["full_noiseless"] = evaluate(model, full_scans, full_truth, full_result) | {"timing": {"wall_s": full_wall, "cpu_s": full_cpu}}
    print(json.dumps({"full_noiseless": report["full_noiseless"]}, indent=1), flush=True)

    report["correspondence_search"] = correspondence_search(model, partial_scans, config, config.window)
    print(json.dumps({"correspondence_search": report["correspondence_search"]}, indent=1), flush=True)

    p, f = report["partial_noisy"], report["full_noiseless"]
    report["targets"] = {
        "full_error_le_1.5mm": f["mean_vertex_error_mm"] <= 1.5,
        "partial_error_le_3mm": p["mean_vertex_error_mm"] <= 3.0,
        "jitter_within_10pct": abs(p["jitter_ratio"] - 1) <= 0.1 and abs(f["jitter_ratio"] - 1) <= 0.1,
        "partial_median_scan_to_model_le_1mm": p["median_scan_to_model_hand_points_mm"] <= 1.0,
        "end_to_end_le_60s": p["timing"]["first_run_wall_s"] <= 60.0,
    }
    print(json.dumps({"targets": report["targets"]}, indent=1))
    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
