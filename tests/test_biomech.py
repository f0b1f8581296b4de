"""Biomechanical constraints on 21 keypoints (mano_jax.biomech), checked against the bundled open hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mano_jax import OPENPOSE_ORDER, biomech, forward, load_model, mirror_model, mirror_pose
from mano_jax.priors import JointLimits


@pytest.fixture(scope="module")
def model():
    return load_model(dtype=jnp.float64)


@pytest.fixture(scope="module")
def hands(model):
    """Keypoints (OpenPose order) of 40 random valid poses without twist, their poses, and the rest hand."""
    limits = JointLimits.default(model)
    poses = limits.sample(jax.random.PRNGKey(0), (40,), twist_fraction=0.0)
    kp_model = biomech.keypoint_model(model)
    kp = forward(kp_model, hand_pose=poses, keypoint_order="openpose").keypoints
    rest = forward(kp_model, hand_pose=jnp.zeros(45), keypoint_order="openpose").keypoints
    return kp, poses, rest, limits


@pytest.fixture(scope="module")
def anatomical(model):
    return biomech.BiomechLimits.from_model(model, joint_regions="anatomical")


def test_keypoint_model_reproduces_the_full_models_keypoints(model, hands):
    _, poses, _, _ = hands
    betas = jnp.asarray(np.random.default_rng(0).normal(size=(40, model.num_betas)))
    full = forward(model, hand_pose=poses, betas=betas).keypoints
    small = forward(biomech.keypoint_model(model), hand_pose=poses, betas=betas).keypoints
    np.testing.assert_allclose(small, full, atol=1e-12)


def test_normalisation_and_bone_lengths_in_both_orders(hands):
    kp, *_ = hands
    norm, scale = biomech.normalize_keypoints(kp)
    np.testing.assert_allclose(norm[:, 0], 0.0, atol=1e-15)
    np.testing.assert_allclose(jnp.linalg.norm(norm[:, 9], axis=-1), 1.0, rtol=1e-9)
    assert bool(jnp.all((scale > 0.07) & (scale < 0.12)))  # metres: a hand's wrist-to-middle-MCP length
    mano = kp[:, jnp.asarray(np.argsort(OPENPOSE_ORDER))]
    np.testing.assert_allclose(biomech.bone_lengths(mano, "mano"), biomech.bone_lengths(kp), rtol=1e-12)
    # Bone lengths do not change with the pose of a rigid kinematic chain (tips ride on the skin: ~mm).
    lengths = np.asarray(biomech.bone_lengths(kp))
    assert lengths.shape == (40, 20) and np.ptp(lengths, axis=0).max() < 0.004


def test_keypoint_joint_angles_match_the_pose_angles_for_untwisted_poses(hands):
    kp, poses, rest, limits = hands
    rest_frames = biomech.rest_bone_frames(rest)
    from_keypoints = np.asarray(biomech.joint_angles(kp, rest_frames=rest_frames))
    from_pose = np.asarray(limits.angles(poses))[:, np.asarray(biomech.MANO_FINGER_JOINTS).ravel() - 1, :2]
    np.testing.assert_allclose(biomech.joint_angles(rest, rest_frames=rest_frames), 0.0, atol=1e-10)
    # Close for the four fingers (the carried frames ignore the small rotation an abducted MCP adds about
    # the finger); the thumb CMC frame differs more from the joint's.
    fingers = np.abs(from_keypoints[:, 3:] - from_pose[:, 3:])
    assert fingers.mean() < np.deg2rad(0.5) and fingers.max() < np.deg2rad(5.0)
    assert np.abs(from_keypoints - from_pose).max() < np.deg2rad(10.0)


def test_angles_and_palm_measures_are_mirror_symmetric(model, hands):
    kp, poses, *_ = hands
    left = forward(biomech.keypoint_model(mirror_model(model)), hand_pose=mirror_pose(poses),
                   keypoint_order="openpose").keypoints  # fmt: skip
    np.testing.assert_allclose(biomech.joint_angles(left, side="left"), biomech.joint_angles(kp), atol=1e-9)
    np.testing.assert_allclose(biomech.palm_curvature(left, side="left"), biomech.palm_curvature(kp), atol=1e-9)


def test_valid_hands_pass_and_broken_ones_are_reported(anatomical, hands):
    kp, *_ = hands
    # Bone lengths and the palm pass; the literature angle regions hold to the few degrees by which keypoint
    # frames and joint frames differ.
    assert all(v["constraint"] == "joint_angle" and v["amount"] < 5.0 for v in anatomical.report(kp))
    broken = np.array(kp[0])
    broken[8] = broken[7] + 1.6 * (broken[8] - broken[7])  # index distal phalanx 60% too long
    # Middle finger bent backwards at the PIP by ~60 degrees: mirror its tip chain across the proximal bone.
    axis = (broken[10] - broken[9]) / np.linalg.norm(broken[10] - broken[9])
    for k in (11, 12):
        rel = broken[k] - broken[10]
        along = rel @ axis * axis
        broken[k] = broken[10] + 2 * along - rel
    found = {(v["constraint"], v["name"]) for v in anatomical.report(broken, angle_tolerance_deg=5.0)}
    assert ("bone_length", "index_distal") in found
    assert ("joint_angle", "middle_middle") in found
    assert float(anatomical.penalty(broken)) > 0


def test_penalty_is_differentiable_where_limits_are_violated(anatomical, hands):
    kp, *_ = hands
    stretched = kp[0].at[12].add(jnp.asarray([0.0, 0.03, 0.02]))  # middle tip pulled 36 mm off
    assert float(anatomical.penalty(stretched)) > 0
    check_grads(anatomical.penalty, (stretched,), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-4)


def test_limits_learnt_from_keypoints_contain_the_data_and_flag_outliers(hands):
    kp, *_ = hands
    learnt = biomech.BiomechLimits.from_keypoints(kp[:30], angle_margin_deg=1.0, dtype=jnp.float64)
    assert learnt.report(kp[:30]) == []
    outlier = np.array(kp[30])
    outlier[4] = outlier[3] + 2.0 * (outlier[4] - outlier[3])  # thumb tip bone doubled
    assert ("bone_length", "thumb_distal") in {(v["constraint"], v["name"]) for v in learnt.report(outlier)}


def test_sampled_limits_accept_twisted_valid_poses(model):
    limits = JointLimits.default(model)
    sampled = biomech.BiomechLimits.from_model(model, num_samples=1024)
    poses = limits.sample(jax.random.PRNGKey(7), (100,))
    kp = forward(biomech.keypoint_model(model), hand_pose=poses, keypoint_order="openpose").keypoints
    joint = [v for v in sampled.report(kp) if v["constraint"] == "joint_angle"]
    assert len(joint) <= 2 and all(v["amount"] < 2.0 for v in joint)


def test_bad_keypoint_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(\*, 21, 3\)"):
        biomech.bone_lengths(np.zeros((20, 3)))
    with pytest.raises(ValueError, match="order"):
        biomech.bone_lengths(np.zeros((21, 3)), "mediapipe")
