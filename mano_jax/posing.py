"""`forward`: pose and shape a `ManoModel`, with the semantics of the official MANO model and smplx.

    v_shaped  = v_template + shapedirs . betas
    J         = J_regressor @ v_shaped
    v_posed   = v_shaped + posedirs . (R(theta_1..15) - I)
    vertices  = sum_j weights[:, j] * G_j(theta, J) v_posed  +  transl

The global rotation turns about the rest wrist joint J_0 (not the origin) and `transl` is added after, as
in the official model; all lengths are metres.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from . import lbs
from .conventions import OPENPOSE_ORDER, pca_to_axis_angle
from .model import NUM_JOINTS, ManoModel, ManoOutput

PoseSpace = Literal["axis_angle", "pca", "rotmat"]
KeypointOrder = Literal["mano", "openpose"]

# Hands posed together in one step of a large batch (see `forward`).
_CHUNK = 64


def _as_array(name: str, value, dtype, trailing: tuple[int, ...]) -> jax.Array:
    """Convert an argument and check its trailing shape, naming it in the error."""
    value = jnp.asarray(value, dtype=dtype)
    if value.shape[value.ndim - len(trailing) :] != trailing or value.ndim < len(trailing):
        want = ", ".join(["*", *map(str, trailing)])
        raise ValueError(f"{name}: expected shape ({want}), got {tuple(value.shape)}")
    return value


def _lead(x: jax.Array, batch: tuple[int, ...], trailing: int) -> jax.Array:
    """Broadcast x's leading axes to `batch` explicitly (strict rank promotion forbids implicit)."""
    return jnp.broadcast_to(x, batch + x.shape[x.ndim - trailing :])


def _hand_rotations(
    model: ManoModel, hand_pose, pose_space: PoseSpace, num_pca_comps, flat_hand_mean: bool, dtype
) -> jax.Array:
    """Local rotations of joints 1..15 from the hand pose in any of its spaces: (*, 15, 3, 3) matrices
    with "rotmat", else (*, 15, 3) axis-angle (turned into matrices together with the root's)."""
    if pose_space == "rotmat":
        if not flat_hand_mean:
            raise ValueError(
                "flat_hand_mean=False adds the mean pose in axis-angle space; it has no meaning for "
                "pose_space='rotmat' (compose the rotations yourself)"
            )
        return _as_array("hand_pose", hand_pose, dtype, (NUM_JOINTS - 1, 3, 3))
    if pose_space == "pca":
        coeffs = jnp.asarray(hand_pose, dtype=dtype)
        k = coeffs.shape[-1] if coeffs.ndim else 0
        if coeffs.ndim == 0 or not 1 <= k <= 45:
            raise ValueError(
                f"hand_pose: PCA coefficients must have shape (*, K) with 1 <= K <= 45, "
                f"got {tuple(coeffs.shape)}"
            )
        if num_pca_comps is not None and num_pca_comps != k:
            raise ValueError(
                f"num_pca_comps={num_pca_comps} but hand_pose has {k} PCA coefficients"
            )
        axis_angle = pca_to_axis_angle(model, coeffs, flat_hand_mean=flat_hand_mean)
    elif pose_space == "axis_angle":
        if num_pca_comps is not None:
            raise ValueError("num_pca_comps is only used with pose_space='pca'")
        axis_angle = _as_array("hand_pose", hand_pose, dtype, (45,))
        if not flat_hand_mean:
            mean = model.hands_mean.astype(dtype)
            axis_angle = axis_angle + _lead(mean, axis_angle.shape[:-1], 1)
    else:
        raise ValueError(
            f"pose_space must be 'axis_angle', 'pca' or 'rotmat', got {pose_space!r}"
        )
    return axis_angle.reshape(*axis_angle.shape[:-1], 15, 3)


def _pose_flat(
    model: ManoModel, rotmats: jax.Array, betas: jax.Array | None, transl: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pose N hands: (N, 16, 3, 3) local rotations, (N, S') betas, (N, 3) transl.

    The blend shapes are one matrix product each for all N hands, against the model's arrays as
    stored (no per-call copies of the large posedirs).
    """
    n = rotmats.shape[0]
    num_coords = 3 * model.num_vertices
    features = lbs.pose_features(rotmats[:, 1:])
    offsets = jnp.einsum("nf,cf->nc", features, model.posedirs.reshape(num_coords, -1))
    if betas is None:
        v_shaped = jnp.broadcast_to(model.v_template, (n, *model.v_template.shape))
        rest_joints = jnp.broadcast_to(model.J_regressor @ model.v_template, (n, NUM_JOINTS, 3))
    else:
        k = betas.shape[-1]
        shape_offsets = jnp.einsum(
            "nk,ck->nc", betas, model.shapedirs.reshape(num_coords, -1)[:, :k]
        )
        v_shaped = model.v_template[None] + shape_offsets.reshape(n, -1, 3)
        if n < k:
            rest_joints = jnp.einsum("jv,nvc->njc", model.J_regressor, v_shaped)
        else:
            # Joints are linear in betas: regressing the shape directions once costs as much as
            # regressing k hands' vertices, and is cheaper for any larger batch.
            joint_dirs = jnp.einsum("jv,vck->jck", model.J_regressor, model.shapedirs[..., :k])
            rest_joints = (model.J_regressor @ model.v_template)[None] + lbs.blend_shapes(
                betas, joint_dirs
            )
    v_posed = checkpoint_name(v_shaped + offsets.reshape(n, -1, 3), "v_posed")
    world_r, posed_joints = lbs.kinematic_chain(rotmats, rest_joints, model.parents)
    if transl is not None:
        posed_joints = posed_joints + transl[:, None, :]
    transforms = lbs.skinning_transforms(world_r, posed_joints, rest_joints)
    return lbs.skin(v_posed, model.weights, transforms), posed_joints, transforms


@functools.partial(
    jax.jit, static_argnames=("pose_space", "num_pca_comps", "flat_hand_mean", "keypoint_order")
)
def forward(
    model: ManoModel,
    *,
    hand_pose,
    betas=None,
    global_orient=None,
    transl=None,
    pose_space: PoseSpace = "axis_angle",
    num_pca_comps: int | None = None,
    flat_hand_mean: bool = True,
    keypoint_order: KeypointOrder = "mano",
) -> ManoOutput:
    """Pose and shape the hand model. Differentiable; works under `jit`, `grad`, `vmap`, `jacfwd`.

    Compiled with `jax.jit` on first use for each combination of input shapes and options.

    Args:
      model: the hand model (`load_model()`), in float32 or float64; inputs are cast to its dtype.
      hand_pose: the 15 finger joints' rotations relative to their parents, in `pose_space`:
        "axis_angle": (*, 45) radians; "pca": (*, K) coefficients of the first K rows of
        `model.hands_components`; "rotmat": (*, 15, 3, 3) rotation matrices.
      betas: (*, S') shape coefficients, S' <= model.num_betas (missing ones are zero). Default: zeros.
      global_orient: (*, 3) axis-angle (or (*, 3, 3) with "rotmat") rotation of the whole hand about
        the rest wrist joint. Default: identity.
      transl: (*, 3) translation in metres added after the rotation. Default: zero.
      pose_space: how `hand_pose` is given (see above).
      num_pca_comps: with "pca", the expected K (checked against `hand_pose`; unlike smplx, 45 still
        means PCA).
      flat_hand_mean: True (default, as manopth/manotorch): `hand_pose` is absolute, zero = flat hand.
        False (smplx's default): `model.hands_mean` is added to the axis-angle pose, zero = mean hand.
      keypoint_order: "mano": 16 joints then fingertips thumb, index, middle, ring, pinky;
        "openpose": wrist then thumb, index, middle, ring, pinky, each MCP->tip (also MediaPipe's order).

    The leading batch axes `*` of all inputs broadcast against each other.

    Returns:
      `ManoOutput` with vertices (*, V, 3), joints (*, 16, 3) from the kinematic chain (these differ
      from `J_regressor @ vertices` by a few millimetres when posed), keypoints (*, 21, 3) and the
      skinning transforms (*, 16, 4, 4), all in metres.
    """
    if keypoint_order not in ("mano", "openpose"):
        raise ValueError(f"keypoint_order must be 'mano' or 'openpose', got {keypoint_order!r}")
    dtype = model.v_template.dtype
    hand_r = _hand_rotations(model, hand_pose, pose_space, num_pca_comps, flat_hand_mean, dtype)

    root_shape = (3, 3) if pose_space == "rotmat" else (3,)
    if global_orient is None:
        root_r = jnp.eye(3, dtype=dtype) if pose_space == "rotmat" else jnp.zeros(3, dtype)
    else:
        root_r = _as_array("global_orient", global_orient, dtype, root_shape)

    shapes = [hand_r.shape[: hand_r.ndim - len(root_shape) - 1], root_r.shape[: root_r.ndim - len(root_shape)]]
    if betas is not None:
        betas = jnp.asarray(betas, dtype=dtype)
        if betas.ndim == 0 or not 1 <= betas.shape[-1] <= model.num_betas:
            raise ValueError(
                f"betas: expected shape (*, S) with 1 <= S <= {model.num_betas} (the model's shape "
                f"components), got {tuple(betas.shape)}"
            )
        shapes.append(betas.shape[:-1])
    if transl is not None:
        transl = _as_array("transl", transl, dtype, (3,))
        shapes.append(transl.shape[:-1])
    try:
        batch = jnp.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(
            f"the leading batch axes of the inputs do not broadcast: {shapes} "
            "(hand_pose, global_orient, betas, transl that were given)"
        ) from None

    n = math.prod(batch)
    flat = lambda x, trailing: _lead(x, batch, trailing).reshape(n, *x.shape[x.ndim - trailing :])  # noqa: E731
    rotmats = jnp.concatenate(
        [flat(root_r, len(root_shape))[:, None], flat(hand_r, len(root_shape) + 1)], axis=1
    )
    if pose_space != "rotmat":
        rotmats = lbs.axis_angle_to_matrix(rotmats)
    args = (rotmats, None if betas is None else flat(betas, 1), None if transl is None else flat(transl, 1))
    if n <= _CHUNK:
        vertices, posed_joints, transforms = _pose_flat(model, *args)
    else:
        # Pose a chunk of hands at a time so the (chunk, 12, V) skinning intermediates stay in cache
        # instead of streaming through memory: large batches run as fast per hand as small ones.
        # Under differentiation each chunk is posed again in the backward pass rather than storing
        # its skinning intermediates for the whole batch (~60 kB per hand of fresh memory, whose
        # page faults cost more than the recomputation); only the blend-shaped vertices, the
        # product with the large posedirs, are kept.
        pad = -n % _CHUNK
        chunks = jax.tree.map(
            lambda x: jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(
                -1, _CHUNK, *x.shape[1:]
            ),
            args,
        )
        recompute = jax.checkpoint(
            lambda chunk: _pose_flat(model, *chunk),
            policy=jax.checkpoint_policies.save_only_these_names("v_posed"),
        )
        outputs = jax.lax.map(recompute, chunks)
        vertices, posed_joints, transforms = (x.reshape(-1, *x.shape[2:])[:n] for x in outputs)
    vertices = vertices.reshape(*batch, *vertices.shape[1:])
    posed_joints = posed_joints.reshape(*batch, *posed_joints.shape[1:])
    transforms = transforms.reshape(*batch, *transforms.shape[1:])

    tips = vertices[..., jnp.asarray(model.tip_ids, dtype=jnp.int32), :]
    keypoints = jnp.concatenate([posed_joints, tips], axis=-2)
    if keypoint_order == "openpose":
        keypoints = keypoints[..., jnp.asarray(OPENPOSE_ORDER), :]
    bottom = jnp.broadcast_to(jnp.asarray([0, 0, 0, 1], dtype), transforms.shape[:-2] + (1, 4))
    return ManoOutput(
        vertices=vertices,
        joints=posed_joints,
        keypoints=keypoints,
        transforms=jnp.concatenate([transforms, bottom], axis=-2),
    )

