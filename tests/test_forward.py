"""The forward model: semantics, conventions, batching, transformations and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.spatial.transform import Rotation

import mano_jax
from mano_jax import lbs


def reference_forward(model, hand_pose, betas, global_orient, transl):
    """A deliberately plain NumPy MANO: 4x4 matrices, one joint at a time, no batching."""
    p = {k: np.asarray(v) for k, v in model.numpy().items()}
    v_shaped = p["v_template"] + p["shapedirs"][..., : len(betas)] @ betas
    J = p["J_regressor"] @ v_shaped
    pose = np.concatenate([global_orient, hand_pose]).reshape(16, 3)
    R = Rotation.from_rotvec(pose).as_matrix()
    feat = (R[1:] - np.eye(3)).reshape(-1)
    v_posed = v_shaped + p["posedirs"] @ feat
    G = np.zeros((16, 4, 4))
    for j, parent in enumerate(model.parents):
        local = np.eye(4)
        local[:3, :3] = R[j]
        local[:3, 3] = J[j] - (J[parent] if parent >= 0 else 0)
        G[j] = local if parent < 0 else G[parent] @ local
    joints = G[:, :3, 3] + transl
    A = G.copy()
    A[:, :3, 3] = G[:, :3, 3] - np.einsum("jab,jb->ja", G[:, :3, :3], J)
    T = np.einsum("vj,jab->vab", p["weights"], A)
    verts = np.einsum("vab,vb->va", T[:, :3, :3], v_posed) + T[:, :3, 3] + transl
    return verts, joints


def random_inputs(rng, batch=(), scale=0.6):
    return dict(
        hand_pose=rng.normal(size=batch + (45,)) * scale,
        betas=rng.normal(size=batch + (10,)),
        global_orient=rng.normal(size=batch + (3,)),
        transl=rng.normal(size=batch + (3,)) * 0.1,
    )


def test_matches_plain_reference_implementation(mano_right):
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = random_inputs(rng)
        out = mano_jax.forward(mano_right, **x)
        verts, joints = reference_forward(mano_right, **x)
        np.testing.assert_allclose(out.vertices, verts, atol=1e-12)
        np.testing.assert_allclose(out.joints, joints, atol=1e-12)


def test_rest_pose_is_the_template(mano_right):
    out = mano_jax.forward(mano_right, hand_pose=jnp.zeros(45))
    np.testing.assert_allclose(out.vertices, mano_right.v_template, atol=1e-15)
    np.testing.assert_allclose(out.joints, mano_right.J_regressor @ mano_right.v_template, atol=1e-15)
    np.testing.assert_allclose(out.transforms, np.broadcast_to(np.eye(4), (16, 4, 4)), atol=1e-15)


def test_global_rotation_turns_about_the_wrist_and_transl_comes_after(mano_right):
    rng = np.random.default_rng(2)
    hand_pose = rng.normal(size=45) * 0.5
    still = jax.tree.map(np.asarray, mano_jax.forward(mano_right, hand_pose=hand_pose))
    turned = mano_jax.forward(
        mano_right, hand_pose=hand_pose, global_orient=[0.3, -1.2, 0.7], transl=[0.1, 0.2, -0.3]
    )
    np.testing.assert_allclose(turned.joints[0], still.joints[0] + np.array([0.1, 0.2, -0.3]), atol=1e-14)
    R = Rotation.from_rotvec([0.3, -1.2, 0.7]).as_matrix()
    expected = (still.vertices - still.joints[0]) @ R.T + still.joints[0] + np.array([0.1, 0.2, -0.3])
    np.testing.assert_allclose(turned.vertices, expected, atol=1e-14)


def test_leading_batch_axes_broadcast(mano_right):
    rng = np.random.default_rng(3)
    hand_pose = rng.normal(size=(2, 3, 45)) * 0.4
    betas = rng.normal(size=(3, 10))
    transl = rng.normal(size=(1, 1, 3))
    out = mano_jax.forward(mano_right, hand_pose=hand_pose, betas=betas, transl=transl)
    assert out.vertices.shape == (2, 3, 778, 3)
    assert out.joints.shape == (2, 3, 16, 3)
    assert out.keypoints.shape == (2, 3, 21, 3)
    assert out.transforms.shape == (2, 3, 16, 4, 4)
    one = mano_jax.forward(mano_right, hand_pose=hand_pose[1, 2], betas=betas[2], transl=transl[0, 0])
    np.testing.assert_allclose(out.vertices[1, 2], one.vertices, atol=1e-14)


def test_partial_betas_mean_the_rest_are_zero(mano_right):
    betas = np.array([1.0, -2.0, 0.5])
    short = mano_jax.forward(mano_right, hand_pose=jnp.zeros(45), betas=betas)
    full = mano_jax.forward(mano_right, hand_pose=jnp.zeros(45), betas=np.pad(betas, (0, 7)))
    np.testing.assert_allclose(short.vertices, full.vertices, atol=1e-15)


@pytest.mark.parametrize("num_comps", [6, 45])
@pytest.mark.parametrize("flat_hand_mean", [True, False])
def test_pca_pose_is_the_axis_angle_it_stands_for(mano_right, num_comps, flat_hand_mean):
    coeffs = np.random.default_rng(4).normal(size=(2, num_comps))
    pca = mano_jax.forward(
        mano_right, hand_pose=coeffs, pose_space="pca", num_pca_comps=num_comps, flat_hand_mean=flat_hand_mean
    )
    aa = np.asarray(coeffs @ mano_right.hands_components[:num_comps])
    if not flat_hand_mean:
        aa = aa + np.asarray(mano_right.hands_mean)
    direct = mano_jax.forward(mano_right, hand_pose=aa)
    np.testing.assert_allclose(pca.vertices, direct.vertices, atol=1e-13)


def test_axis_angle_to_pca_is_least_squares_for_a_non_orthonormal_basis(mano_right):
    comps = np.asarray(mano_right.hands_components)
    assert not np.allclose(comps @ comps.T, np.eye(45), atol=1e-3)  # the case that matters
    rng = np.random.default_rng(5)
    coeffs = rng.normal(size=(3, 6))
    pose = mano_jax.pca_to_axis_angle(mano_right, coeffs, flat_hand_mean=False)
    back = mano_jax.axis_angle_to_pca(mano_right, pose, 6, flat_hand_mean=False)
    np.testing.assert_allclose(back, coeffs, atol=1e-10)
    # A pose outside the span: the residual is orthogonal to the span (normal equations).
    pose = rng.normal(size=45)
    c = np.asarray(mano_jax.axis_angle_to_pca(mano_right, pose, 6))
    residual = pose - c @ comps[:6]
    np.testing.assert_allclose(comps[:6] @ residual, 0, atol=1e-10)
    full = mano_jax.axis_angle_to_pca(mano_right, pose, 45)
    np.testing.assert_allclose(mano_jax.pca_to_axis_angle(mano_right, full), pose, atol=1e-10)


def test_mean_and_flat_hand_conventions(mano_right):
    rel = np.random.default_rng(6).normal(size=45) * 0.3
    mean_relative = mano_jax.forward(mano_right, hand_pose=rel, flat_hand_mean=False)
    absolute = mano_jax.forward(mano_right, hand_pose=mano_jax.mean_to_flat(mano_right, rel))
    np.testing.assert_allclose(mean_relative.vertices, absolute.vertices, atol=1e-14)
    np.testing.assert_allclose(
        mano_jax.flat_to_mean(mano_right, mano_jax.mean_to_flat(mano_right, rel)), rel, atol=1e-15
    )
    zero_mean = mano_jax.forward(mano_right, hand_pose=jnp.zeros(45), flat_hand_mean=False)
    assert np.abs(zero_mean.vertices - mano_right.v_template).max() > 1e-3  # the mean hand is not flat


def test_rotation_matrix_input_matches_axis_angle(mano_right):
    x = random_inputs(np.random.default_rng(7), batch=(2,))
    aa = mano_jax.forward(mano_right, **x)
    rot = mano_jax.forward(
        mano_right,
        hand_pose=lbs.axis_angle_to_matrix(x["hand_pose"].reshape(2, 15, 3)),
        global_orient=lbs.axis_angle_to_matrix(x["global_orient"]),
        betas=x["betas"],
        transl=x["transl"],
        pose_space="rotmat",
    )
    np.testing.assert_allclose(rot.vertices, aa.vertices, atol=1e-14)


def test_mirror_model_matches_the_left_file_with_fixed_shapedirs(mano_right, mano_left):
    mirrored = mano_jax.mirror_model(mano_right)
    assert mirrored.side == "left"
    for name, value in mirrored.numpy().items():
        np.testing.assert_allclose(value, mano_left.numpy()[name], atol=1e-15, err_msg=name)
    twice = mano_jax.mirror_model(mirrored)
    for name, value in twice.numpy().items():
        np.testing.assert_array_equal(value, mano_right.numpy()[name], err_msg=name)


def test_mirrored_pose_on_mirrored_model_gives_the_mirror_image(mano_right, mano_left):
    x = random_inputs(np.random.default_rng(8), batch=(3,))
    right = jax.tree.map(np.asarray, mano_jax.forward(mano_right, **x))
    left = mano_jax.forward(
        mano_left,
        hand_pose=mano_jax.mirror_pose(x["hand_pose"]),
        global_orient=mano_jax.mirror_pose(x["global_orient"]),
        betas=x["betas"],
        transl=x["transl"] * np.array([-1.0, 1.0, 1.0]),
    )
    flip = np.array([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(left.vertices, right.vertices * flip, atol=1e-13)
    np.testing.assert_allclose(left.joints, right.joints * flip, atol=1e-13)
    np.testing.assert_allclose(mano_jax.mirror_pose(mano_jax.mirror_pose(x["hand_pose"])), x["hand_pose"])


def test_keypoints_hold_joints_and_fingertips_in_both_orders(mano_right):
    out = mano_jax.forward(mano_right, hand_pose=np.random.default_rng(9).normal(size=45) * 0.5)
    np.testing.assert_array_equal(out.keypoints[:16], out.joints)
    np.testing.assert_array_equal(out.keypoints[16:], out.vertices[np.asarray(mano_right.tip_ids)])
    op = mano_jax.forward(
        mano_right, hand_pose=np.random.default_rng(9).normal(size=45) * 0.5, keypoint_order="openpose"
    )
    np.testing.assert_array_equal(op.keypoints, out.keypoints[np.asarray(mano_jax.OPENPOSE_ORDER)])
    np.testing.assert_array_equal(op.keypoints[np.asarray(mano_jax.MANO_FROM_OPENPOSE)], out.keypoints)
    np.testing.assert_array_equal(op.keypoints[4], out.vertices[mano_right.tip_ids[0]])  # thumb tip
    np.testing.assert_array_equal(op.keypoints[1], out.joints[13])  # thumb MCP


def test_transforms_skin_the_posed_template(mano_right):
    x = random_inputs(np.random.default_rng(10))
    out = mano_jax.forward(mano_right, **x)
    p = mano_right.numpy()
    R = lbs.axis_angle_to_matrix(x["hand_pose"].reshape(15, 3))
    v_posed = p["v_template"] + p["shapedirs"] @ x["betas"] + p["posedirs"] @ np.asarray(lbs.pose_features(R))
    T = np.einsum("vj,jab->vab", mano_right.weights, out.transforms)
    skinned = np.einsum("vab,vb->va", T[:, :3, :3], v_posed) + T[:, :3, 3]
    np.testing.assert_allclose(skinned, out.vertices, atol=1e-13)


def test_jit_vmap_and_jacfwd(mano_right):
    x = random_inputs(np.random.default_rng(11), batch=(4,))
    batched = mano_jax.forward(mano_right, **x).vertices

    @jax.jit
    def verts(model, hand_pose, betas, global_orient, transl):
        return mano_jax.forward(
            model, hand_pose=hand_pose, betas=betas, global_orient=global_orient, transl=transl
        ).vertices

    args = (x["hand_pose"], x["betas"], x["global_orient"], x["transl"])
    np.testing.assert_allclose(verts(mano_right, *args), batched, atol=1e-13)
    mapped = jax.vmap(verts, in_axes=(None, 0, 0, 0, 0))(mano_right, *args)
    np.testing.assert_allclose(mapped, batched, atol=1e-13)

    def from_params(params):
        return verts(mano_right, params[3:48], params[48:58], params[:3], params[58:])

    params = jnp.concatenate([x["global_orient"][0], x["hand_pose"][0], x["betas"][0], x["transl"][0]])
    jac = jax.jacfwd(from_params)(params)
    assert jac.shape == (778, 3, 61)
    np.testing.assert_allclose(jac, jax.jacrev(from_params)(params), atol=1e-10)
    np.testing.assert_allclose(jac[..., 58:], np.broadcast_to(np.eye(3), (778, 3, 3)), atol=1e-14)


@pytest.mark.parametrize("at_zero", [True, False])
def test_gradients_match_finite_differences(mano_right, at_zero):
    rng = np.random.default_rng(12)
    x = random_inputs(rng, scale=0.0 if at_zero else 0.6)
    if at_zero:
        x["global_orient"] = np.zeros(3)
    weights = rng.normal(size=(778, 3))

    def loss(hand_pose, betas, global_orient, transl):
        out = mano_jax.forward(
            mano_right, hand_pose=hand_pose, betas=betas, global_orient=global_orient, transl=transl
        )
        return jnp.sum(out.vertices * weights) + jnp.sum(out.keypoints**2)

    check_grads(jax.jit(loss), tuple(x.values()), order=1, modes=("fwd", "rev"), eps=1e-5)


def test_float32_model_agrees_with_float64(mano_right):
    x = random_inputs(np.random.default_rng(13), batch=(3,))
    out64 = mano_jax.forward(mano_right, **x)
    out32 = mano_jax.forward(mano_right.astype(jnp.float32), **x)
    assert out32.vertices.dtype == jnp.float32
    np.testing.assert_allclose(out32.vertices, out64.vertices, atol=2e-6)


def test_rodrigues_and_its_inverse():
    rng = np.random.default_rng(14)
    aa = rng.normal(size=(500, 3)) * 1.5
    aa[:3] = [[0.0, 0.0, 0.0], [1e-9, -2e-9, 0.0], [0.0, 0.0, np.pi - 1e-7]]
    aa[3] = np.array([1.0, 2.0, -1.0]) / np.sqrt(6) * (np.pi - 1e-4)
    R = lbs.axis_angle_to_matrix(aa)
    np.testing.assert_allclose(R, Rotation.from_rotvec(aa).as_matrix(), atol=1e-14)
    back = lbs.matrix_to_axis_angle(R)
    np.testing.assert_allclose(lbs.axis_angle_to_matrix(back), R, atol=1e-12)
    small = np.linalg.norm(aa, axis=1) < np.pi - 1e-3
    wrapped = Rotation.from_matrix(np.asarray(R)).as_rotvec()
    np.testing.assert_allclose(back[small], wrapped[small], atol=1e-10)


def test_rotation_gradients_are_finite_at_the_identity():
    check_grads(jax.jit(lbs.axis_angle_to_matrix), (jnp.zeros(3),), order=2, modes=("fwd", "rev"))
    jac = jax.jacfwd(lambda a: lbs.matrix_to_axis_angle(lbs.axis_angle_to_matrix(a)))(jnp.zeros(3))
    np.testing.assert_allclose(jac, np.eye(3), atol=1e-12)
    at = lbs.axis_angle_to_matrix(jnp.array([0.3, -0.2, 0.9]))
    check_grads(jax.jit(lbs.matrix_to_axis_angle), (at,), order=1, modes=("fwd", "rev"))


def test_rodrigues_is_accurate_in_float32_near_zero():
    aa = jnp.asarray([[1e-4, 0.0, 0.0], [0.0, 3e-3, 1e-3], [1e-7, 1e-7, 0.0]], jnp.float32)
    R = lbs.axis_angle_to_matrix(aa)
    np.testing.assert_allclose(R, Rotation.from_rotvec(np.asarray(aa, np.float64)).as_matrix(), atol=1e-7)


def test_procrustes_recovers_a_similarity_and_weights_select_points():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(2, 40, 3))
    rot = Rotation.random(2, random_state=4).as_matrix()
    t, s = rng.normal(size=(2, 3)), np.array([0.7, 1.9])
    dst = s[:, None, None] * np.einsum("bij,bnj->bni", rot, src) + t[:, None, :]
    r_fit, t_fit, s_fit = lbs.procrustes(jnp.asarray(src), jnp.asarray(dst), solve_scale=True)
    np.testing.assert_allclose(r_fit, rot, atol=1e-12)
    np.testing.assert_allclose(t_fit, t, atol=1e-12)
    np.testing.assert_allclose(s_fit, s, atol=1e-12)
    # A reflection is not a rotation: the best proper rotation is returned (det +1).
    mirrored = src * np.array([1.0, 1.0, -1.0])
    r_mirror, _, _ = lbs.procrustes(jnp.asarray(src[0]), jnp.asarray(mirrored[0]))
    np.testing.assert_allclose(np.linalg.det(r_mirror), 1.0, atol=1e-12)
    # Zero weights drop points: garbage there changes nothing; one shared source, two weightings.
    spoiled = dst[0].copy()
    spoiled[:10] += 5.0
    weights = np.ones((2, 40))
    weights[:, :10] = 0.0
    weights[1, 10:20] = 3.0
    r_w, t_w, s_w = lbs.procrustes(jnp.asarray(src[0]), jnp.asarray(spoiled), jnp.asarray(weights), scale=s[0])
    np.testing.assert_allclose(r_w, np.broadcast_to(rot[0], (2, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(t_w, np.broadcast_to(t[0], (2, 3)), atol=1e-12)
    np.testing.assert_allclose(s_w, [s[0], s[0]])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hand_pose=np.zeros(48)), r"hand_pose: expected shape \(\*, 45\)"),
        (dict(hand_pose=np.zeros(45), betas=np.zeros(11)), "betas"),
        (dict(hand_pose=np.zeros((2, 45)), transl=np.zeros((3, 3))), "do not broadcast"),
        (dict(hand_pose=np.zeros(45), pose_space="euler"), "pose_space"),
        (dict(hand_pose=np.zeros(6), pose_space="pca", num_pca_comps=10), "num_pca_comps=10"),
        (dict(hand_pose=np.zeros(46), pose_space="pca"), "1 <= K <= 45"),
        (dict(hand_pose=np.zeros((15, 3, 3)), pose_space="rotmat", flat_hand_mean=False), "rotmat"),
        (dict(hand_pose=np.zeros(45), global_orient=np.zeros(4)), "global_orient"),
        (dict(hand_pose=np.zeros(45), keypoint_order="coco"), "keypoint_order"),
    ],
)
def test_bad_arguments_are_named(mano_right, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mano_jax.forward(mano_right, **kwargs)


def test_large_batches_posed_in_chunks_match_single_hands(mano_right):
    from mano_jax.posing import _CHUNK

    n = _CHUNK + 3  # one full chunk and a padded one
    x = random_inputs(np.random.default_rng(15), batch=(n,))
    out = mano_jax.forward(mano_right, **x)
    for i in (0, _CHUNK - 1, _CHUNK, n - 1):
        one = mano_jax.forward(mano_right, **{k: v[i] for k, v in x.items()})
        np.testing.assert_allclose(out.vertices[i], one.vertices, atol=1e-13)
        np.testing.assert_allclose(out.transforms[i], one.transforms, atol=1e-13)


def test_closed_form_jacobian_equals_autodiff(mano_right):
    rng = np.random.default_rng(16)
    x = random_inputs(rng, batch=(2,))
    x["hand_pose"][1, :9] = 0.0  # joints at the zero rotation, where the right Jacobian is a series
    x["global_orient"][1] = 0.0
    vertices, jac = mano_jax.vertex_jacobian(mano_right, **x)
    assert jac.shape == (2, 778, 3, 61)

    def flat(params):
        return mano_jax.forward(
            mano_right, global_orient=params[:3], hand_pose=params[3:48], betas=params[48:58], transl=params[58:]
        ).vertices

    params = np.concatenate([x["global_orient"], x["hand_pose"], x["betas"], x["transl"]], axis=-1)
    reference = jax.vmap(jax.jacfwd(flat))(params)
    np.testing.assert_allclose(jac, reference, atol=1e-13)
    np.testing.assert_allclose(vertices, mano_jax.forward(mano_right, **x).vertices, atol=1e-14)
    _, short = mano_jax.vertex_jacobian(mano_right, hand_pose=x["hand_pose"][0], betas=x["betas"][0, :3])
    assert short.shape == (778, 3, 61)  # the Jacobian always covers all shape components
