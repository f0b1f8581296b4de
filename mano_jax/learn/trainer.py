"""Learning a hand model from registrations: the alternating optimisation and its report.

    0. first templates, `init_rounds` times: poses (first per-part Procrustes, later Levenberg-Marquardt
       from the previous poses), then per hand the weighted mean of its unposed registrations,
       near-flat poses favoured (`templates.flat_pose_weights`) so the templates do not absorb the
       correctives between the flat and the mean pose, projected into the starting model's shape
       space (which keeps these early templates from absorbing pose errors);
       every template estimate is then pose-normalised (`templates.normalise_templates`): a template's
       segment turned is the same data as every pose of that hand turned back, so the rest pose is
       pinned to the starting model's, part by part;
    1..iterations:
       a. poses of every registration, from the previous ones (`pose_fit.fit_poses`);
       (optionally, `refine_weights`, from iteration `refine_from`: the skinning weights, solved
       jointly with the correctives' best response, `skinning.refine_weights`);
       b. pose blend shapes and templates together, in closed form (`blendshapes.solve_posedirs`),
          with the rigid part of each joint's corrective handed back to the pose
          (`blendshapes.rigid_free`);
       (optionally, `refine_regressor`, from iteration `refine_from`: per-hand templates and rest
       joints together, then the joint regressor from them, `skinning`);
    then the shape space (PCA of the templates) and the pose space (PCA of the fitted poses).

Robustness: a vertex whose blended skinning rotation has collapsed (determinant < 0.25) and every
vertex of a registration whose fit is an outlier (RMS error above max(4 x median, median + 3 mm))
are replaced by the current model's prediction before the closed-form steps, so they cannot pull
the solution; outliers are left out of the pose PCA too; the report names them.

Skinning weights and the joint regressor are the starting model's unless `refine_weights` /
`refine_regressor` ask for them to be refined (non-negative rows summing to 1, sparse, kept near the
start; see `skinning` for why they must be solved with the correctives and templates, not after them).
Left registrations are mirrored into the right-hand training set; the left model is the mirror of the
learned right one. Lengths are metres.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from .._atomic import atomic_path
from ..conventions import mirror_model
from ..model import ManoModel
from .blendshapes import pose_features, rigid_free, solve_posedirs
from .data import Registrations
from .locality import cost_matrix, joint_distances, leakage
from .pose_fit import Poses, correctives, fit_poses
from .pose_space import PoseSpace, pose_pca
from .shape_space import ShapeSpace, shape_pca
from .skinning import fit_templates_and_joints, refine_regressor, refine_weights, weight_support
from .templates import average_templates, flat_pose_weights, normalise_templates, project_to_shape_space, unpose


@dataclasses.dataclass(frozen=True)
class LearnConfig:
    """Settings of `learn`. Lengths in metres, angles in radians."""

    iterations: int = 8
    """Alternations of poses -> (pose blend shapes, templates) after the first template estimate. The
    data error settles after about 4, the correctives later (bench, 1,811 registrations: corrective
    error 10.0 % after 5, 8.5 % after 8)."""
    init_rounds: int = 5
    """Rounds of poses -> first templates (iteration 0)."""
    first_pose_iterations: int = 0
    """Levenberg-Marquardt iterations of the first pose fit, from per-part Procrustes. 0 keeps the
    Procrustes poses: part rotations hardly depend on the template's proportions, while a fit to the
    starting template bends the fingers to make up for wrong bone lengths, and the first templates
    inherit that bend (measured: a hand 2.8 standard deviations from the starting shape kept 30-degree
    thumb errors to the end with 8 iterations here and 3 rounds, 2.5 degrees with 0 and 5 rounds)."""
    pose_iterations: int = 3
    """Levenberg-Marquardt iterations of later pose fits (started from the previous poses)."""
    flat_sigma: float = 0.25
    """Scale of the first template estimate's down-weighting of posed registrations: weight
    exp(-(a / flat_sigma)^2 / 2), a = RMS joint angle. Large values disable it."""
    learn_posedirs: bool = True
    """Learn pose blend shapes (False keeps the starting model's)."""
    locality: bool = True
    """Penalise correctives far (geodesically) from the part each joint moves (MANO's cost matrix)."""
    locality_radius: float = 0.015
    """Distance from a joint's skin ring within which its corrective is free (metres)."""
    locality_scale: float = 0.01
    """Distance beyond the radius over which the cost grows to `locality_weight` (metres)."""
    locality_weight: float = 100.0
    """Cost at radius + scale, relative to the data term (see `locality.cost_matrix`): 100 is a wall."""
    rigid_free: bool = True
    """Remove the rigid motion of each joint's neighbourhood from its corrective (`blendshapes.rigid_free`)."""
    ridge: float = 1e-4
    """Weight of |P|^2, relative to the data term."""
    refine_weights: bool = False
    """Re-fit the skinning weights (non-negative, rows sum to 1, support the starting weights' joints and
    their kinematic neighbours), jointly with the pose blend shapes' response (`skinning.refine_weights`).
    Off: the starting model's weights are kept bit for bit."""
    weights_ridge: float = 1e-4
    """Pull of the refined weights towards the starting ones: lambda_v |w_v - w_v^start|^2 with lambda_v
    this times the vertex's mean data curvature per supported joint."""
    refine_regressor: bool = False
    """Re-fit the joint regressor (non-negative, rows sum to 1, support the starting regressor's) from
    per-hand rest joints solved together with the templates (`skinning.fit_templates_and_joints`,
    `skinning.refine_regressor`). Off: the starting model's regressor is kept bit for bit."""
    regressor_ridge: float = 1e-3
    """Pull of each regressor row towards the starting row, relative to the row's mean data curvature."""
    joints_ridge: float = 1e-3
    """Pull of the per-hand joints towards the regressed ones, relative to their mean data curvature."""
    refine_from: int = 1
    """First iteration that refines weights / regressor (iteration 0 makes the first templates)."""
    num_betas: int = 10
    """Shape components kept (at most the number of hands - 1)."""
    chunk_size: int = 32
    """Registrations per vectorised batch in pose fitting (memory ~ chunk * V * 160 floats)."""

    def __post_init__(self):
        if self.refine_from < 1:
            raise ValueError(f"LearnConfig.refine_from must be at least 1, got {self.refine_from}")
        for name in ("weights_ridge", "regressor_ridge", "joints_ridge"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LearnConfig.{name} must be non-negative, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LearnResult:
    """What `learn` produced."""

    model: ManoModel
    """The learned right-hand model (load/save/forward it like any other)."""
    hand_keys: tuple[str, ...]
    """(H,) "subject/side" of each template."""
    templates: np.ndarray
    """(H, V, 3) learned rest templates of the training hands (right-hand frame), metres."""
    hand_index: np.ndarray
    """(N,) template of each registration."""
    poses: Poses
    """Fitted poses of the registrations (right-hand frame; left ones mirrored)."""
    fit_rms: np.ndarray
    """(N,) RMS vertex error of each registration under the learned model, metres."""
    shape_space: ShapeSpace | None
    """The shape PCA (None with a single hand: the starting model's shape space is kept)."""
    pose_space: PoseSpace
    distances: np.ndarray
    """(15, V) geodesic distance from each joint's skin ring (metres), what the cost matrix is built from."""
    cost: np.ndarray | None
    """(15, V) the locality cost matrix used (None without locality)."""
    report: dict

    @property
    def left_model(self) -> ManoModel:
        """The left-hand model: the mirror of the learned right one."""
        return mirror_model(self.model)


def _fingerprint(targets: np.ndarray, hand_index: np.ndarray, config: LearnConfig, init: ManoModel) -> str:
    h = hashlib.sha256()
    for a in (targets, hand_index, np.asarray(init.v_template), np.asarray(init.weights)):
        h.update(np.ascontiguousarray(a).tobytes())
    # `iterations` is left out so that a finished run can be extended by asking for more.
    settings = {k: v for k, v in config.to_dict().items() if k != "iterations"}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _save_state(path: Path, fingerprint: str, iteration: int, model: ManoModel, templates, poses: Poses,
                history: list) -> None:  # fmt: skip
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f, fingerprint=np.array(fingerprint), iteration=np.array(iteration),
                posedirs=np.asarray(model.posedirs), weights=np.asarray(model.weights),
                J_regressor=np.asarray(model.J_regressor), templates=np.asarray(templates),
                global_rot=np.asarray(poses.global_rot), hand_pose=np.asarray(poses.hand_pose),
                transl=np.asarray(poses.transl), history=np.array(json.dumps(history)),
            )  # fmt: skip


def _load_state(path: Path, fingerprint: str, dtype):
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as d:
            if str(d["fingerprint"]) != fingerprint:
                return None
            arrays = {k: np.asarray(d[k]) for k in d.files}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: unreadable learning checkpoint ({e}); delete it to start over") from e
    as_j = lambda k: jnp.asarray(arrays[k], dtype)  # noqa: E731
    poses = Poses(as_j("global_rot"), as_j("hand_pose"), as_j("transl"))
    return (int(arrays["iteration"]), as_j("posedirs"), as_j("weights"), as_j("J_regressor"),
            as_j("templates"), poses, json.loads(str(arrays["history"])))  # fmt: skip


def _outliers(rms):
    """(N,) bool: registrations whose fit RMS error is above max(4 x median, median + 3 mm)."""
    med = jnp.median(rms)
    return rms > jnp.maximum(4.0 * med, med + 0.003)


def learn(
    registrations: Registrations,
    init: ManoModel,
    config: LearnConfig = LearnConfig(),
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> LearnResult:
    """Learn a MANO-style hand model from registrations, starting from `init`.

    Args:
      registrations: meshes in `init`'s topology, metres (left ones are mirrored to right).
      init: the starting model (its skinning weights, joint regressor, topology; its template starts the
        pose fits). A left model is mirrored to a right one first. Use float64 for learning.
      config: `LearnConfig`.
      checkpoint_dir: if given, the state is saved there after every iteration and a re-run with the same
        data and config resumes from it.
      progress: show a progress bar per iteration.

    Returns:
      `LearnResult` with the learned right model (`.left_model` for the left), per-hand templates, the
      fitted poses and a report (data error per iteration, variance curves, locality).
    """
    from tqdm.auto import tqdm

    if registrations.num_vertices != init.num_vertices:
        raise ValueError(
            f"registrations have {registrations.num_vertices} vertices but the starting model "
            f"{init.name or ''} has {init.num_vertices}: they must share its topology"
        )
    start = time.perf_counter()
    if init.side == "left":
        init = mirror_model(init)
    dtype = init.v_template.dtype
    targets_np = registrations.to_right()
    keys, hand_index = registrations.template_keys()
    num_hands = len(keys)
    targets = jnp.asarray(targets_np, dtype)
    fit = dict(chunk_size=config.chunk_size)

    distances = joint_distances(init.v_template, init.faces, init.J_regressor @ init.v_template)
    cost = None
    if config.locality:
        cost = cost_matrix(distances, radius=config.locality_radius, scale=config.locality_scale,
                           weight=config.locality_weight)  # fmt: skip

    fingerprint = _fingerprint(targets_np, hand_index, config, init)
    state_path = Path(checkpoint_dir) / "learn_state.npz" if checkpoint_dir is not None else None
    resumed = _load_state(state_path, fingerprint, dtype) if state_path is not None else None
    model = init
    history: list[dict] = []
    first = 0
    if resumed is not None:
        first, posedirs, weights, regressor, templates, poses, history = resumed
        model = model.replace(posedirs=posedirs, weights=weights, J_regressor=regressor)
        first += 1

    def rest_frame(model, templates, poses, rms):
        """Unposed registrations minus correctives; untrustworthy vertices replaced by the templates."""
        unposed, det = unpose(model, templates, hand_index, poses, targets)
        corr = correctives(model, poses.hand_pose)
        outlier = _outliers(rms)
        keep = (det > 0.25) & ~outlier[:, None]
        rest = jnp.where(keep[..., None], unposed - corr, templates[hand_index])
        return rest, corr, outlier

    joints0 = init.J_regressor @ init.v_template
    support = weight_support(init.weights, init.parents) if config.refine_weights else None
    bar = tqdm(range(first, config.iterations + 1), desc="learn", disable=not progress, unit="it")
    for it in bar:
        t0 = time.perf_counter()
        entry = {"iteration": it}
        if it == 0:
            templates = jnp.broadcast_to(init.v_template, (num_hands, *init.v_template.shape))
            poses = None
            for r in range(config.init_rounds):
                poses, rms = fit_poses(
                    model, templates, hand_index, targets, poses,
                    iterations=config.first_pose_iterations if r == 0 else config.pose_iterations, **fit,
                )  # fmt: skip
                rest, _, outlier = rest_frame(model, templates, poses, rms)
                w = flat_pose_weights(poses.hand_pose, config.flat_sigma)
                templates = average_templates(rest, hand_index, num_hands, w)
                if init.num_betas > 0:
                    templates = project_to_shape_space(templates, init.v_template, init.shapedirs)
                templates = normalise_templates(init, templates, init.v_template)
            entry["step"] = "poses and first templates (near-flat poses favoured, in the starting shape space)"
            sums = np.asarray(jnp.zeros(num_hands).at[hand_index].add(w))
            squares = np.asarray(jnp.zeros(num_hands).at[hand_index].add(w**2))
            entry["flat_weighting_effective_registrations_per_hand"] = float(np.mean(sums**2 / squares))
        else:
            poses, rms = fit_poses(model, templates, hand_index, targets, poses,
                                   iterations=config.pose_iterations, **fit)  # fmt: skip
            entry["step"] = "poses"
            refine = it >= config.refine_from
            if config.refine_weights and refine:
                # Before the correctives: solved with their response, the weights are not pre-empted.
                weights = refine_weights(model, templates, hand_index, poses, targets, ~_outliers(rms), init.weights,
                                         support, cost, ridge=config.weights_ridge, posedirs_ridge=config.ridge,
                                         respond=config.learn_posedirs, chunk_size=config.chunk_size)  # fmt: skip
                model = model.replace(weights=weights)
                entry["weights_mean_abs_change_from_start"] = float(jnp.mean(jnp.abs(weights - init.weights)))
                entry["step"] += ", skinning weights"
            rest, corr, outlier = rest_frame(model, templates, poses, rms)
            unposed = rest + corr
            features = pose_features(poses.hand_pose)
            if config.learn_posedirs:
                posedirs, templates = solve_posedirs(unposed, features, hand_index, num_hands, cost,
                                                     ridge=config.ridge)  # fmt: skip
                if config.rigid_free:
                    posedirs = rigid_free(posedirs, init.v_template, joints0, distances, config.locality_radius)
                    templates = average_templates(unposed - jnp.einsum("nf,vcf->nvc", features, posedirs),
                                                  hand_index, num_hands)  # fmt: skip
                model = model.replace(posedirs=posedirs)
            else:
                templates = average_templates(rest, hand_index, num_hands)
            entry["step"] += ", pose blend shapes and templates"
            if config.refine_regressor and refine:
                templates, joints = fit_templates_and_joints(model, templates, hand_index, poses, targets,
                                                             ~outlier, ridge=config.joints_ridge,
                                                             chunk_size=config.chunk_size)  # fmt: skip
                regressor = refine_regressor(templates, joints, init.J_regressor, ridge=config.regressor_ridge)
                model = model.replace(J_regressor=regressor)
                templates = jnp.asarray(templates, dtype)
                moved = jnp.linalg.norm(jnp.einsum("jv,hva->hja", regressor - init.J_regressor, templates), axis=-1)
                entry["regressed_joints_mean_shift_from_start_mm"] = 1e3 * float(jnp.mean(moved))
                entry["step"] += ", templates with joints, joint regressor"
            # The current weights and regressor define the rest pose the templates are pinned to.
            templates = normalise_templates(model, templates, init.v_template)
        rms = np.asarray(rms)
        entry.update(
            fit_rms_mm_mean=1e3 * float(rms.mean()),
            fit_rms_mm_max=1e3 * float(rms.max()),
            outliers=[registrations.name(int(i)) for i in np.flatnonzero(np.asarray(outlier))][:20],
            seconds=time.perf_counter() - t0,
        )
        history.append(entry)
        bar.set_postfix(rms_mm=f"{entry['fit_rms_mm_mean']:.3f}")
        if state_path is not None:
            _save_state(state_path, fingerprint, it, model, templates, poses, history)

    # The data error under the final model (the per-iteration errors are measured before each update).
    poses, rms = fit_poses(model, templates, hand_index, targets, poses, iterations=config.pose_iterations, **fit)
    rms = np.asarray(rms)
    templates = np.asarray(templates, np.float64)

    shape = shape_pca(templates, config.num_betas) if num_hands >= 2 else None
    # A pose the model cannot fit is a failed fit, not a hand pose: it would add a direction of its own.
    pose = pose_pca(np.asarray(poses.hand_pose)[~np.asarray(_outliers(rms))])
    if shape is not None and shape.shapedirs.shape[-1] > 0:
        v_template, shapedirs = shape.mean, shape.shapedirs
    else:
        v_template, shapedirs = templates.mean(axis=0), np.asarray(init.shapedirs)
    names = sorted(set(str(s) for s in registrations.subject))
    learned = ManoModel(
        v_template=jnp.asarray(v_template, dtype),
        shapedirs=jnp.asarray(shapedirs, dtype),
        posedirs=model.posedirs,
        J_regressor=model.J_regressor,
        weights=model.weights,
        faces=init.faces,
        hands_components=jnp.asarray(pose.hands_components, dtype),
        hands_mean=jnp.asarray(pose.hands_mean, dtype),
        hands_var=jnp.asarray(pose.hands_var, dtype),
        parents=init.parents,
        tip_ids=init.tip_ids,
        side="right",
        name="learned-right",
        provenance=(
            f"learned by mano-jax from {registrations.num} registrations of {num_hands} hands "
            f"({len(names)} subjects, {int(registrations.is_left.sum())} left hands mirrored), "
            f"starting from {init.name or 'a model'}"
        ),
    )

    report = {
        "registrations": registrations.num,
        "hands": num_hands,
        "subjects": len(names),
        "left_registrations": int(registrations.is_left.sum()),
        "vertices": registrations.num_vertices,
        "config": config.to_dict(),
        "iterations": history,
        "final_fit_rms_mm": {"mean": 1e3 * float(rms.mean()), "median": 1e3 * float(np.median(rms)),
                             "max": 1e3 * float(rms.max())},  # fmt: skip
        "worst_registrations": [
            {"name": registrations.name(int(i)), "rms_mm": 1e3 * float(rms[i])} for i in np.argsort(rms)[::-1][:5]
        ],
        "pose_variance_explained": pose.explained.tolist(),
        "shape_variance_explained": None if shape is None else shape.explained.tolist(),
        "locality": {
            "radius_m": config.locality_radius,
            "leakage_per_joint": [None if not np.isfinite(x) else float(x)
                                  for x in leakage(model.posedirs, distances, config.locality_radius)],  # fmt: skip
            "definition": "fraction of each joint's corrective energy farther than radius_m from its joint's skin ring",
        },
        "seconds": time.perf_counter() - start,
    }
    return LearnResult(
        model=learned, hand_keys=tuple(keys), templates=templates, hand_index=hand_index, poses=poses,
        fit_rms=rms, shape_space=shape, pose_space=pose, distances=distances, cost=cost, report=report,
    )  # fmt: skip
