"""Conventions users convert between: PCA and axis-angle poses, mean and flat hands, left and right,
fingertip vertex sets and keypoint orders.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .model import ManoModel

#: Fingertip vertex ids on the official 778-vertex MANO topology (thumb, index, middle, ring, pinky).
#: Projects disagree; pick one explicitly when comparing keypoints with another tool's.
TIP_IDS: dict[str, tuple[int, int, int, int, int]] = {
    "manopth": (745, 317, 444, 556, 673),  # also manotorch; manopth PR#30 fixed the index tip
    "smplx": (744, 320, 443, 554, 671),  # smplx / otaheri's MANO
    "boukhayma": (745, 333, 444, 555, 672),  # Boukhayma et al., CVPR 2019
}

#: OpenPose / MediaPipe / FreiHAND keypoint order as indices into MANO order (16 joints + 5 tips):
#: wrist, then thumb, index, middle, ring, pinky, each MCP, PIP, DIP, tip.
OPENPOSE_ORDER = (0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20)

#: The inverse permutation: OpenPose-ordered keypoints -> MANO order.
MANO_FROM_OPENPOSE = tuple(int(i) for i in np.argsort(OPENPOSE_ORDER))

# Mirroring across the plane x = 0 maps a rotation R to M R M with M = diag(-1, 1, 1); for
# axis-angle that is (x, y, z) -> (x, -y, -z).
_MIRROR = np.array([-1.0, 1.0, 1.0])


def pca_to_axis_angle(model: ManoModel, coeffs, *, flat_hand_mean: bool = True) -> jax.Array:
    """(*, K) PCA coefficients -> (*, 45) axis-angle hand pose (radians).

    hand_pose = coeffs @ hands_components[:K] (+ hands_mean when `flat_hand_mean` is False).
    """
    coeffs = jnp.asarray(coeffs, dtype=model.hands_components.dtype)
    pose = coeffs @ model.hands_components[: coeffs.shape[-1]]
    if not flat_hand_mean:
        pose = pose + jnp.broadcast_to(model.hands_mean, pose.shape)
    return pose


def axis_angle_to_pca(
    model: ManoModel, hand_pose, num_comps: int, *, flat_hand_mean: bool = True
) -> jax.Array:
    """(*, 45) axis-angle hand pose -> (*, num_comps) PCA coefficients, by least squares.

    The rows of `hands_components` are not orthonormal in the official files, so projecting with the
    transpose would be wrong; the pseudo-inverse gives the closest pose the first `num_comps`
    components can express (exact when the pose lies in their span).
    """
    if not 1 <= num_comps <= model.hands_components.shape[0]:
        raise ValueError(f"num_comps must be between 1 and 45, got {num_comps}")
    pose = jnp.asarray(hand_pose, dtype=model.hands_components.dtype)
    if not flat_hand_mean:
        pose = pose - jnp.broadcast_to(model.hands_mean, pose.shape)
    return pose @ jnp.linalg.pinv(model.hands_components[:num_comps])


def mean_to_flat(model: ManoModel, hand_pose) -> jax.Array:
    """A pose given relative to the mean hand (smplx's default) -> absolute (flat_hand_mean=True)."""
    return jnp.asarray(hand_pose) + model.hands_mean


def flat_to_mean(model: ManoModel, hand_pose) -> jax.Array:
    """An absolute pose (manopth's default) -> relative to the mean hand (flat_hand_mean=False)."""
    return jnp.asarray(hand_pose) - model.hands_mean


def mirror_pose(pose) -> jax.Array:
    """Mirror axis-angle poses between the right and the left hand: (*, 3k) or (*, k, 3).

    Each joint's (x, y, z) becomes (x, -y, -z): the rotation reflected across the x = 0 plane, which is
    the plane MANO's left model is mirrored across. Applies to global_orient and hand_pose alike
    (translations mirror as (x, y, z) -> (-x, y, z)).
    """
    pose = jnp.asarray(pose)
    sign = jnp.asarray(-_MIRROR, dtype=pose.dtype)
    if pose.ndim == 0 or pose.shape[-1] % 3:
        raise ValueError(f"pose: last axis must hold axis-angle triples, got {tuple(pose.shape)}")
    return pose * jnp.broadcast_to(jnp.tile(sign, pose.shape[-1] // 3), pose.shape)


def mirror_model(model: ManoModel) -> ManoModel:
    """The other hand's model: every part reflected across x = 0, in the same vertex and joint order.

    Template and shape directions get x negated; pose blend shapes are reflected consistently with
    `mirror_pose` (the (R - I)[i, j] feature of a mirrored pose is s_i s_j times the original's, with
    s = (-1, 1, 1), and the offset's x flips); faces are reversed to stay outward-facing; skinning
    weights and the joint regressor are unchanged. Mirroring twice gives the original model back.
    """
    s = np.asarray(_MIRROR)
    feature_sign = np.tile(np.outer(s, s).reshape(9), model.posedirs.shape[-1] // 9)
    pose_sign = np.tile(-_MIRROR, 15)
    dtype = model.v_template.dtype
    side = {"right": "left", "left": "right"}[model.side]
    name = model.name.replace(model.side, side) if model.side in model.name else model.name
    return dataclasses.replace(
        model,
        v_template=model.v_template * jnp.asarray(s[None, :], dtype),
        shapedirs=model.shapedirs * jnp.asarray(s[None, :, None], dtype),
        posedirs=model.posedirs * jnp.asarray((s[:, None] * feature_sign[None, :])[None], dtype),
        faces=model.faces[:, ::-1],
        hands_components=model.hands_components * jnp.asarray(pose_sign[None, :], dtype),
        hands_mean=model.hands_mean * jnp.asarray(pose_sign, dtype),
        side=side,
        name=name,
        provenance=f"mirror of {model.name or model.side + ' model'}; {model.provenance}".rstrip("; "),
    )
