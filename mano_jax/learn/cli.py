"""`mano-jax learn`: learn a hand model from registrations (see `mano_jax.learn.trainer`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .trainer import LearnConfig


def add_commands(subparsers) -> None:
    """Add the `learn` subcommand to an argparse subparsers object; it sets `func` to its runner."""
    defaults = LearnConfig()
    p = subparsers.add_parser(
        "learn",
        help="learn a MANO-style hand model (pose blend shapes, shape and pose spaces) from registrations",
        description=(
            "Learn pose blend shapes (localised by a geodesic cost matrix), a shape space (PCA of the "
            "per-hand templates) and a pose space (PCA of the fitted poses) from registered meshes in "
            "the starting model's topology. Left hands are mirrored into the right-hand training set; "
            "the left model is the mirror of the learned right one. Lengths are metres."
        ),
    )
    p.add_argument("registrations", nargs="+", type=Path,
                   help="registrations: .npz files (vertices (N,V,3) metres, optional subject (N,), "
                        "is_left (N,)) and/or `mano-jax register` output directories (or folders of them)")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="where to write the learned right-hand model (.npz)")
    p.add_argument("--out-left", type=Path, default=None,
                   help="where to write the mirrored left-hand model (default: OUT with _left before .npz)")
    p.add_argument("--init", default=None,
                   help="starting model: a bundled name, a MANO .pkl or a mano-jax .npz (default: the open hand)")
    p.add_argument("--report", type=Path, default=None, help="report JSON (default: OUT with .report.json)")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="save the state after every iteration here and resume from it when re-run")
    p.add_argument("--iterations", type=int, default=defaults.iterations)
    p.add_argument("--num-betas", type=int, default=defaults.num_betas)
    p.add_argument("--no-locality", action="store_true", help="no geodesic cost matrix (ridge only)")
    p.add_argument("--locality-radius", type=float, default=defaults.locality_radius,
                   help="metres from a joint's skin ring within which its corrective is free")
    p.add_argument("--flat-sigma", type=float, default=defaults.flat_sigma,
                   help="radians; down-weighting of posed registrations in the first templates")
    p.add_argument("--refine-weights", action="store_true",
                   help="also re-fit the skinning weights (non-negative, rows sum to 1, near the starting ones)")
    p.add_argument("--refine-regressor", action="store_true",
                   help="also re-fit the joint regressor (non-negative, rows sum to 1, the starting support), "
                        "from per-hand joints solved with the templates")
    p.add_argument("--weights-ridge", type=float, default=defaults.weights_ridge,
                   help="pull of the refined weights towards the starting ones (relative to the data)")
    p.add_argument("--regressor-ridge", type=float, default=defaults.regressor_ridge,
                   help="pull of the refined regressor rows towards the starting ones (relative to the data)")
    p.add_argument("--chunk-size", type=int, default=defaults.chunk_size)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_learn)


def _left_path(out: Path) -> Path:
    return out.with_name(out.stem + "_left" + (out.suffix or ".npz"))


def run_learn(args: argparse.Namespace) -> int:
    import jax

    # Learning solves normal equations of thousands of registrations: float64 throughout.
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from .. import io
    from .._atomic import atomic_path
    from ..cli import UserError
    from .data import load_registrations
    from .trainer import learn

    for name in ("iterations", "num_betas", "chunk_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("weights_ridge", "regressor_ridge"):
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    try:
        init = io.load_model(args.init, dtype=jnp.float64)
        regs = load_registrations(args.registrations)
        config = LearnConfig(
            iterations=args.iterations, num_betas=args.num_betas, locality=not args.no_locality,
            locality_radius=args.locality_radius, flat_sigma=args.flat_sigma, chunk_size=args.chunk_size,
            refine_weights=args.refine_weights, refine_regressor=args.refine_regressor,
            weights_ridge=args.weights_ridge, regressor_ridge=args.regressor_ridge,
        )  # fmt: skip
        result = learn(regs, init, config, checkpoint_dir=args.checkpoint_dir, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    io.save_model(result.model, args.out)
    left = args.out_left or _left_path(args.out)
    io.save_model(result.left_model, left)
    report_path = args.report or args.out.with_suffix(".report.json")
    with atomic_path(report_path) as tmp:
        tmp.write_text(json.dumps(result.report, indent=1))
    rep = result.report
    print(f"learned from {rep['registrations']} registrations of {rep['hands']} hands in {rep['seconds']:.1f} s")
    print(f"  data error (RMS vertex, mm) per iteration: "
          + ", ".join(f"{h['fit_rms_mm_mean']:.3f}" for h in rep["iterations"])
          + f"; final {rep['final_fit_rms_mm']['mean']:.3f}")  # fmt: skip
    pose = rep["pose_variance_explained"]
    print(f"  pose variance explained by 1/3/6/10 components: "
          + ", ".join(f"{pose[k - 1]:.3f}" for k in (1, 3, 6, 10)))  # fmt: skip
    if rep["shape_variance_explained"]:
        shape = rep["shape_variance_explained"]
        print(f"  shape variance explained by 1..{min(5, len(shape))} components: "
              + ", ".join(f"{x:.3f}" for x in shape[:5]))  # fmt: skip
    leak = [x for x in rep["locality"]["leakage_per_joint"] if x is not None]
    if leak:
        radius = rep["locality"]["radius_m"]
        print(f"  locality: max fraction of a joint's corrective beyond {radius} m: {max(leak):.4f}")
    print(f"wrote {args.out}, {left}, {report_path}")
    return 0
