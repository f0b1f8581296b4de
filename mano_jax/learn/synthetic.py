"""Synthetic registrations from a known hand model, to check that learning recovers what was planted.

The ground truth is a starting model (the default open hand unless given) with

- planted pose correctives: each joint's block of the pose blend shapes is a smooth random bump
  around the joint, exactly zero beyond `radius` (geodesic, metres) of the skin ring of the joint
  (`locality.joint_distances`), see `plant_correctives`;
- a planted shape space: the model's first `num_shapes` shape directions, pose-normalised (the part
  rotations they cause are removed, `pose_free_shapes`, since a template's turned finger is
  indistinguishable from a pose); each subject's hand is a standard-normal draw of betas in it;
- a planted pose space: six synergies built from the rest joints (curl of the index, of the middle, of
  ring and pinky together, thumb flexion, thumb opposition, finger spread), with uniformly drawn
  coefficients around a mildly curled mean, plus small independent jitter on every joint (0.05 rad,
  a variance 0.0025 against 0.04..1 along the synergies, so the poses lie near a 6-D subspace). The
  jitter is what real hands have and what makes all nine pose features of each joint vary.

Registrations are the ground-truth model posed (random global rotation and translation) plus Gaussian
noise on every coordinate. Lengths are metres, angles radians.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from scipy.spatial.transform import Rotation

from ..model import ManoModel
from ..posing import forward
from .blendshapes import rigid_free
from .data import Registrations
from .locality import joint_distances

#: Relative flexion of MCP, PIP and DIP in a finger's curl synergy.
_CURL = (1.0, 1.1, 0.7)


@dataclasses.dataclass(frozen=True)
class SyntheticTruth:
    """What the synthetic registrations were made from."""

    model: ManoModel
    """Ground-truth model: planted `posedirs`, `shapedirs` the planted (pose-free) shape space."""
    radius: float
    """Geodesic radius (metres) from each joint's skin ring beyond which its corrective is exactly zero."""
    distances: np.ndarray
    """(15, V) geodesic distance of every vertex from each joint's skin ring, metres."""
    pose_basis: np.ndarray
    """(6, 45) orthonormal basis of the planted pose subspace (rows)."""
    hand_betas: np.ndarray
    """(H, S) betas of each hand."""
    templates: np.ndarray
    """(H, V, 3) each hand's rest template, metres."""
    hand_index: np.ndarray
    """(N,) hand of each registration."""
    global_orient: np.ndarray
    """(N, 3) axis-angle."""
    hand_pose: np.ndarray
    """(N, 45) axis-angle hand poses."""
    transl: np.ndarray
    """(N, 3) metres."""
    clean_vertices: np.ndarray
    """(N, V, 3) the registrations before noise, metres."""


def plant_correctives(model: ManoModel, distances, radius: float, amplitude: float, rng) -> np.ndarray:
    """(V, 3, 135) local pose blend shapes: zero beyond `radius` (metres) of each joint's skin ring.

    Joint k's block at vertex v is amplitude * (1 - (d_kv / radius)^2)^2 * (A_k + B_k . (x_v - J_k) /
    radius) within the radius, with A_k (3, 9) and B_k (3, 9, 3) standard normal: a smooth bump of
    random shape around the joint, as skin folds and bulges there. `distances` from `joint_distances`.
    Its rigid part is removed (`blendshapes.rigid_free`): a rigid motion of the skin around a joint
    is indistinguishable from a change of pose, and the learner hands it to the pose.
    """
    template = np.asarray(model.v_template, np.float64)
    joints = np.asarray(model.J_regressor, np.float64) @ template
    v = template.shape[0]
    falloff = (1.0 - np.clip(np.asarray(distances) / radius, 0.0, 1.0) ** 2) ** 2  # (15, V)
    posedirs = np.zeros((v, 3, 135))
    for k in range(15):
        a = rng.standard_normal((3, 9))
        b = rng.standard_normal((3, 9, 3))
        rel = (template - joints[k + 1]) / radius  # (V, 3)
        field = a[None] + np.einsum("cfx,vx->vcf", b, rel)
        posedirs[:, :, 9 * k : 9 * k + 9] = amplitude * falloff[k][:, None, None] * field
    return np.asarray(rigid_free(posedirs, template, joints, distances, radius))


def pose_free_shapes(model: ManoModel, num_shapes: int, step: float = 1e-3) -> np.ndarray:
    """(V, 3, num_shapes) the model's first shape directions without the part rotations they cause.

    Shape targets such as "finger spread" turn whole segments, which registrations cannot tell from a
    pose. Each direction is replaced by the derivative of `templates.normalise_templates` along it
    (central differences of `step` betas), so a hand drawn from them is in the model's rest pose.
    """
    from .templates import normalise_templates

    dirs = np.asarray(model.shapedirs, np.float64)[:, :, :num_shapes]
    base = np.asarray(model.v_template, np.float64)
    moved = np.concatenate([base[None] + step * dirs.transpose(2, 0, 1), base[None] - step * dirs.transpose(2, 0, 1)])
    normal = np.asarray(normalise_templates(model, moved, model.v_template))
    return ((normal[:num_shapes] - normal[num_shapes:]) / (2 * step)).transpose(1, 2, 0)


def hand_axes(model: ManoModel) -> tuple[np.ndarray, np.ndarray]:
    """(finger direction, palm normal) of a model's rest pose, unit vectors.

    Fingers point from the wrist to the middle MCP. For a right hand, palm down and fingers pointing
    away, the thumb is on the left: the palm normal is -(fingers x thumb side); the left hand mirrors it.
    """
    joints = np.asarray(model.J_regressor, np.float64) @ np.asarray(model.v_template, np.float64)
    fingers = joints[4] - joints[0]
    fingers /= np.linalg.norm(fingers)
    thumb = joints[13] - joints[4]
    thumb -= (thumb @ fingers) * fingers
    thumb /= np.linalg.norm(thumb)
    normal = -np.cross(fingers, thumb)
    return fingers, normal if model.side == "right" else -normal


def pose_synergies(model: ManoModel) -> np.ndarray:
    """(6, 45) planted synergies: curl index, curl middle, curl ring + pinky, thumb flexion, thumb
    opposition, spread. Flexion turns each bone towards the palm (axis = bone x palm normal)."""
    joints = np.asarray(model.J_regressor, np.float64) @ np.asarray(model.v_template, np.float64)
    fingers, normal = hand_axes(model)
    chains = {"index": (1, 2, 3), "middle": (4, 5, 6), "pinky": (7, 8, 9), "ring": (10, 11, 12),
              "thumb": (13, 14, 15)}  # fmt: skip

    def flexion(chain):
        out = np.zeros((15, 3))
        for i, j in enumerate(chain):
            bone = joints[j] - joints[model.parents[j]] if i == 2 else joints[chain[i + 1]] - joints[j]
            axis = np.cross(bone, normal)
            out[j - 1] = _CURL[i] * axis / np.linalg.norm(axis)
        return out

    spread = np.zeros((15, 3))
    for j, s in ((1, 1.0), (10, -0.6), (7, -1.2)):
        spread[j - 1] = s * normal
    opposition = np.zeros((15, 3))
    opposition[12] = fingers
    rows = [flexion(chains["index"]), flexion(chains["middle"]),
            flexion(chains["ring"]) + flexion(chains["pinky"]), flexion(chains["thumb"]), opposition,
            spread]  # fmt: skip
    return np.stack([r.reshape(45) for r in rows])


def sample_poses(synergies, n: int, rng, jitter: float = 0.05) -> np.ndarray:
    """(n, 45) hand poses: uniform synergy coefficients (curls -0.2..1.3 rad, thumb -0.2..0.8, opposition
    0..0.8, spread -0.3..0.4) plus N(0, jitter^2) on every axis-angle entry."""
    low = np.array([-0.2, -0.2, -0.2, -0.2, 0.0, -0.3])
    high = np.array([1.3, 1.3, 1.3, 0.8, 0.8, 0.4])
    coeffs = rng.uniform(low, high, size=(n, 6))
    return coeffs @ synergies + jitter * rng.standard_normal((n, 45))


def make_dataset(
    model: ManoModel | None = None,
    *,
    num_subjects: int = 3,
    per_subject: int = 50,
    num_shapes: int = 4,
    radius: float = 0.015,
    amplitude: float = 0.001,
    noise: float = 0.0005,
    jitter: float = 0.05,
    seed: int = 0,
) -> tuple[Registrations, SyntheticTruth]:
    """Right-hand registrations of `num_subjects` hands, `per_subject` poses each, and the truth.

    `model` (default: the bundled open right hand, float64) provides topology, skinning, joint regressor
    and shape space; its own pose blend shapes are replaced by planted ones of `amplitude` metres per
    unit pose feature. `noise` is the standard deviation of the Gaussian noise per coordinate, metres.
    """
    if model is None:
        from .. import io

        model = io.load_model(dtype=jnp.float64)
    if model.side != "right":
        raise ValueError("make_dataset builds right hands; mirror the registrations for left ones")
    if model.num_betas < num_shapes:
        raise ValueError(f"the model has {model.num_betas} shape components, {num_shapes} were asked for")
    rng = np.random.default_rng(seed)
    dtype = model.v_template.dtype
    distances = joint_distances(model.v_template, model.faces, model.J_regressor @ model.v_template)
    posedirs = plant_correctives(model, distances, radius, amplitude, rng)
    truth_model = model.replace(
        posedirs=jnp.asarray(posedirs, dtype),
        shapedirs=jnp.asarray(pose_free_shapes(model, num_shapes), dtype),
        name="synthetic-truth",
        provenance=f"{model.name} with planted pose correctives (radius {radius} m), seed {seed}",
    )
    synergies = pose_synergies(model)
    n = num_subjects * per_subject
    hand_index = np.repeat(np.arange(num_subjects), per_subject)
    betas = rng.standard_normal((num_subjects, num_shapes))
    hand_pose = sample_poses(synergies, n, rng, jitter)
    global_orient = Rotation.random(n, random_state=rng).as_rotvec()
    transl = rng.normal(scale=0.1, size=(n, 3))
    out = forward(
        truth_model,
        hand_pose=jnp.asarray(hand_pose, dtype),
        betas=jnp.asarray(betas[hand_index], dtype),
        global_orient=jnp.asarray(global_orient, dtype),
        transl=jnp.asarray(transl, dtype),
    )
    clean = np.asarray(out.vertices, np.float64)
    vertices = clean + noise * rng.standard_normal(clean.shape)
    templates = np.asarray(model.v_template)[None] + np.einsum(
        "vck,hk->hvc", np.asarray(truth_model.shapedirs), betas
    )
    regs = Registrations.from_arrays(
        vertices, subject=np.array([f"s{h:02d}" for h in hand_index]),
        names=[f"synthetic s{h:02d} pose {i}" for i, h in enumerate(hand_index)],
    )  # fmt: skip
    q, _ = np.linalg.qr(synergies.T)
    truth = SyntheticTruth(
        model=truth_model, radius=radius, distances=distances, pose_basis=q.T, hand_betas=betas,
        templates=templates, hand_index=hand_index, global_orient=global_orient, hand_pose=hand_pose,
        transl=transl, clean_vertices=clean,
    )  # fmt: skip
    return regs, truth


def perturb_skinning(model: ManoModel, rng, weights_scale: float = 0.5, regressor_scale: float = 0.7) -> ManoModel:
    """`model` with every nonzero skinning weight and joint-regressor entry multiplied by exp(scale x a
    standard normal draw) and the rows renormalised: supports and constraints kept, values off the
    truth. A start for checking that weight / regressor refinement recovers the truth."""
    w = np.asarray(model.weights) * np.exp(weights_scale * rng.standard_normal(model.weights.shape))
    r = np.asarray(model.J_regressor) * np.exp(regressor_scale * rng.standard_normal(model.J_regressor.shape))
    dtype = model.v_template.dtype
    return model.replace(weights=jnp.asarray(w / w.sum(1, keepdims=True), dtype),
                         J_regressor=jnp.asarray(r / r.sum(1, keepdims=True), dtype))  # fmt: skip


def skinning_errors(model: ManoModel, truth: SyntheticTruth) -> dict:
    """How far `model`'s weights and regressor are from the truth's: mean L1 distance of weight rows,
    and mean distance (mm) of the joints they regress from the true templates."""
    w = np.abs(np.asarray(model.weights) - np.asarray(truth.model.weights)).sum(axis=1).mean()
    diff = np.asarray(model.J_regressor) - np.asarray(truth.model.J_regressor)
    joints = np.linalg.norm(np.einsum("jv,hva->hja", diff, truth.templates), axis=-1).mean()
    return {"weights_l1": float(w), "joints_mm": 1e3 * float(joints)}
