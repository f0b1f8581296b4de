"""Learning a hand model from synthetic registrations of a planted ground truth (mano_jax.learn).

One small data set (6 hands x 20 poses, planted local correctives, 4 planted shape directions, 6
planted pose synergies) is learned once per configuration and shared by the tests. Its noise is
0.1 mm, not the issue's 0.5 mm: with 96 training registrations, 0.5 mm of noise leaves the
correctives and subspaces uncertain by more than a broken step would change them, so thresholds
would be either flaky or toothless. The issue's setting (0.5 mm, 2,000 registrations) is measured by
bench/learning.py. Three iterations instead of the default five keep the tests fast.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mano_jax import forward, io, lbs
from mano_jax.learn import blendshapes, locality, pose_fit, skinning
from mano_jax.learn.data import Registrations, load_registrations, save_registrations
from mano_jax.learn.evaluate import fit_error, pose_space_error, principal_angles
from mano_jax.learn.synthetic import make_dataset, perturb_skinning, skinning_errors
from mano_jax.learn.trainer import LearnConfig, learn


NOISE = 1e-4
"""Standard deviation of the synthetic registrations' noise per coordinate, metres."""
FLOOR = np.sqrt(3) * NOISE
"""RMS vertex error of a perfect fit to the noisy registrations."""


@pytest.fixture(scope="module")
def model():
    return io.load_model(dtype=jnp.float64)


@pytest.fixture(scope="module")
def data(model):
    regs, truth = make_dataset(model, num_subjects=6, per_subject=20, noise=NOISE, seed=3)
    held = np.zeros(regs.num, bool)
    held[np.arange(0, regs.num, 5)] = True
    return regs, truth, held


def _learn(model, regs, **config):
    return learn(regs, model, LearnConfig(**{"iterations": 3, **config}), progress=False)


@pytest.fixture(scope="module")
def learned(model, data):
    regs, _, held = data
    return _learn(model, regs.subset(np.flatnonzero(~held)))


def _held_out_model_error(result, data):
    regs, truth, held = data
    test = regs.subset(np.flatnonzero(held))
    keys, index = test.template_keys()
    lookup = {k: i for i, k in enumerate(result.hand_keys)}
    hands = np.array([lookup[k] for k in keys])[index]
    return fit_error(result.model, result.templates, hands, test.to_right(), reference=truth.clean_vertices[held])


def _corrective_error(posedirs, truth, poses):
    f = np.asarray(blendshapes.pose_features(jnp.asarray(poses)))
    learned = np.einsum("nf,vcf->nvc", f, np.asarray(posedirs))
    planted = np.einsum("nf,vcf->nvc", f, np.asarray(truth.model.posedirs))
    return np.linalg.norm(learned - planted) / np.linalg.norm(planted)


# --- pieces ---------------------------------------------------------------------------------------


def test_pose_vertices_is_forward_with_the_template(model):
    rng = np.random.default_rng(0)
    m = model.replace(posedirs=jnp.asarray(rng.normal(size=model.posedirs.shape) * 1e-3))
    template = m.v_template + 0.002
    pose, orient, transl = rng.normal(size=45) * 0.4, rng.normal(size=3), rng.normal(size=3) * 0.1
    ours = jax.jit(pose_fit.pose_vertices)(m, template, lbs.axis_angle_to_matrix(jnp.asarray(orient)),
                                           jnp.asarray(pose), jnp.asarray(transl))  # fmt: skip
    ref = forward(m.replace(v_template=template), hand_pose=pose, global_orient=orient, transl=transl).vertices
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_analytic_normal_equations_match_autodiff(model):
    rng = np.random.default_rng(1)
    m = model.replace(posedirs=jnp.asarray(rng.normal(size=model.posedirs.shape) * 1e-3))
    template, pose = m.v_template, jnp.asarray(rng.normal(size=45) * 0.4)
    rot, transl = lbs.axis_angle_to_matrix(jnp.asarray(rng.normal(size=3))), jnp.asarray(rng.normal(size=3) * 0.1)
    joints = pose_fit.rest_joints(m, template)
    target = pose_fit.pose_vertices(m, template, rot, pose, transl) + 0.01
    h, g, parent_r = jax.jit(pose_fit._normal_equations)(m, template, joints, rot, pose, transl, target)
    x = template + pose_fit.correctives(m, pose)

    def residual(delta):  # the step the fitter takes, correctives held fixed as in its Jacobian
        local = jnp.einsum("jba,jb->ja", parent_r[1:], delta[3:48].reshape(15, 3))
        turned = lbs.axis_angle_to_matrix(local) @ lbs.axis_angle_to_matrix(pose.reshape(15, 3))
        rots = jnp.concatenate([(lbs.axis_angle_to_matrix(delta[:3]) @ rot)[None], turned])
        world, posed = lbs.kinematic_chain(rots, joints, m.parents)
        t = lbs.skinning_transforms(world, posed + (transl + delta[48:])[None], joints)
        return (lbs.skin(x, m.weights, t) - target).reshape(-1)

    jac, r = jax.jit(lambda d: (jax.jacfwd(residual)(d), residual(d)))(jnp.zeros(51))
    np.testing.assert_allclose(h, jac.T @ jac, rtol=1e-9, atol=1e-12 * float(jnp.abs(h).max()))
    np.testing.assert_allclose(g, jac.T @ r, rtol=1e-9, atol=1e-14)


def test_pose_fit_recovers_poses_from_any_global_orientation(data):
    regs, truth, _ = data
    idx = np.arange(0, regs.num, 10)
    poses, rms = pose_fit.fit_poses(truth.model, truth.templates, truth.hand_index[idx], regs.to_right()[idx],
                                    iterations=8)  # fmt: skip
    assert np.all(np.asarray(rms) < 1.2 * FLOOR)
    r_fit = lbs.axis_angle_to_matrix(poses.hand_pose.reshape(-1, 15, 3))
    r_true = lbs.axis_angle_to_matrix(jnp.asarray(truth.hand_pose[idx]).reshape(-1, 15, 3))
    angle = np.linalg.norm(np.asarray(lbs.matrix_to_axis_angle(jnp.swapaxes(r_fit, -1, -2) @ r_true)), axis=-1)
    assert np.median(np.degrees(angle)) < 1.5


def test_pca_restricted_fit_reaches_the_noise_floor_inside_the_subspace(data):
    regs, truth, _ = data
    idx = np.arange(0, regs.num, 10)
    # The planted synergies first, completed to an orthonormal basis of all 45 directions.
    q, _ = np.linalg.qr(np.concatenate([truth.pose_basis.T, np.eye(45)], axis=1))
    m = truth.model.replace(hands_components=jnp.asarray(q[:, :45].T), hands_mean=jnp.zeros(45))
    errors = {k: pose_space_error(m, truth.templates, truth.hand_index[idx], regs.to_right()[idx], k).mean()
              for k in (0, 6, 45)}  # fmt: skip
    assert errors[6] < 0.6 * errors[0]  # six synergies explain most of what the flat hand cannot
    assert errors[45] < 1.2 * FLOOR  # all directions: the noise floor, jitter included


def test_cost_matrix_is_zero_near_the_joint_and_grows_quadratically(model):
    d = locality.joint_distances(model.v_template, model.faces, model.J_regressor @ model.v_template)
    assert d.shape == (15, model.num_vertices) and np.all(d >= 0) and np.all(d.min(axis=1) == 0)
    c = locality.cost_matrix(d, radius=0.015, scale=0.01, weight=2.0)
    assert np.all(c[d <= 0.015] == 0)
    far = d > 0.02
    np.testing.assert_allclose(c[far], 2.0 * ((d[far] - 0.015) / 0.01) ** 2)
    # the index DIP's corrective is free at the index tip's neighbourhood, not at the thumb tip
    tips = model.tip_ids
    assert d[2, tips[1]] < 0.03 < d[2, tips[0]]


def test_posedirs_solve_recovers_planted_correctives_given_true_poses(data):
    regs, truth, _ = data
    poses = pose_fit.Poses(lbs.axis_angle_to_matrix(jnp.asarray(truth.global_orient)),
                           jnp.asarray(truth.hand_pose), jnp.asarray(truth.transl))  # fmt: skip
    from mano_jax.learn.templates import unpose

    rest, _ = unpose(truth.model, truth.templates, truth.hand_index, poses, regs.to_right())
    cost = locality.cost_matrix(truth.distances, weight=100.0)
    features = blendshapes.pose_features(poses.hand_pose)
    p, templates = blendshapes.solve_posedirs(rest, features, truth.hand_index, 6, cost)
    assert _corrective_error(p, truth, truth.hand_pose) < 0.1
    assert np.abs(np.asarray(templates) - truth.templates).max() < 1e-3


def _true_poses(truth):
    return pose_fit.Poses(lbs.axis_angle_to_matrix(jnp.asarray(truth.global_orient)),
                          jnp.asarray(truth.hand_pose), jnp.asarray(truth.transl))  # fmt: skip


def _weights_error(weights, truth):
    return skinning_errors(truth.model.replace(weights=jnp.asarray(weights)), truth)["weights_l1"]


def test_simplex_projection_is_exact_and_respects_the_support():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(200, 16))
    support = rng.random((200, 16)) < 0.4
    support[:, 0] = True
    x = np.asarray(skinning.project_simplex(jnp.asarray(y), jnp.asarray(support)))
    assert (x >= 0).all() and (x[~support] == 0).all()
    np.testing.assert_allclose(x.sum(1), 1.0, atol=1e-12)
    # optimality (KKT): on the support, entries kept are y - tau and entries at 0 have y <= tau
    for row, yy, s in zip(x, y, support):
        tau = (yy - row)[row > 0]
        assert np.ptp(tau) < 1e-12 and (yy[s & (row == 0)] <= tau[0] + 1e-12).all()


def test_weights_solved_with_the_correctives_response_recover_planted_weights_given_true_poses(model, data):
    """The correctives may take over whatever they can (locality cost as in learning): what is left of a
    weight error is what the correctives cannot explain, and it still points to the planted weights."""
    regs, truth, _ = data
    start = perturb_skinning(truth.model, np.random.default_rng(7)).replace(J_regressor=truth.model.J_regressor)
    support = skinning.weight_support(start.weights, model.parents)
    cost = locality.cost_matrix(truth.distances, weight=100.0)
    w = np.asarray(skinning.refine_weights(start, truth.templates, truth.hand_index, _true_poses(truth),
                                           regs.to_right(), np.ones(regs.num, bool), start.weights, support,
                                           cost, ridge=1e-4))  # fmt: skip
    before, after = _weights_error(start.weights, truth), _weights_error(w, truth)
    assert after < before / 2, (before, after)  # measured 0.186 -> 0.084
    assert (w >= 0).all() and (w[~support] == 0).all()
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)


def test_joints_solved_with_templates_and_the_regressor_recover_planted_joints_given_true_poses(data):
    regs, truth, _ = data
    start = perturb_skinning(truth.model, np.random.default_rng(7)).replace(weights=truth.model.weights)
    true_joints = np.einsum("jv,hva->hja", np.asarray(truth.model.J_regressor), truth.templates)
    templates, joints = skinning.fit_templates_and_joints(start, truth.templates, truth.hand_index,
                                                          _true_poses(truth), regs.to_right(),
                                                          np.ones(regs.num, bool))  # fmt: skip
    assert 1e3 * np.linalg.norm(joints - true_joints, axis=-1).mean() < 0.5  # measured 0.17 mm
    r = np.asarray(skinning.refine_regressor(templates, joints, start.J_regressor, ridge=1e-3))
    before = skinning_errors(start, truth)["joints_mm"]
    after = skinning_errors(truth.model.replace(J_regressor=jnp.asarray(r)), truth)["joints_mm"]
    assert after < before / 5, (before, after)  # measured 2.72 -> 0.16 mm
    assert (r >= 0).all() and (r[np.asarray(start.J_regressor) == 0] == 0).all()
    np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-6)


def test_rigid_free_removes_exactly_rigid_correctives(model, data):
    _, truth, _ = data
    joints = np.asarray(model.J_regressor @ model.v_template)
    rel = np.asarray(model.v_template) - joints[5]
    rigid = np.zeros((model.num_vertices, 3, 135))
    w = np.array([0.3, -0.2, 0.5])
    rigid[:, :, 36] = (np.cross(w, rel) + [0.001, 0.0, 0.002]) * (truth.distances[4] < truth.radius)[:, None]
    out = blendshapes.rigid_free(rigid, model.v_template, joints, truth.distances, truth.radius)
    assert np.abs(np.asarray(out)).max() < 1e-12
    # planted (already rigid-free) correctives are left alone
    again = blendshapes.rigid_free(truth.model.posedirs, model.v_template, joints, truth.distances, truth.radius)
    np.testing.assert_allclose(again, truth.model.posedirs, atol=1e-12)


# --- learning: the evidence on a small set ----------------------------------------------------------


def test_learned_correctives_match_planted_on_held_out_poses(learned, data):
    _, truth, held = data
    assert _corrective_error(learned.model.posedirs, truth, truth.hand_pose[held]) < 0.25  # measured 0.14


def test_learned_model_halves_held_out_error_of_learning_without_pose_blend_shapes(model, data, learned):
    regs, _, held = data
    baseline = _learn(model, regs.subset(np.flatnonzero(~held)), learn_posedirs=False)
    ours = _held_out_model_error(learned, data).mean()
    theirs = _held_out_model_error(baseline, data).mean()
    assert ours < 0.3 * theirs, (ours, theirs)  # measured 0.14


def test_cost_matrix_keeps_correctives_local(model, data, learned):
    regs, truth, held = data
    leak = locality.leakage(learned.model.posedirs, truth.distances, truth.radius)
    assert np.nanmax(leak) < 0.05
    free = _learn(model, regs.subset(np.flatnonzero(~held)), locality=False)
    leak_free = locality.leakage(free.model.posedirs, truth.distances, truth.radius)
    assert np.nanmean(leak_free) > 5 * np.nanmean(leak) and np.nanmax(leak_free) > 0.05


def test_pose_space_recovers_planted_synergies(learned, data):
    _, truth, _ = data
    angles = principal_angles(learned.pose_space.hands_components[:6], truth.pose_basis)
    assert angles.max() < 12.0, angles  # measured 9.8; PCA of 96 poses
    assert learned.pose_space.explained[5] > 0.9  # six components carry most of the variance


def test_shape_space_recovers_planted_shape_directions(learned, data):
    _, truth, _ = data
    learned_dirs = np.asarray(learned.model.shapedirs)[:, :, :4].reshape(-1, 4).T
    angles = principal_angles(learned_dirs, np.asarray(truth.model.shapedirs).reshape(-1, 4).T)
    assert angles[:2].max() < 5.0 and angles.max() < 10.0, angles  # measured 0.5, 2.4, 2.9, 6.1
    assert learned.shape_space.explained[3] > 0.99
    assert np.abs(learned.templates - truth.templates).max() < 1e-3


def test_first_templates_down_weighting_posed_registrations_helps(model, data):
    regs, truth, held = data
    train = regs.subset(np.flatnonzero(~held))
    index = truth.hand_index[~held]
    errors = {}
    for sigma in (0.25, 1e3):
        result = _learn(model, train, iterations=0, flat_sigma=sigma)
        keys = [int(k[1:3]) for k in result.hand_keys]  # "s03/right" -> 3
        assert sorted(keys) == sorted(set(index))
        errors[sigma] = np.abs(result.templates - truth.templates[keys]).mean()
    # Measured 0.89: near-flat registrations are unposed with less skinning error. (The planted mean
    # corrective is not absorbed either way here: the first templates live in the starting shape space.)
    assert errors[0.25] < 0.95 * errors[1e3], errors


def test_mirrored_left_registrations_learn_the_same_model(model, data, learned):
    regs, _, held = data
    train = regs.subset(np.flatnonzero(~held))
    left = Registrations(train.vertices * np.array([-1.0, 1.0, 1.0]), train.subject, ~train.is_left, train.names)
    result = _learn(model, left)
    for name in ("v_template", "shapedirs", "posedirs", "hands_mean", "hands_var"):
        np.testing.assert_allclose(getattr(result.model, name), getattr(learned.model, name), atol=1e-9)
    # the learned left model is the mirror image of the right one
    pose = np.asarray(learned.poses.hand_pose[:3])
    right = forward(learned.model, hand_pose=pose).vertices
    left_v = forward(learned.left_model, hand_pose=pose * np.tile([1.0, -1.0, -1.0], 15)).vertices
    np.testing.assert_allclose(left_v, np.asarray(right) * np.array([-1.0, 1.0, 1.0]), atol=1e-12)


def test_weights_and_regressor_are_kept_bit_identical_without_the_flags(model, learned):
    assert np.array_equal(np.asarray(learned.model.weights), np.asarray(model.weights))
    assert np.array_equal(np.asarray(learned.model.J_regressor), np.asarray(model.J_regressor))


def test_refinement_moves_perturbed_weights_and_regressor_towards_the_planted_ones(model, data, tmp_path):
    """Registrations made with the open hand's weights and regressor, learning started from perturbed
    ones: with both flags, both move towards the planted ones and the held-out error falls."""
    regs, truth, held = data
    train = regs.subset(np.flatnonzero(~held))
    start = perturb_skinning(model, np.random.default_rng(7))
    plain = _learn(start, train)
    refined = _learn(start, train, refine_weights=True, refine_regressor=True)
    before, after = skinning_errors(start, truth), skinning_errors(refined.model, truth)
    assert skinning_errors(plain.model, truth) == before
    # Three iterations move them part of the way (measured: weights 0.186 -> 0.165, joints 2.72 -> 2.51 mm;
    # with each flag alone 0.186 -> 0.110 and 2.72 -> 2.13 mm; bench/learning.py --refine for 8).
    assert after["weights_l1"] < 0.93 * before["weights_l1"], (before, after)
    assert after["joints_mm"] < 0.96 * before["joints_mm"], (before, after)
    err_plain = _held_out_model_error(plain, data).mean()
    err_refined = _held_out_model_error(refined, data).mean()
    assert err_refined < 0.6 * err_plain, (err_plain, err_refined)  # measured 0.771 -> 0.365 mm
    w = np.asarray(refined.model.weights)
    assert (w >= 0).all() and (w[~skinning.weight_support(start.weights, start.parents)] == 0).all()
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    r = np.asarray(refined.model.J_regressor)
    assert (r >= 0).all() and (r[np.asarray(start.J_regressor) == 0] == 0).all()
    loaded = io.load_model(io.save_model(refined.model, tmp_path / "refined.npz"), dtype=jnp.float64)
    np.testing.assert_array_equal(np.asarray(loaded.weights), w)


def test_learned_model_saves_loads_and_poses(learned, tmp_path):
    path = io.save_model(learned.model, tmp_path / "learned.npz")
    loaded = io.load_model(path, dtype=jnp.float64)
    out = forward(loaded, hand_pose=np.zeros((2, 6)), betas=np.ones((2, 3)), pose_space="pca")
    assert out.vertices.shape == (2, learned.model.num_vertices, 3)
    np.testing.assert_allclose(loaded.posedirs, learned.model.posedirs)
    np.testing.assert_allclose(np.asarray(loaded.hands_components) @ np.asarray(loaded.hands_components).T,
                               np.eye(45), atol=1e-9)  # fmt: skip


# --- interfaces and bad input -------------------------------------------------------------------------


def test_cli_learns_from_an_npz_and_resumes_from_its_checkpoint(data, tmp_path, capsys):
    from mano_jax.cli import main

    regs, _, held = data
    src = save_registrations(regs.subset(np.flatnonzero(~held)), tmp_path / "regs.npz")
    out = tmp_path / "model.npz"
    argv = ["learn", str(src), "--out", str(out), "--iterations", "1", "--quiet",
            "--checkpoint-dir", str(tmp_path / "ckpt")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert [h["iteration"] for h in report["iterations"]] == [0, 1]
    printed = capsys.readouterr().out
    assert "data error" in printed and "locality" in printed
    learned = io.load_model(out, dtype=jnp.float64)
    assert learned.side == "right" and io.load_model(tmp_path / "model_left.npz").side == "left"
    posed = forward(learned, hand_pose=np.full(45, 0.2), betas=np.ones(2)).vertices
    assert posed.shape == (learned.num_vertices, 3) and np.isfinite(np.asarray(posed)).all()
    # asking for one more iteration resumes after the saved ones instead of starting over
    assert main(argv[:5] + ["2"] + argv[6:]) == 0
    again = json.loads(out.with_suffix(".report.json").read_text())
    assert again["iterations"][:2] == report["iterations"]
    assert len(again["iterations"]) == 3


def test_cli_names_a_bad_registrations_file(tmp_path, capsys):
    from mano_jax.cli import main

    bad = tmp_path / "scans.npz"
    bad.write_bytes(b"not a zip file")
    assert main(["learn", str(bad), "--out", str(tmp_path / "m.npz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mano-jax learn: error:" in err and "scans.npz" in err and "unreadable" in err, err
    assert not (tmp_path / "m.npz").exists()


def test_cli_names_a_negative_ridge(tmp_path, capsys):
    from mano_jax.cli import main

    assert main(["learn", str(tmp_path / "r.npz"), "--out", str(tmp_path / "m.npz"), "--refine-weights",
                 "--weights-ridge", "-1", "--quiet"]) == 2  # fmt: skip
    assert "--weights-ridge must be non-negative" in capsys.readouterr().err
    with pytest.raises(ValueError, match="LearnConfig.regressor_ridge"):
        LearnConfig(regressor_ridge=-1.0)


def test_bad_registrations_are_refused_with_the_file_and_problem(model, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, verts=np.zeros((2, 10, 3)))
    with pytest.raises(ValueError, match="bad.npz.*'vertices'"):
        load_registrations(bad)
    nan = np.zeros((2, model.num_vertices, 3))
    nan[1, 7, 0] = np.nan
    with pytest.raises(ValueError, match="NaN.*registration 1"):
        Registrations.from_arrays(nan)
    with pytest.raises(ValueError, match="10 vertices.*1669"):
        learn(Registrations.from_arrays(np.zeros((3, 10, 3))), model, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_registrations(tmp_path / "missing.npz")
