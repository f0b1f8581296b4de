"""Synthetic scan sequences: the properties the registration tests and the demo rely on."""

import numpy as np
import pytest
import trimesh

from mano_jax.priors import JointLimits
from registration.outputs import scan_to_mesh_distance
from registration.synthetic import FOREARM, HAND, OUTLIER, make_sequence


@pytest.fixture(scope="module")
def model():
    from mano_jax import load_model

    return load_model()


@pytest.fixture(scope="module")
def sequence(model):
    return make_sequence(model, num_frames=4, points_per_frame=3000, seed=3)


def test_shapes_counts_and_labels(model, sequence):
    scans, truth = sequence
    v = model.num_vertices
    assert scans.num_frames == 4 and scans.units == "m" and scans.bad_frames == ()
    assert truth.vertices.shape == (4, v, 3) and truth.offsets.shape == (v, 3)
    assert truth.hand_pose.shape == (4, 45) and truth.global_orient.shape == (4, 3) and truth.transl.shape == (4, 3)
    for points, labels in zip(scans.points, truth.labels):
        assert points.shape == (3000, 3) and np.isfinite(points).all()
        counts = np.bincount(labels, minlength=3)
        assert counts[OUTLIER] == 150  # 5% of 3000
        assert counts[FOREARM] > 100 and counts[HAND] > 1500


def test_ground_truth_follows_the_registration_convention(model, sequence):
    _, truth = sequence
    np.testing.assert_allclose(truth.to_result(model).posed_vertices(model), truth.vertices, atol=1e-6)


def test_partial_scan_sees_only_the_side_facing_the_sensor(model):
    kwargs = dict(num_frames=4, points_per_frame=3000, noise=0.0, outlier_ratio=0.0, forearm=False, seed=1)
    facing = {}
    for partial in (True, False):
        scans, truth = make_sequence(model, partial=partial, **kwargs)
        mesh = trimesh.Trimesh(truth.vertices[1], np.asarray(model.faces), process=False)
        points = scans.points[1]
        assert scan_to_mesh_distance(points, mesh.vertices, mesh.faces).max() < 1e-9  # on the surface
        # The normal of the nearest vertex tells which way the surface under each point faces.
        nearest = np.linalg.norm(points[:, None] - mesh.vertices[None, ::2], axis=2).argmin(axis=1) * 2
        normals = mesh.vertex_normals[nearest]
        facing[partial] = np.mean(np.einsum("ij,ij->i", normals, truth.sensor_origin - points) > 0)
    assert facing[True] > 0.97
    assert 0.3 < facing[False] < 0.7  # a full scan covers both sides


def test_noise_level(model):
    scans, truth = make_sequence(
        model, num_frames=4, points_per_frame=4000, partial=False, noise=0.001, outlier_ratio=0.0, forearm=False
    )
    d = scan_to_mesh_distance(scans.points[0], truth.vertices[0], np.asarray(model.faces))
    # |N(0, sigma)| off a locally flat surface: mean 0.80 sigma, median 0.67 sigma.
    assert 0.7e-3 < d.mean() < 0.9e-3
    assert 0.58e-3 < np.median(d) < 0.76e-3


def test_outliers_are_off_the_surface_and_forearm_beyond_the_wrist(model, sequence):
    scans, truth = sequence
    faces = np.asarray(model.faces)
    for t in range(scans.num_frames):
        points, labels = scans.points[t], truth.labels[t]
        d = scan_to_mesh_distance(points, truth.vertices[t], faces)
        assert np.median(d[labels == HAND]) < 0.0015
        # Most outliers are well off the surface; a few land near it by chance (box) or between fingers (clutter).
        assert np.mean(d[labels == OUTLIER] > 0.004) > 0.8
        # The forearm continues past the wrist, away from the fingers (joint 0 wrist, joint 4 middle MCP).
        wrist, mcp = truth.keypoints[t, 0], truth.keypoints[t, 4]
        axis = (wrist - mcp) / np.linalg.norm(wrist - mcp)
        along = (points[labels == FOREARM] - wrist) @ axis
        assert np.percentile(along, 5) > -0.01 and along.max() > 0.05


def test_no_forearm_when_not_asked(model):
    _, truth = make_sequence(model, num_frames=4, points_per_frame=1000, forearm=False)
    assert not np.any(truth.labels[0] == FOREARM)


def test_motion_is_smooth_nontrivial_and_curls_the_fingers_towards_the_palm(model):
    from mano_jax.lbs import axis_angle_to_matrix

    _, truth = make_sequence(model, num_frames=60, points_per_frame=200, seed=0)  # one finger cycle
    v = truth.vertices
    velocity = np.linalg.norm(v[1:] - v[:-1], axis=-1)
    acceleration = np.linalg.norm(v[2:] - 2 * v[1:-1] + v[:-2], axis=-1)
    assert velocity.max() < 0.012  # under 12 mm per frame at 30 fps
    assert acceleration.mean() < 0.3 * velocity.mean()
    assert np.linalg.norm(v[-1] - v[0], axis=-1).mean() > 0.01  # the hand does move

    # In the wrist's own frame (global motion removed), each fingertip moves towards the palm side between
    # the frame where its finger is most open and the one where it is most flexed; the thumb's MCP and IP
    # hinges bend across the palm, towards the little finger's MCP.
    rotations = np.asarray(axis_angle_to_matrix(truth.global_orient))
    local = np.einsum("tkj,tji->tki", truth.keypoints - truth.keypoints[:, :1], rotations)
    rest = np.asarray(model.J_regressor @ model.v_template)
    palm = np.cross(rest[1] - rest[0], rest[7] - rest[0])  # index MCP x pinky MCP: out of a right palm
    palm /= np.linalg.norm(palm)
    for mcp, tip in ((1, 17), (4, 18), (10, 19), (7, 20), (13, 16)):  # index, middle, ring, pinky, thumb
        flexion = np.linalg.norm(truth.hand_pose[:, 3 * (mcp - 1) : 3 * mcp], axis=1)
        assert flexion.max() - flexion.min() > 0.2
        opened, flexed = flexion.argmin(), flexion.argmax()
        if mcp == 13:
            gap = [np.linalg.norm(local[t, tip] - local[t, 7]) for t in (opened, flexed)]
            assert gap[0] - gap[1] > 0.01, gap
        else:
            towards_palm = (local[flexed, tip] - local[opened, tip]) @ palm
            assert towards_palm > 0.01, (mcp, towards_palm)
    # ... and stays inside the default joint limits (which measure the thumb the same way).
    limits = JointLimits.default(model)
    assert float(np.max(np.asarray(limits.penalty(truth.hand_pose)))) == 0.0


def test_subject_offsets_are_smooth_with_the_asked_size(model, sequence):
    _, truth = sequence
    rms = np.sqrt(np.mean(np.sum(truth.offsets**2, axis=1)))
    assert rms == pytest.approx(0.002, rel=1e-6)
    # Along the template's normals, with a height that varies slowly over the surface.
    mesh = trimesh.Trimesh(np.asarray(model.v_template), np.asarray(model.faces), process=False)
    height = np.einsum("ij,ij->i", truth.offsets, mesh.vertex_normals)
    np.testing.assert_allclose(np.abs(height), np.linalg.norm(truth.offsets, axis=1), atol=1e-12)
    a, b = mesh.edges_unique.T
    assert np.abs(height[a] - height[b]).mean() < 0.25 * rms  # white noise would give ~1.1 rms
    assert 0 < np.abs(truth.betas).max() <= 2.0


def test_unordered_set_unknown_units_keypoints_and_seed(model, sequence):
    scans, truth = make_sequence(
        model, num_frames=4, points_per_frame=500, unordered=True, scale=1000.0, keypoint_noise=0.002, seed=5
    )
    assert scans.unordered and scans.units == "unknown" and truth.scale == 1000.0
    assert 50 < np.ptp(scans.points[0], axis=0).max() < 500  # millimetre-sized numbers
    np.testing.assert_allclose(truth.to_result(model).posed_vertices(model), truth.vertices, rtol=1e-5, atol=1e-3)
    assert scans.keypoints.shape == (4, 21, 3)
    assert 0.5 < np.abs(scans.keypoints - truth.keypoints).std() < 4  # 2 mm noise, in mm-scale units
    # Independent poses: consecutive frames differ far more than in a smooth sequence.
    smooth_step = np.abs(np.diff(sequence[1].hand_pose, axis=0)).mean()
    assert np.abs(np.diff(truth.hand_pose, axis=0)).mean() > 5 * smooth_step
    again, _ = make_sequence(
        model, num_frames=4, points_per_frame=500, unordered=True, scale=1000.0, keypoint_noise=0.002, seed=5
    )
    np.testing.assert_array_equal(again.points[2], scans.points[2])
