"""Pose priors, joint-angle limits and the shape prior (mano_jax.priors) on the bundled open hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.spatial.transform import Rotation

from mano_jax import load_model, mirror_model, mirror_pose
from mano_jax.priors import GaussianMixturePrior, JointLimits, PosePrior, shape_prior


@pytest.fixture(scope="module")
def model():
    return load_model(dtype=jnp.float64)


@pytest.fixture(scope="module")
def limits(model):
    return JointLimits.default(model)


def test_pose_prior_from_model_is_zero_at_the_mean_and_matches_its_residuals(model):
    prior = PosePrior.from_model(model)
    assert float(prior.energy(model.hands_mean)) == pytest.approx(0.0, abs=1e-9)
    poses = jnp.asarray(np.random.default_rng(0).normal(size=(4, 45)) * 0.3)
    energy = prior.energy(poses)
    assert energy.shape == (4,) and bool(jnp.all(energy > 0))
    np.testing.assert_allclose(energy, jnp.sum(prior.residuals(poses) ** 2, -1), rtol=1e-10)
    # One standard deviation along the first component costs exactly 1.
    step = np.sqrt(float(model.hands_var[0])) * np.asarray(model.hands_components[0])
    assert float(prior.energy(model.hands_mean + step)) == pytest.approx(1.0, rel=1e-6)


def test_pose_prior_from_poses_recovers_the_spread_of_its_data():
    rng = np.random.default_rng(1)
    stds = np.linspace(0.5, 0.05, 45)
    poses = rng.normal(size=(4000, 45)) * stds + 0.2
    prior = PosePrior.from_poses(poses, dtype=jnp.float64)
    np.testing.assert_allclose(np.sort(np.sqrt(np.asarray(prior.var)))[::-1], stds, rtol=0.08)
    # Typical poses score about one unit per dimension.
    assert float(prior.energy(jnp.asarray(poses[:500])).mean()) == pytest.approx(45, rel=0.1)
    with pytest.raises(ValueError, match="N, 45"):
        PosePrior.from_poses(np.zeros((10, 44)))


def test_gaussian_mixture_prior_finds_two_clusters_and_is_minimal_at_their_means():
    rng = np.random.default_rng(2)
    a, b = np.full(45, 0.5), np.full(45, -0.5)
    poses = np.concatenate([a + 0.05 * rng.normal(size=(300, 45)), b + 0.05 * rng.normal(size=(300, 45))])
    gmm = GaussianMixturePrior.fit(poses, 2, seed=0, dtype=jnp.float64)
    means = np.asarray(gmm.means)
    assert min(np.abs(means - a).max(axis=1)) < 0.02 and min(np.abs(means - b).max(axis=1)) < 0.02
    at_means = gmm.energy(jnp.asarray(np.stack([a, b])))
    between = gmm.energy(jnp.zeros((1, 45)))
    assert bool(jnp.all(at_means >= 0)) and float(between[0]) > 100 * float(at_means.max() + 1)
    again = GaussianMixturePrior.fit(poses, 2, seed=0, dtype=jnp.float64)
    np.testing.assert_array_equal(np.asarray(again.means), means)


def test_joint_limits_rest_pose_is_zero_and_samples_lie_inside(model, limits):
    np.testing.assert_allclose(limits.angles(jnp.zeros(45)), 0.0, atol=1e-12)
    poses = limits.sample(jax.random.PRNGKey(0), (200,))
    assert float(jnp.max(limits.penalty(poses))) == 0.0
    assert limits.violations(poses) == []
    np.testing.assert_allclose(limits.pose_from_angles(limits.angles(poses)), poses, atol=1e-9)


def test_joint_limits_flexion_bends_fingers_towards_the_palm(model, limits):
    # The mean hand is relaxed, slightly curled: every finger joint flexes (positive) in the limits' frames.
    flexion = np.asarray(limits.angles(model.hands_mean))[:, 0]
    assert np.all(flexion[:12] > np.deg2rad(5))


def test_joint_limit_violations_name_the_joint_the_direction_and_the_amount(limits):
    angles = np.zeros((15, 3))
    angles[limits.names.index("index2"), 0] = np.deg2rad(-40.0)  # PIP hyperextended 30 deg too far
    angles[limits.names.index("ring1"), 2] = np.deg2rad(25.0)  # MCP twisted 15 deg too far
    pose = limits.pose_from_angles(jnp.asarray(angles))
    found = {(v["joint"], v["limit"]): v["amount_deg"] for v in limits.violations(pose)}
    assert set(found) == {("index2", "extension"), ("ring1", "twist")}
    assert found[("index2", "extension")] == pytest.approx(30.0, abs=0.01)
    assert found[("ring1", "twist")] == pytest.approx(15.0, abs=0.01)
    assert float(limits.penalty(pose)) == pytest.approx(np.deg2rad(30.0) ** 2 + np.deg2rad(15.0) ** 2, rel=1e-6)


def test_joint_limit_penalty_gradients_and_margin(limits):
    pose = limits.sample(jax.random.PRNGKey(1), ()) * 2.5  # pushed outside several limits
    assert float(limits.penalty(pose)) > 0
    check_grads(limits.penalty, (pose,), order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-5)
    inside = limits.sample(jax.random.PRNGKey(2), (50,))
    # With a margin the penalty is positive near the boundary and grows with the margin.
    assert float(jnp.sum(limits.penalty(inside, 0.05))) > float(jnp.sum(limits.penalty(inside, 0.01))) > 0
    prior = PosePrior(jnp.zeros(45), jnp.eye(45), jnp.ones(45))
    grad_at_rest = jax.grad(lambda p: limits.penalty(p) + prior.energy(p))(jnp.zeros(45))
    assert bool(jnp.all(jnp.isfinite(grad_at_rest)))


def test_joint_limits_follow_the_model_frame_not_fixed_axes(model, limits):
    # The same hand rotated as a whole: poses expressed in the rotated frame get the same angles.
    q = Rotation.from_rotvec([0.4, -1.1, 0.7])
    rot = jnp.asarray(q.as_matrix())
    turned = model.replace(v_template=model.v_template @ rot.T)
    poses = limits.sample(jax.random.PRNGKey(3), (20,))
    turned_poses = jnp.asarray(
        (q * Rotation.from_rotvec(np.array(poses).reshape(-1, 3)) * q.inv()).as_rotvec().reshape(20, 45)
    )
    np.testing.assert_allclose(JointLimits.default(turned).angles(turned_poses), limits.angles(poses), atol=1e-9)


def test_joint_limits_of_the_left_hand_mirror_the_right(model, limits):
    poses = limits.sample(jax.random.PRNGKey(4), (20,))
    left = JointLimits.default(mirror_model(model))
    np.testing.assert_allclose(left.angles(mirror_pose(poses)), limits.angles(poses), atol=1e-9)


def test_priors_pass_through_jit_as_arguments(model, limits):
    prior = PosePrior.from_model(model)
    energy = jax.jit(lambda pr, lim, p: pr.energy(p) + lim.penalty(p))(prior, limits, jnp.zeros((3, 45)))
    assert energy.shape == (3,)


def test_joint_limits_learnt_from_poses_contain_them(model, limits):
    poses = limits.sample(jax.random.PRNGKey(5), (300,), twist_fraction=0.2) * 0.5
    learnt = JointLimits.from_poses(model, np.asarray(poses), margin_deg=1.0)
    assert learnt.violations(poses) == []
    # Half-range poses learn a region well inside the anatomical one: full-range samples leave it.
    assert len(learnt.violations(limits.sample(jax.random.PRNGKey(6), (50,)))) > 0


def test_shape_prior_is_the_squared_norm():
    betas = jnp.asarray([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(shape_prior(betas), [5.25, 0.0])
