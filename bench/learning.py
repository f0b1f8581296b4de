"""Learning benchmark: recover a planted hand model from synthetic registrations.

Ground truth: the default open hand with planted local pose correctives (rigid-free bumps around the
joints), `--subjects` hands drawn from its first 4 shape directions, poses from 6 planted synergies plus
0.05 rad jitter, random global pose, 0.5 mm noise. A random 10% of the registrations is held out.

Reports (printed and written to bench/results/learning.json):
- corrective error: |(P_learned - P_true) f| / |P_true f| over the held-out poses f (the part of P the
  poses excite) and the plain Frobenius error |P_learned - P_true| / |P_true|; and the corrective error
  of the same closed-form solve given the planted poses and templates (the floor the noise sets);
- held-out RMS vertex error of the learned model vs the same learning without pose blend shapes, both
  against the noisy registrations and against their noise-free meshes (the model's own error: the
  reduction is computed from this one, since 0.5 mm of noise is a floor no model can go below);
- locality: fraction of each joint's corrective energy beyond the planted radius, with and without
  the cost matrix;
- principal angles between learned and planted pose (6-D) and shape (4-D) subspaces;
- mirror equivalence: a model learned from the mirrored (left) copies of a subset vs from the originals;
- wall-clock time of learning.

    PYTHONPATH=. .venv/bin/python bench/learning.py            # 20 hands x 100 = 2,000 registrations
    PYTHONPATH=. .venv/bin/python bench/learning.py --quick    # 8 x 40
    PYTHONPATH=. .venv/bin/python bench/learning.py --refine --quick   # weight / regressor refinement

`--refine` measures only the optional refinement of skinning weights and joint regressor: the
registrations are made as above (with the open hand's weights and regressor, the planted ones), but
learning starts from the open hand with its weights, its regressor, or both perturbed
(`synthetic.perturb_skinning`: every nonzero entry times a log-normal factor, rows renormalised), and
runs without and with the matching flags. It reports the weight error (mean L1 per row), the
regressed-joint error (mm, on the true templates) and the held-out model error (mm). Written to
bench/results/learning_refine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mano_jax import io, lbs  # noqa: E402
from mano_jax._atomic import atomic_path  # noqa: E402
from mano_jax.learn.blendshapes import pose_features, solve_posedirs  # noqa: E402
from mano_jax.learn.data import Registrations  # noqa: E402
from mano_jax.learn.evaluate import fit_error, principal_angles  # noqa: E402
from mano_jax.learn.locality import cost_matrix, leakage  # noqa: E402
from mano_jax.learn.pose_fit import Poses  # noqa: E402
from mano_jax.learn.pose_space import pose_pca  # noqa: E402
from mano_jax.learn.synthetic import make_dataset, perturb_skinning, skinning_errors  # noqa: E402
from mano_jax.learn.templates import unpose  # noqa: E402
from mano_jax.learn.trainer import LearnConfig, learn  # noqa: E402


def held_out_error(result, held: Registrations, clean=None) -> np.ndarray:
    """(N,) RMS vertex error (m) of held-out registrations of training hands under a learned model,
    against the registrations or, with `clean`, against their noise-free meshes."""
    keys, index = held.template_keys()
    lookup = {k: i for i, k in enumerate(result.hand_keys)}
    hands = np.array([lookup[k] for k in keys])[index]
    return fit_error(result.model, result.templates, hands, held.to_right(), reference=clean)


def corrective_error(posedirs, truth_posedirs, features) -> float:
    learned = np.einsum("nf,vcf->nvc", features, np.asarray(posedirs))
    planted = np.einsum("nf,vcf->nvc", features, np.asarray(truth_posedirs))
    return float(np.linalg.norm(learned - planted) / np.linalg.norm(planted))


def mirrored(regs: Registrations) -> Registrations:
    """The same hands as left hands: vertices reflected across x = 0, flagged left."""
    return Registrations(regs.vertices * np.array([-1.0, 1.0, 1.0]), regs.subject, ~regs.is_left, regs.names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--per-subject", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="8 hands x 40 registrations")
    parser.add_argument("--mirror-subset", type=int, default=300, help="registrations used for the mirror check")
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/learning.json (learning_refine.json with --refine)")
    parser.add_argument("--refine", action="store_true", help="measure weight / regressor refinement only")
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects, args.per_subject, args.mirror_subset = 8, 40, 120
    if args.out is None:
        args.out = Path(__file__).parent / "results" / ("learning_refine.json" if args.refine else "learning.json")
    if args.refine:
        return refine(args)

    load_start = os.getloadavg()
    model = io.load_model(dtype=jnp.float64)
    regs, truth = make_dataset(model, num_subjects=args.subjects, per_subject=args.per_subject, seed=0)
    rng = np.random.default_rng(1)
    held = rng.random(regs.num) < 0.1
    train, test = regs.subset(np.flatnonzero(~held)), regs.subset(np.flatnonzero(held))
    features = np.asarray(pose_features(jnp.asarray(truth.hand_pose[held])))
    print(f"{train.num} training and {test.num} held-out registrations of {args.subjects} hands, "
          f"V = {regs.num_vertices}", flush=True)  # fmt: skip

    runs = {}
    for name, config in (("learned", LearnConfig()), ("no_cost_matrix", LearnConfig(locality=False)),
                         ("no_pose_blend_shapes", LearnConfig(learn_posedirs=False))):  # fmt: skip
        start = time.perf_counter()
        result = learn(train, model, config, progress=False)
        seconds = time.perf_counter() - start
        err = held_out_error(result, test)
        model_err = held_out_error(result, test, truth.clean_vertices[held])
        leak = leakage(result.model.posedirs, truth.distances, truth.radius)
        runs[name] = dict(
            seconds=seconds,
            fit_rms_mm_per_iteration=[h["fit_rms_mm_mean"] for h in result.report["iterations"]],
            seconds_per_iteration=[h["seconds"] for h in result.report["iterations"]],
            held_out_rms_mm=1e3 * float(err.mean()),
            held_out_model_rms_mm=1e3 * float(model_err.mean()),
            corrective_error=corrective_error(result.model.posedirs, truth.model.posedirs, features),
            posedirs_frobenius_error=float(
                np.linalg.norm(np.asarray(result.model.posedirs) - np.asarray(truth.model.posedirs))
                / np.linalg.norm(np.asarray(truth.model.posedirs))
            ),
            leakage_max=float(np.nanmax(leak)) if np.isfinite(leak).any() else None,
            leakage_mean=float(np.nanmean(leak)) if np.isfinite(leak).any() else None,
            pose_angles_deg=principal_angles(result.pose_space.hands_components[:6], truth.pose_basis).tolist(),
            shape_angles_deg=principal_angles(
                np.asarray(result.model.shapedirs)[:, :, :4].reshape(-1, 4).T,
                np.asarray(truth.model.shapedirs).reshape(-1, 4).T,
            ).tolist(),
            pose_variance_explained=result.report["pose_variance_explained"][:12],
            shape_variance_explained=(result.report["shape_variance_explained"] or [])[:8],
        )
        print(name, json.dumps({k: v for k, v in runs[name].items() if "explained" not in k}), flush=True)

    subset = train.subset(np.arange(min(args.mirror_subset, train.num)))
    right = learn(subset, model, progress=False).model
    left = learn(mirrored(subset), model, progress=False).model
    mirror = {
        name: float(np.abs(np.asarray(getattr(right, name)) - np.asarray(getattr(left, name))).max())
        for name in ("v_template", "shapedirs", "posedirs", "hands_mean", "hands_components")
    }
    print("mirror (max abs difference, right vs mirrored-left learning):", mirror, flush=True)

    # The same closed-form solve given the planted poses and templates: the floor set by the noise.
    truth_poses = Poses(lbs.axis_angle_to_matrix(jnp.asarray(truth.global_orient[~held])),
                        jnp.asarray(truth.hand_pose[~held]), jnp.asarray(truth.transl[~held]))  # fmt: skip
    train_hands = truth.hand_index[~held]
    rest, _ = unpose(truth.model, truth.templates, train_hands, truth_poses, train.to_right())
    cost = cost_matrix(truth.distances, radius=truth.radius, scale=LearnConfig().locality_scale,
                       weight=LearnConfig().locality_weight)  # fmt: skip
    floor_posedirs, _ = solve_posedirs(rest, pose_features(truth_poses.hand_pose), train_hands, args.subjects, cost)
    corrective_floor = corrective_error(floor_posedirs, truth.model.posedirs, features)
    # What PCA of the planted poses themselves recovers: the floor set by sampling and jitter.
    floor = principal_angles(pose_pca(truth.hand_pose[~held]).hands_components[:6], truth.pose_basis).tolist()
    main_run, base = runs["learned"], runs["no_pose_blend_shapes"]
    summary = {
        "registrations": {"train": train.num, "held_out": test.num, "hands": args.subjects,
                          "vertices": regs.num_vertices},  # fmt: skip
        "learn_seconds": main_run["seconds"],
        "corrective_error": main_run["corrective_error"],
        "corrective_error_given_planted_poses_and_templates": corrective_floor,
        "posedirs_frobenius_error": main_run["posedirs_frobenius_error"],
        "held_out_rms_mm": main_run["held_out_rms_mm"],
        "held_out_rms_mm_without_pose_blend_shapes": base["held_out_rms_mm"],
        "held_out_model_rms_mm": main_run["held_out_model_rms_mm"],
        "held_out_model_rms_mm_without_pose_blend_shapes": base["held_out_model_rms_mm"],
        "held_out_reduction": 1.0 - main_run["held_out_model_rms_mm"] / base["held_out_model_rms_mm"],
        "leakage_max_with_cost_matrix": main_run["leakage_max"],
        "leakage_max_without_cost_matrix": runs["no_cost_matrix"]["leakage_max"],
        "pose_subspace_max_angle_deg": max(main_run["pose_angles_deg"]),
        "pose_subspace_max_angle_deg_pca_of_planted_poses": max(floor),
        "shape_subspace_max_angle_deg": max(main_run["shape_angles_deg"]),
        "mirror_max_abs_difference": max(mirror.values()),
    }
    print(json.dumps(summary, indent=1))
    out = {
        "summary": summary,
        "runs": runs,
        "mirror": mirror,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},  # fmt: skip
        "noise_m": 0.0005,
        "command": "PYTHONPATH=. .venv/bin/python bench/learning.py" + (" --quick" if args.quick else ""),
        "planted_radius_m": truth.radius,
    }
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


def refine(args) -> int:
    """Weight and regressor refinement from a perturbed start (see the module docstring)."""
    load_start = os.getloadavg()
    model = io.load_model(dtype=jnp.float64)
    regs, truth = make_dataset(model, num_subjects=args.subjects, per_subject=args.per_subject, seed=0)
    held = np.random.default_rng(1).random(regs.num) < 0.1
    train, test = regs.subset(np.flatnonzero(~held)), regs.subset(np.flatnonzero(held))
    perturbed = perturb_skinning(model, np.random.default_rng(2))
    print(f"{train.num} training and {test.num} held-out registrations of {args.subjects} hands", flush=True)
    runs = {}
    for part, start, flags in (
        ("weights", perturbed.replace(J_regressor=model.J_regressor), dict(refine_weights=True)),
        ("regressor", perturbed.replace(weights=model.weights), dict(refine_regressor=True)),
        ("both", perturbed, dict(refine_weights=True, refine_regressor=True)),
    ):
        runs[f"{part}_perturbed_start"] = skinning_errors(start, truth)
        for name, config in (("flags_off", LearnConfig()), ("refined", LearnConfig(**flags))):
            t0 = time.perf_counter()
            result = learn(train, start, config, progress=False)
            seconds = time.perf_counter() - t0
            runs[f"{part}_perturbed_{name}"] = {
                **skinning_errors(result.model, truth),
                "held_out_model_rms_mm": 1e3 * float(held_out_error(result, test, truth.clean_vertices[held]).mean()),
                "held_out_rms_mm": 1e3 * float(held_out_error(result, test).mean()),
                "final_fit_rms_mm": result.report["final_fit_rms_mm"]["mean"],
                "seconds": seconds,
            }
            print(f"{part}_perturbed_{name}", json.dumps(runs[f"{part}_perturbed_{name}"]), flush=True)
    out = {
        "runs": runs,
        "definitions": {
            "weights_l1": "mean over vertices of the L1 distance of the weight row to the planted one",
            "joints_mm": "mean distance of the joints regressed from the true templates to the planted ones",
            "held_out_model_rms_mm": "held-out RMS vertex error against the noise-free meshes",
        },
        "registrations": {"train": train.num, "held_out": test.num, "hands": args.subjects},
        "config": LearnConfig(refine_weights=True, refine_regressor=True).to_dict(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},  # fmt: skip
        "noise_m": 0.0005,
        "command": "PYTHONPATH=. .venv/bin/python bench/learning.py --refine" + (" --quick" if args.quick else ""),
    }
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
