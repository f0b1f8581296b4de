"""Command-line interface of the registration package: `mano-jax register`, `register-many` and `demo`.

`add_commands(subparsers)` adds the three subcommands to `mano-jax`'s argparse program. Each handler returns
the process exit code: 0 on success, 2 for a user error (bad input, model, manifest or configuration),
printed as one line on stderr without a traceback, 130 when interrupted (re-run the same command to resume).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import warnings
from pathlib import Path

from .scans import ScanError


class UsageError(ValueError):
    """A command-line argument or configuration file that cannot be used."""


def add_commands(subparsers) -> None:
    """Add `register`, `register-many` and `demo` to `mano-jax`'s subparsers (handlers in `func`)."""
    p = subparsers.add_parser(
        "register",
        help="register the hand model to a sequence of scans",
        description="Register the hand model to a sequence of scans of one hand (a directory of PLY/OBJ/STL/"
        ".npy/.xyz frames in natural order, or one .npz). Writes params.npz, meshes/, template.ply, "
        "report.json and preview.png into --out; re-running the same command resumes.",
    )
    p.add_argument("input", help="directory of scan frames, one .npz sequence, or one scan file")
    p.add_argument("--out", required=True, help="output directory")
    _add_common(p)
    p.add_argument("--keypoints", help="per-frame 3D keypoints (T,21,3) .npy/.npz/.json, in the scans' units")
    p.add_argument("--keypoint-order", choices=("mano", "openpose"), default="mano", help="order of --keypoints")
    _add_cache(p)
    p.set_defaults(func=_cmd_register)

    p = subparsers.add_parser(
        "register-many",
        help="register many scan sequences (local process pool or Ray)",
        description="Register every sequence listed in MANIFEST, one task per sequence, into OUT/<name>/. "
        "Finished tasks are skipped when the command is run again; failed tasks are retried. "
        "Manifest: a text file with one input per line ('path' or 'name<TAB>path'; '#' comments; relative "
        "paths are relative to the manifest) or a JSON list of objects (see registration.many).",
    )
    p.add_argument("manifest", help="manifest file (.txt or .json)")
    p.add_argument("--out", required=True, help="output directory (one subdirectory per sequence)")
    _add_common(p)
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="where tasks run (default: local)")
    p.add_argument("--workers", type=int, default=None, help="parallel local workers (default: CPU cores / 2)")
    p.add_argument("--retries", type=int, default=2, help="extra attempts for a task that fails (default: 2)")
    p.add_argument("--jax-cache", help="persistent JAX compilation cache directory (default: OUT/.jax_cache)")
    p.set_defaults(func=_cmd_register_many)

    p = subparsers.add_parser(
        "demo",
        help="synthesise a scan sequence with known truth, register it, report the error",
        description="Synthesise a sequence from the model (smooth known motion and shape, single-view "
        "partial scans with 1 mm noise and 5%% outliers, a forearm), register it, write all outputs and print "
        "the error against the ground truth.",
    )
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--frames", type=int, default=60, help="number of frames (default: 60)")
    p.add_argument("--points", type=int, default=5000, help="points per scan (default: 5000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic subject and motion")
    p.add_argument("--model", help="model: bundled name or path (default: the open right hand)")
    p.add_argument("--config", help="JSON file overriding RegistrationConfig fields")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_cache(p)
    p.set_defaults(func=_cmd_demo)


def _add_common(p) -> None:
    p.add_argument("--model", help="model: bundled name ('open-right', 'open-left'), MANO .pkl or mano-jax .npz")
    p.add_argument("--side", choices=("right", "left"), help="hand side (default: right, or the model file's)")
    p.add_argument("--units", choices=("auto", "m", "mm"), default="auto", help="units of the scans (default: auto)")
    p.add_argument("--skip-bad-frames", action="store_true", help="warn and bridge bad frames instead of stopping")
    p.add_argument("--unordered", action="store_true", help="frames are an unordered set of poses of one subject")
    p.add_argument("--format", choices=("ply", "obj"), default="ply", help="per-frame mesh format (default: ply)")
    p.add_argument("--config", help="JSON file overriding RegistrationConfig fields")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_cache(p) -> None:
    p.add_argument(
        "--jax-cache",
        help="persistent JAX compilation cache directory, so a later run does not compile again; 'none' to "
        "disable (default: $MANO_JAX_CACHE, else the user's cache folder, e.g. ~/.cache/mano-jax/jax)",
    )


def default_cache_dir() -> Path:
    """Where `register` and `demo` keep compiled programs: $MANO_JAX_CACHE, else $XDG_CACHE_HOME/mano-jax/jax,
    else ~/.cache/mano-jax/jax."""
    if os.environ.get("MANO_JAX_CACHE"):
        return Path(os.environ["MANO_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mano-jax" / "jax"


def _use_cache(choice: str | None) -> None:
    from . import many

    if choice == "none":
        return
    folder = Path(choice) if choice else default_cache_dir()
    try:
        many.enable_compilation_cache(folder)
    except OSError as e:  # a read-only home only costs the compile time
        warnings.warn(f"{folder}: cannot keep compiled programs there ({e.strerror or e}); compiling afresh")


def load_config(path: str | None, **overrides):
    """A `RegistrationConfig` from defaults, a JSON object of field overrides in `path`, then `overrides`."""
    from .config import RegistrationConfig

    fields = {f.name for f in dataclasses.fields(RegistrationConfig)}
    values = {}
    if path is not None:
        try:
            values = json.loads(Path(path).read_text())
        except OSError as e:
            raise UsageError(f"{path}: cannot read the configuration file ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise UsageError(f"{path}: expected a JSON object of RegistrationConfig fields")
        unknown = sorted(set(values) - fields)
        if unknown:
            raise UsageError(f"{path}: unknown RegistrationConfig field(s): {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RegistrationConfig(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path or 'configuration'}: {e}") from None


def load_model_for(model: str | None, side: str | None):
    """The model named on the command line; the bundled open hand of `side` by default."""
    from mano_jax import load_model

    if model is None:
        return load_model("open-left" if side == "left" else "open-right")
    return load_model(model, side=side)


def _guarded(command: str):
    """Decorate a handler: the project's own errors become one line on stderr and exit code 2, Ctrl-C 130."""

    def wrap(handler):
        @functools.wraps(handler)
        def run(args) -> int:
            from mano_jax.io import ManoFileError

            from .many import ManifestError
            from .pipeline import RegistrationError

            plain = warnings.formatwarning
            # Warnings (a skipped bad frame, dropped points) read as one line, like the errors.
            warnings.formatwarning = lambda message, *_, **__: f"mano-jax {command}: warning: {message}\n"
            try:
                return handler(args)
            except (ScanError, ManoFileError, ManifestError, UsageError, RegistrationError) as e:
                print(f"mano-jax {command}: error: {e}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(
                    f"\nmano-jax {command}: interrupted (finished stages are kept in {args.out}); "
                    "run the same command again to resume",
                    file=sys.stderr,
                )
                return 130
            finally:
                warnings.formatwarning = plain

        return run

    return wrap


@_guarded("register")
def _cmd_register(args) -> int:
    from .outputs import register_to_directory
    from .scans import load_scans

    config = load_config(args.config, unordered=True if args.unordered else None)
    model = load_model_for(args.model, args.side)
    _use_cache(args.jax_cache)
    scans = load_scans(
        args.input,
        units=args.units,
        skip_bad_frames=args.skip_bad_frames,
        keypoints=args.keypoints,
        keypoint_order=args.keypoint_order,
        unordered=args.unordered,
    )
    _say(f"{scans.num_frames} frames from {args.input} (units: {scans.units}"
         + (f", bad frames: {list(scans.bad_frames)}" if scans.bad_frames else "") + ")")
    result, report = register_to_directory(
        scans, args.out, model=model, config=config, mesh_format=args.format, progress=not args.quiet
    )
    _print_summary(result, report, args.out)
    return 0


@_guarded("register-many")
def _cmd_register_many(args) -> int:
    from .many import read_manifest, run_many

    config = load_config(args.config)
    tasks = read_manifest(args.manifest)
    summary = run_many(
        tasks,
        args.out,
        executor=args.executor,
        workers=args.workers,
        retries=args.retries,
        model=args.model,
        side=args.side,
        units=args.units,
        skip_bad_frames=args.skip_bad_frames,
        unordered=args.unordered,
        mesh_format=args.format,
        config=config.to_dict(),
        cache_dir=args.jax_cache,
        progress=not args.quiet,
    )
    counts = summary["counts"]
    _say(f"{counts.get('done', 0)} done, {counts.get('skipped', 0)} already done, "
         f"{counts.get('failed', 0)} failed; summary: {Path(args.out) / 'summary.json'}")
    return 1 if counts.get("failed", 0) else 0


@_guarded("demo")
def _cmd_demo(args) -> int:
    import numpy as np

    from .outputs import register_to_directory, write_json
    from .scans import save_scans
    from .synthetic import make_sequence

    if args.frames < 3 or args.points < 200:
        raise UsageError(f"--frames must be >= 3 and --points >= 200, got {args.frames}, {args.points}")
    config = load_config(args.config)
    model = load_model_for(args.model, None)
    _use_cache(args.jax_cache)
    out = Path(args.out)
    _say(f"synthesising {args.frames} frames of {args.points} points (partial view, 1 mm noise, 5% outliers, forearm)")
    scans, truth = make_sequence(model, num_frames=args.frames, points_per_frame=args.points, seed=args.seed)
    save_scans(out / "scans.npz", scans)
    truth.save(out / "ground_truth.npz")
    truth_template = truth.to_result(model).template_vertices(model)

    def truth_errors(result):
        posed = result.posed_vertices(model) / result.scale
        per_vertex = 1000 * np.linalg.norm(posed - truth.vertices / truth.scale, axis=-1)
        template = 1000 * np.linalg.norm(result.template_vertices(model) - truth_template, axis=-1)
        return {
            "ground_truth": {
                "mean_vertex_error_mm": float(per_vertex.mean()),
                "median_vertex_error_mm": float(np.median(per_vertex)),
                "max_frame_mean_vertex_error_mm": float(per_vertex.mean(axis=1).max()),
                "template_mean_vertex_error_mm": float(template.mean()),
            }
        }

    result, report = register_to_directory(
        scans, out, model=model, config=config, progress=not args.quiet, extra_report=truth_errors
    )
    _print_summary(result, report, out)
    gt = report["ground_truth"]
    _say(f"error vs ground truth: mean per-vertex {gt['mean_vertex_error_mm']:.2f} mm "
         f"(median {gt['median_vertex_error_mm']:.2f} mm, worst frame {gt['max_frame_mean_vertex_error_mm']:.2f} mm), "
         f"template {gt['template_mean_vertex_error_mm']:.2f} mm")
    write_json(out / "demo.json", {"frames": args.frames, "points": args.points, "seed": args.seed, **gt})
    return 0


def _print_summary(result, report, out) -> None:
    times = ", ".join(f"{k} {v:.1f} s" for k, v in result.stage_times.items())
    s = report["summary"]
    _say(f"stage times: {times}")
    if s["median_mm"] is not None:
        jitter = s["jitter_mm_per_frame2"]
        _say(
            f"scan-to-model distance: median {s['median_mm']:.2f} mm, mean {s['mean_mm']:.2f} mm, "
            f"p90 {s['p90_mm']:.2f} mm, {100 * s['within_2mm']:.1f}% of points within 2 mm"
            + ("" if jitter is None else f"; jitter {jitter:.3f} mm/frame^2")
        )
    if report["input_units"] == "unknown":
        unit = 1000.0 * report["input_unit_scale"] / result.scale
        _say(f"units were unknown: solved scale {result.scale:.4g} (one input unit = {unit:.4g} mm)")
    if report["bad_frames"] or report["retried_frames"]:
        _say(f"bad frames: {report['bad_frames']}, retried frames: {report['retried_frames']}")
    _say(f"outputs in {out}")


def _say(message: str) -> None:
    print(message, flush=True)
