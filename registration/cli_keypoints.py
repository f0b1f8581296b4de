"""`mano-jax fit-keypoints`: fit the hand model to a file of 2D or 3D keypoints.

`add_commands(subparsers)` adds the subcommand to `mano-jax`'s argparse program. The handler returns the
exit code: 0 on success, 2 for a user error (bad keypoints, camera, model or option), printed as one line on
stderr without a traceback.
"""

from __future__ import annotations

import sys


def add_commands(subparsers) -> None:
    """Add `fit-keypoints` to `mano-jax`'s subparsers (handler in `func`)."""
    from mano_jax.cli import _add_model_args

    p = subparsers.add_parser(
        "fit-keypoints",
        help="fit the hand model to 2D or 3D keypoints (one frame or a sequence)",
        description="Fit the hand model to keypoints: 3D keypoints (T,21,3) in metres, or 2D pixel keypoints "
        "(T,21,2) seen through a camera. KEYPOINTS is a .npy, a .npz (arrays 'keypoints', 'confidence'), a "
        ".json (a nested list, {'keypoints': ..., 'confidence': ...}, or OpenPose output), or a directory "
        "with one OpenPose .json / .npy per frame. Writes params.npz, meshes/, keypoints.npz, report.json, "
        "preview.png (and camera.json for 2D) into --out.",
    )
    p.add_argument("keypoints", help="keypoint file or directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--camera", help="camera JSON for 2D keypoints: {fx, fy, cx, cy[, R, t]} or "
                   '{"type": "weak-perspective"}')  # fmt: skip
    p.add_argument("--weak-perspective", action="store_true", help="2D keypoints with a weak-perspective camera "
                   "(scale and offset solved); instead of --camera")  # fmt: skip
    p.add_argument("--order", choices=("openpose", "mano"), default="openpose",
                   help="keypoint order: openpose (also MediaPipe, FreiHAND; default) or mano")  # fmt: skip
    p.add_argument("--units", choices=("m", "cm", "mm"), default="m", help="units of 3D keypoints (default m)")
    p.add_argument("--with-confidence", action="store_true",
                   help="the last column of the keypoint array is a confidence, e.g. (x, y, c)")  # fmt: skip
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="ignore keypoints with a lower confidence (default 0)")  # fmt: skip
    p.add_argument("--no-smooth", action="store_true", help="a sequence without temporal smoothing")
    p.add_argument("--noise", type=float, default=None,
                   help="expected keypoint noise (metres for 3D, pixels for 2D; default 0.005 / 2)")  # fmt: skip
    p.add_argument("--mesh-format", choices=("ply", "obj"), default="ply", help="per-frame mesh format")
    _add_model_args(p)
    p.set_defaults(func=_cmd_fit_keypoints)


def _cmd_fit_keypoints(args) -> int:
    from mano_jax.cli import load_cli_model
    from mano_jax.io import ManoFileError

    from .camera import WEAK_PERSPECTIVE, CameraError, load_camera
    from .keypoints import KeypointFitConfig, KeypointFitError, fit_keypoints, load_keypoints, write_outputs

    try:
        if args.camera and args.weak_perspective:
            raise KeypointFitError("give either --camera or --weak-perspective, not both")
        model = load_cli_model(args)
        keypoints, confidence = load_keypoints(args.keypoints, side=model.side, with_confidence=args.with_confidence)
        camera = WEAK_PERSPECTIVE if args.weak_perspective else (load_camera(args.camera) if args.camera else None)
        if keypoints.shape[-1] == 3:
            if camera is not None:
                raise KeypointFitError(
                    f"{args.keypoints}: 3D keypoints need no camera (drop --camera/--weak-perspective)"
                )
            keypoints = keypoints * {"m": 1.0, "cm": 0.01, "mm": 0.001}[args.units]
        elif camera is None:
            raise KeypointFitError(f"{args.keypoints}: 2D keypoints need --camera FILE or --weak-perspective")
        if confidence is not None and args.min_confidence > 0:
            confidence = confidence * (confidence >= args.min_confidence)
        noise = {} if args.noise is None else {("sigma_3d" if keypoints.shape[-1] == 3 else "sigma_2d"): args.noise}
        config = KeypointFitConfig(order=args.order, smooth=not args.no_smooth, **noise)
        result = fit_keypoints(keypoints, confidence=confidence, camera=camera, model=model, config=config)
        report = write_outputs(result, args.out, model, keypoints, confidence, camera, mesh_format=args.mesh_format)
    except (KeypointFitError, CameraError, ManoFileError) as e:
        print(f"mano-jax fit-keypoints: error: {e}", file=sys.stderr)
        return 2
    unit = report["error_unit"]
    summary = report["summary"]
    print(f"fitted {report['num_frames']} frame(s) ({report['camera']} camera) -> {args.out}: mean keypoint error "
          f"{summary[f'mean_error_{unit}']:.2f} {unit}, worst frame {summary[f'worst_frame_error_{unit}']:.2f} {unit}, "
          f"{summary['limit_violations']} joint-limit violations, {result.stage_times['total']:.1f} s")  # fmt: skip
    return 0
