"""The `mano-jax` command line: model information and posing here; registration, keypoint fitting and
learning add their own subcommands through `add_commands(subparsers)` in their modules.

User errors (a bad file, a bad argument) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np

# Modules that contribute subcommands, each with `add_commands(subparsers)`.
_COMMAND_MODULES = ("registration.cli", "registration.cli_keypoints", "mano_jax.learn.cli")


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None,
        help="bundled model name (open-right, open-left) or path to MANO_*.pkl / mano-jax .npz "
        "(default: the bundled open right hand)",
    )  # fmt: skip
    parser.add_argument("--side", choices=("right", "left"), default=None, help="override the side")


def load_cli_model(args, dtype=None):
    """The model named by --model/--side (shared by every subcommand that takes them)."""
    import jax.numpy as jnp

    from .io import load_model

    source = args.model
    if source is None and args.side == "left":
        source = "open-left"
    return load_model(source, side=args.side, dtype=dtype or jnp.float32)


def _cmd_info(args) -> None:
    model = load_cli_model(args)
    arrays = model.numpy()
    info = {
        "name": model.name,
        "side": model.side,
        "vertices": model.num_vertices,
        "faces": int(arrays["faces"].shape[0]),
        "joints": len(model.parents),
        "shape_components": model.num_betas,
        "pose_blend_shapes": "zero" if not np.any(arrays["posedirs"]) else "learned",
        "pose_pca_components": int(arrays["hands_components"].shape[0]),
        "pose_pca_variance_top6": float(arrays["hands_var"][:6].sum() / arrays["hands_var"].sum()),
        "fingertip_vertex_ids": list(model.tip_ids),
        "hand_length_m": float(np.ptp(arrays["v_template"], axis=0).max()),
        "units": "metres",
        "provenance": model.provenance,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


def _floats(text: str, name: str, size: int | None = None) -> np.ndarray:
    try:
        values = np.array([float(t) for t in text.replace(",", " ").split()])
    except ValueError:
        raise UserError(f"--{name}: expected numbers separated by spaces or commas, got {text!r}") from None
    if size is not None and values.size != size:
        raise UserError(f"--{name}: expected {size} numbers, got {values.size}")
    return values


def _hand_pose_from(arg: str, model) -> np.ndarray:
    """--pose: 'flat', 'mean', or a .npy/.json/.txt file with 45 (hand) or 48 (global + hand) values."""
    if arg == "flat":
        return np.zeros(45)
    if arg == "mean":
        return np.asarray(model.hands_mean, dtype=np.float64)
    path = Path(arg)
    if not path.is_file():
        raise UserError(f"--pose: {arg!r} is neither 'flat', 'mean' nor an existing file")
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            values = np.asarray(json.loads(path.read_text()), dtype=np.float64)
        else:
            values = np.loadtxt(path)
    except (ValueError, OSError) as err:
        raise UserError(f"--pose: cannot read {arg}: {err}") from None
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size not in (45, 48) or not np.isfinite(values).all():
        raise UserError(f"--pose: {arg} must hold 45 or 48 finite axis-angle values, got {values.size}")
    return values


def _cmd_pose(args) -> None:
    from .mesh import export_mesh
    from .posing import forward

    model = load_cli_model(args)
    global_orient = _floats(args.global_orient, "global-orient", 3) if args.global_orient else np.zeros(3)
    if args.pca:
        hand_pose = _floats(args.pca, "pca")
        if not 1 <= hand_pose.size <= 45:
            raise UserError(f"--pca: expected 1 to 45 coefficients, got {hand_pose.size}")
        pose_space = "pca"
    else:
        hand_pose = _hand_pose_from(args.pose, model)
        if hand_pose.size == 48:
            global_orient, hand_pose = hand_pose[:3], hand_pose[3:]
        pose_space = "axis_angle"
    betas = _floats(args.betas, "betas") if args.betas else None
    if betas is not None and not 1 <= betas.size <= model.num_betas:
        raise UserError(f"--betas: the model has {model.num_betas} shape components, got {betas.size}")
    out = forward(
        model,
        hand_pose=hand_pose,
        betas=betas,
        global_orient=global_orient,
        transl=_floats(args.transl, "transl", 3) if args.transl else None,
        pose_space=pose_space,
        flat_hand_mean=not args.relative_to_mean,
    )
    export_mesh(args.out, np.asarray(out.vertices), np.asarray(model.faces), close_wrist=args.close_wrist)
    print(f"wrote {args.out} ({model.name}, {model.num_vertices} vertices, metres)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mano-jax", description="The MANO hand model in JAX (all lengths in metres)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="print a model's sizes, side, components and provenance")
    p.add_argument("model", nargs="?", default=None, help="bundled name or file (default: open-right)")
    p.add_argument("--side", choices=("right", "left"), default=None, help="override the side")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("pose", help="write a posed, shaped mesh (PLY/OBJ/GLB/STL)")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output mesh file; format from the suffix")
    p.add_argument("--pose", default="flat", help="flat | mean | file with 45 or 48 axis-angle values")
    p.add_argument("--pca", default=None, help="PCA coefficients instead of --pose, e.g. '1.5 -0.5 0.3'")
    p.add_argument("--relative-to-mean", action="store_true", help="add the mean pose (smplx's default)")
    p.add_argument("--betas", default=None, help="shape coefficients, e.g. '1 0 -0.5'")
    p.add_argument("--global-orient", default=None, help="axis-angle of the whole hand about the wrist")
    p.add_argument("--transl", default=None, help="translation in metres")
    p.add_argument("--close-wrist", action="store_true", help="cap the wrist so the mesh is watertight")
    p.set_defaults(func=_cmd_pose)

    for module in _COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv=None) -> int:
    from .io import ManoFileError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (UserError, ManoFileError) as err:
        print(f"mano-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
