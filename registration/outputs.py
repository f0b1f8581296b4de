"""The output directory of a registration: params, meshes, report, preview; and registering into one.

Layout of `OUT/` (every file written atomically, so a reader or an interrupted run never sees half a file):

- `params.npz`: the fitted parameters (`registration.result.save_result`; `registration.load_result` reads it);
- `meshes/frame_0000.ply` ...: the registered mesh of every frame, **in the coordinates of the input scan
  files** (millimetres if the scans were millimetres), so it overlays the scans in any viewer;
- `template.ply`: the subject template (betas + offsets) in the flat rest pose, metres;
- `report.json`: per frame the median, mean and 90th-percentile scan-to-model distance in mm and the share
  of scan points within 2 mm (over all scan points: outliers and forearm count, so the median is the robust
  figure), a summary (those figures averaged over the frames with points, the worst frame's median), the
  sequence jitter (mean vertex acceleration, mm/frame^2; null for an unordered set), stage times, bad and
  retried frames;
- `preview.png`: first, middle and last frames with the scan overlaid, and the residual per frame;
- `checkpoints/`: the pipeline's per-stage checkpoints (re-running the same command resumes from them);
- `done.json`: written last, when everything above is complete.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from mano_jax._atomic import atomic_path

from .result import RegistrationResult, save_result
from .scans import ScanSequence

REPORT_FORMAT = "mano-jax-registration-report/1"
WITHIN_MM = 2.0
"""The distance (mm) under which a scan point counts as explained by the model in the report."""
EXACT_WITHIN = 0.05
"""Scan points within this fraction of the mesh's size from it get their exact distance; farther points (plain
outliers) an upper bound from the triangles around their nearest vertices."""


def scan_to_mesh_distance(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(N,) distance from each point (N, 3) to the triangle mesh (vertices (V, 3), faces (F, 3)), same units.

    First the triangles around each point's nearest vertices give an upper bound d; then, for points near
    the surface (`EXACT_WITHIN`), every triangle whose bounding sphere comes closer than d is checked, which
    makes their distance exact.
    """
    import trimesh
    from scipy.spatial import cKDTree

    points = np.asarray(points, np.float64)
    if len(points) == 0:
        return np.zeros(0)
    mesh = trimesh.Trimesh(np.asarray(vertices, np.float64), np.asarray(faces), process=False)
    triangles = mesh.triangles
    _, nearest = cKDTree(mesh.vertices).query(points, k=3)
    candidates = mesh.vertex_faces[nearest].reshape(len(points), -1)  # padded with -1
    keep = candidates >= 0
    distance = _closest_of(triangles, points, np.nonzero(keep)[0], candidates[keep], len(points))

    centre = triangles.mean(axis=1)
    radius = np.linalg.norm(triangles - centre[:, None], axis=2).max(axis=1)
    near = np.nonzero(distance <= EXACT_WITHIN * np.linalg.norm(np.ptp(mesh.vertices, axis=0)))[0]
    if len(near):
        found = cKDTree(centre).query_ball_point(points[near], distance[near] + radius.max())
        counts = np.fromiter(map(len, found), int, len(found))
        point_idx = np.repeat(near, counts)
        face_idx = np.fromiter((f for lst in found for f in lst), int, counts.sum())
        could = np.linalg.norm(points[point_idx] - centre[face_idx], axis=1) - radius[face_idx] < distance[point_idx]
        refined = _closest_of(triangles, points, point_idx[could], face_idx[could], len(points))
        distance = np.minimum(distance, refined)
    return distance


def _closest_of(triangles, points, point_idx, face_idx, n) -> np.ndarray:
    """(n,) per point the smallest distance to the triangles paired with it (inf where none)."""
    import trimesh

    distance = np.full(n, np.inf)
    if len(point_idx):
        tri = triangles[face_idx]
        # trimesh's region tests compare products of coordinates with an absolute tolerance (1e-12), which
        # misjudges millimetre triangles in metres: solve each pair in its triangle's own unit frame.
        size = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max(axis=1)[:, None]
        size = np.where(size > 0, size, 1.0)
        local_tri = (tri - tri[:, :1]) / size[:, None]
        local_points = (points[point_idx] - tri[:, 0]) / size
        closest = trimesh.triangles.closest_point(local_tri, local_points)
        np.minimum.at(distance, point_idx, size[:, 0] * np.linalg.norm(closest - local_points, axis=1))
    return distance


def frame_statistics(distance_mm: np.ndarray) -> dict:
    """Median, mean, 90th percentile (mm) and share within `WITHIN_MM` of one frame's distances (mm)."""
    return {
        "median_mm": float(np.median(distance_mm)),
        "mean_mm": float(np.mean(distance_mm)),
        "p90_mm": float(np.percentile(distance_mm, 90)),
        "within_2mm": float(np.mean(distance_mm <= WITHIN_MM)),
    }


def jitter_mm(vertices: np.ndarray) -> float | None:
    """Mean norm of the vertex acceleration v[t+1] - 2 v[t] + v[t-1] over frames and vertices, in mm/frame^2
    (`vertices` (T, V, 3) in metres); None for fewer than 3 frames."""
    if len(vertices) < 3:
        return None
    acceleration = vertices[2:] - 2 * vertices[1:-1] + vertices[:-2]
    return float(1000 * np.linalg.norm(acceleration, axis=-1).mean())


def build_report(result: RegistrationResult, scans: ScanSequence, model, posed: np.ndarray | None = None) -> dict:
    """The content of `report.json` (see the module docstring). `posed`: (T, V, 3) posed vertices in scan
    coordinates if already computed (`result.posed_vertices(model)`)."""
    if posed is None:
        posed = result.posed_vertices(model)
    faces = np.asarray(model.faces)
    # Scan coordinates are metres x `scale` (scale is 1 unless the units were unknown and solved).
    to_mm = 1000.0 / result.scale
    frames = []
    bad, retried = set(result.bad_frames) | set(scans.bad_frames), set(result.retried_frames)
    for t in range(result.num_frames):
        entry = {"index": t, "name": scans.names[t], "points": int(len(scans.points[t])), "bad": t in bad, "retried": t in retried}
        if len(scans.points[t]):
            entry.update(frame_statistics(to_mm * scan_to_mesh_distance(scans.points[t], posed[t], faces)))
        else:
            entry.update({"median_mm": None, "mean_mm": None, "p90_mm": None, "within_2mm": None})
        frames.append(entry)
    good = [f for f in frames if f["median_mm"] is not None]
    summary = {
        key: float(np.mean([f[key] for f in good])) if good else None
        for key in ("median_mm", "mean_mm", "p90_mm", "within_2mm")
    }
    summary["worst_frame_median_mm"] = max((f["median_mm"] for f in good), default=None)
    summary["jitter_mm_per_frame2"] = None if result.unordered else jitter_mm(posed / result.scale)
    return {
        "format": REPORT_FORMAT,
        "model": result.model_name,
        "side": result.side,
        "num_frames": result.num_frames,
        "unordered": bool(result.unordered),
        "input_units": scans.units,
        "input_unit_scale": scans.unit_scale,
        "scale": float(result.scale),
        "summary": summary,
        "frames": frames,
        "bad_frames": sorted(int(i) for i in bad),
        "retried_frames": sorted(int(i) for i in retried),
        "keyframes": [int(i) for i in result.keyframes],
        "stage_times": {k: float(v) for k, v in result.stage_times.items()},
    }


def write_json(path: str | os.PathLike, content) -> None:
    """Write `content` as indented strict JSON (no NaN), atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(content, indent=2, allow_nan=False) + "\n")


def write_outputs(
    result: RegistrationResult,
    scans: ScanSequence,
    model,
    out_dir: str | os.PathLike,
    *,
    mesh_format: str = "ply",
    extra_report: dict | None = None,
) -> dict:
    """Write meshes/, template.ply, report.json and preview.png for `result` into `out_dir`; return the report.

    `mesh_format`: "ply" or "obj" for the per-frame meshes. `extra_report`: entries merged into the report
    (e.g. the demo's error against ground truth). `params.npz` is written by `save_result`.
    """
    from mano_jax import export_mesh

    if mesh_format not in ("ply", "obj"):
        raise ValueError(f"mesh_format must be 'ply' or 'obj', got {mesh_format!r}")
    if scans.num_frames != result.num_frames:
        raise ValueError(f"the result has {result.num_frames} frames but the scans have {scans.num_frames}")
    out_dir = Path(out_dir)
    posed = result.posed_vertices(model)
    if not np.isfinite(posed).all():
        raise FloatingPointError("the registration result poses to non-finite vertices; refusing to write meshes")
    faces = np.asarray(model.faces)
    to_file_units = 1.0 / scans.unit_scale
    for t in range(result.num_frames):
        export_mesh(out_dir / "meshes" / f"frame_{t:04d}.{mesh_format}", to_file_units * posed[t], faces)
    export_mesh(out_dir / "template.ply", result.template_vertices(model), faces)
    report = build_report(result, scans, model, posed)
    report["mesh_units"] = "input"
    if extra_report:
        report.update(extra_report)
    write_json(out_dir / "report.json", report)
    write_preview(out_dir / "preview.png", report, scans, posed, faces)
    return report


def write_preview(path, report: dict, scans: ScanSequence, posed: np.ndarray, faces: np.ndarray) -> None:
    """`preview.png`: first, middle and last frames (mesh + scan points) and the residual per frame."""
    # A bare Figure needs no pyplot backend, so a notebook's inline plots keep working afterwards.
    from matplotlib.figure import Figure

    t_total = len(posed)
    shown = sorted({0, t_total // 2, t_total - 1})
    fig = Figure(figsize=(4.0 * len(shown), 8.0))
    for k, t in enumerate(shown):
        ax = fig.add_subplot(2, len(shown), k + 1)
        draw_frame(ax, posed[t], faces, scans.points[t])
        median = report["frames"][t]["median_mm"]
        ax.set_title(f"frame {t}" + ("" if median is None else f": median {median:.2f} mm"), fontsize=10)
    ax = fig.add_subplot(2, 1, 2)
    plot_residuals(ax, report)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.95, bottom=0.07, wspace=0.05, hspace=0.15)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def draw_frame(ax, vertices: np.ndarray, faces: np.ndarray, points: np.ndarray, *, max_points: int = 3000) -> None:
    """Draw a posed mesh and a thinned sample of its scan points (red) on a 2D axis, seen from the side
    (+z or -z) where most scan points are, i.e. the side a single-view scanner saw."""
    from mano_jax.viz import plot_mesh

    points = points[:: max(1, len(points) // max_points)]
    # plot_mesh's default view has the viewer on +z; (180, 180) turns it about y to the -z side.
    seen_from_minus_z = len(points) and np.median(points[:, 2]) < vertices[:, 2].mean()
    view = (180.0, 180.0) if seen_from_minus_z else (0.0, 0.0)
    plot_mesh(ax, vertices, faces, view=view, points=points, point_color="tab:red", point_size=0.6)


def plot_residuals(ax, report: dict) -> None:
    """Median and 90th-percentile scan-to-model distance per frame (mm); bad/retried frames marked."""
    frames = report["frames"]
    idx = np.array([f["index"] for f in frames])
    for key, label in (("median_mm", "median"), ("p90_mm", "90th percentile")):
        values = np.array([np.nan if f[key] is None else f[key] for f in frames])
        ax.plot(idx, values, marker=".", label=label)
    for f in frames:
        if f["bad"]:
            ax.axvline(f["index"], color="tab:red", alpha=0.3, lw=3)
        elif f["retried"]:
            ax.axvline(f["index"], color="tab:orange", alpha=0.3, lw=3)
    ax.set_xlabel("frame")
    ax.set_ylabel("scan-to-model distance (mm)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    ax.set_title("residual per frame (red: bad frame, orange: retried)", fontsize=10)


def register_to_directory(
    scans: ScanSequence,
    out_dir: str | os.PathLike,
    *,
    model=None,
    config=None,
    mesh_format: str = "ply",
    progress: bool = True,
    extra_report=None,
) -> tuple[RegistrationResult, dict]:
    """Register `scans` and write the whole output directory (see the module docstring); resumable.

    Re-running with the same output directory resumes from the checkpoints of the stages already done.
    `extra_report`: a dict, or a function of the result returning one, merged into the report.
    Returns the result and the report.
    """
    from mano_jax import load_model

    from .pipeline import register_sequence

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = load_model("open-left" if config is not None and config.side == "left" else "open-right")
    started = time.perf_counter()
    result = register_sequence(scans, model, config, checkpoint_dir=out_dir / "checkpoints", progress=progress)
    save_result(result, out_dir / "params.npz")
    if callable(extra_report):
        extra_report = extra_report(result)
    report = write_outputs(result, scans, model, out_dir, mesh_format=mesh_format, extra_report=extra_report)
    write_json(
        out_dir / "done.json",
        {"seconds": time.perf_counter() - started, "frames": result.num_frames, "summary": report["summary"]},
    )
    return result, report
