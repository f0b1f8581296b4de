"""Loading scan sequences: formats, order, units, keypoints and every kind of bad input."""

import json

import numpy as np
import pytest
import trimesh

from registration.outputs import scan_to_mesh_distance
from registration.scans import (
    MESH_SAMPLES,
    MIN_POINTS,
    ScanError,
    ScanSequence,
    ScanWarning,
    load_scans,
    save_scans,
)


def hand_sized_cloud(n=500, size=0.2, seed=0):
    """Points in a box of `size` (the extent of a hand + wrist)."""
    return np.random.default_rng(seed).uniform(0, size / np.sqrt(3), (n, 3))


def dense_grid_mesh(size=0.1, n=100):
    """A flat n x n vertex grid (edge size/n, i.e. a scanner-density mesh)."""
    u, v = np.meshgrid(np.linspace(0, size, n), np.linspace(0, size, n), indexing="ij")
    vertices = np.stack([u.ravel(), v.ravel(), 0.01 * np.sin(20 * u.ravel())], axis=1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([c, b, d], 1)])
    return trimesh.Trimesh(vertices, faces, process=False)


def test_directory_of_every_format_loads_in_natural_order(tmp_path):
    mesh = dense_grid_mesh()
    mesh.export(tmp_path / "frame_10.ply")
    mesh.export(tmp_path / "frame_9.obj")
    mesh.export(tmp_path / "frame_1.stl")
    np.save(tmp_path / "frame_2.npy", hand_sized_cloud())
    cloud6 = np.concatenate([hand_sized_cloud(), np.tile([0.0, 0.0, 1.0], (500, 1))], axis=1)
    np.save(tmp_path / "frame_3.npy", cloud6)
    np.savetxt(tmp_path / "frame_4.xyz", hand_sized_cloud(seed=1), header="x y z")
    trimesh.PointCloud(hand_sized_cloud(seed=2)).export(tmp_path / "frame_5.ply")
    (tmp_path / ".hidden").write_text("ignored")

    scans = load_scans(tmp_path)

    assert scans.names == ("frame_1.stl", "frame_2.npy", "frame_3.npy", "frame_4.xyz", "frame_5.ply", "frame_9.obj", "frame_10.ply")
    assert scans.units == "m" and scans.unit_scale == 1.0
    assert [len(p) for p in scans.points[1:5]] == [500, 500, 500, 500]
    np.testing.assert_allclose(scans.points[1], np.load(tmp_path / "frame_2.npy"))
    # Dense meshes: their vertices with unit vertex normals.
    for i in (0, 5, 6):
        assert len(scans.points[i]) == len(mesh.vertices)
        assert scans.normals[i] is not None
        np.testing.assert_allclose(np.linalg.norm(scans.normals[i], axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(scans.normals[2], np.tile([0.0, 0.0, 1.0], (500, 1)))
    assert scans.normals[1] is None and scans.normals[3] is None


def test_sparse_mesh_is_sampled_on_its_surface(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=0.1)  # 42 vertices: far too sparse to use as is
    sphere.export(tmp_path / "coarse.ply")
    scans = load_scans(tmp_path / "coarse.ply")
    assert len(scans.points[0]) == MESH_SAMPLES
    # PLY stores float32 coordinates: on the surface to well below a micrometre.
    assert scan_to_mesh_distance(scans.points[0], sphere.vertices, sphere.faces).max() < 1e-6
    # Reloading gives the same points (seeded sampling).
    np.testing.assert_array_equal(load_scans(tmp_path / "coarse.ply").points[0], scans.points[0])


@pytest.mark.parametrize(
    "factor, expected_units, expected_scale",
    [(1.0, "m", 1.0), (1000.0, "mm", 1e-3), (100.0, "unknown", 1e-2), (1 / 0.0254, "unknown", 0.0254), (0.1, "unknown", 1.0)],
)
def test_units_are_detected_from_the_extent(tmp_path, factor, expected_units, expected_scale):
    cloud = hand_sized_cloud() * factor
    # A few far outliers must not change the decision.
    cloud[:3] = cloud[:3] * 50
    np.save(tmp_path / "f.npy", cloud)
    scans = load_scans(tmp_path)
    assert scans.units == expected_units
    assert scans.unit_scale == pytest.approx(expected_scale)
    np.testing.assert_allclose(scans.points[0], cloud * expected_scale)


def test_units_override(tmp_path):
    cloud = hand_sized_cloud() * 1000
    np.save(tmp_path / "f.npy", cloud)
    assert load_scans(tmp_path, units="mm").units == "mm"
    forced = load_scans(tmp_path, units="m")
    assert forced.units == "m" and forced.unit_scale == 1.0
    with pytest.raises(ScanError, match="units"):
        load_scans(tmp_path, units="cm")


def test_npz_with_indexed_arrays(tmp_path):
    arrays = {f"points_{i}": hand_sized_cloud(100 + i, seed=i) for i in (0, 1, 2, 10)}
    np.savez(tmp_path / "seq.npz", **arrays)
    scans = load_scans(tmp_path / "seq.npz")
    assert scans.names == ("seq.npz:points_0", "seq.npz:points_1", "seq.npz:points_2", "seq.npz:points_10")
    assert [len(p) for p in scans.points] == [100, 101, 102, 110]


def test_npz_padded_with_counts_and_keypoints(tmp_path):
    padded = np.zeros((3, 400, 3))
    counts = np.array([400, 250, 300])
    for t in range(3):
        padded[t, : counts[t]] = hand_sized_cloud(counts[t], seed=t) * 1000
    kp = np.random.default_rng(0).uniform(0, 100, (3, 21, 3))
    np.savez(tmp_path / "seq.npz", points=padded, counts=counts, keypoints=kp)
    scans = load_scans(tmp_path / "seq.npz")
    assert [len(p) for p in scans.points] == [400, 250, 300]
    assert scans.units == "mm"
    np.testing.assert_allclose(scans.keypoints, kp * 1e-3)
    np.testing.assert_array_equal(scans.keypoint_confidence, np.ones((3, 21)))


def test_save_scans_round_trip(tmp_path):
    original = ScanSequence.from_arrays(
        [hand_sized_cloud(seed=0), hand_sized_cloud(300, seed=1)],
        normals=[None, np.tile([1.0, 0.0, 0.0], (300, 1))],
        keypoints=np.zeros((2, 21, 3)),
    )
    save_scans(tmp_path / "s.npz", original)
    loaded = load_scans(tmp_path / "s.npz")
    for a, b in zip(loaded.points, original.points):
        np.testing.assert_array_equal(a, b)
    assert loaded.normals[0] is None
    np.testing.assert_array_equal(loaded.normals[1], original.normals[1])
    np.testing.assert_array_equal(loaded.keypoints, original.keypoints)


def write_frames(folder, count=3):
    for t in range(count):
        np.save(folder / f"f_{t}.npy", hand_sized_cloud(seed=t))


BAD_FRAMES = {
    "empty file": ("f_1.npy", lambda p: p.write_bytes(b""), "empty file"),
    "corrupt ply": ("f_1.ply", lambda p: p.write_text("ply\nformat nonsense\n"), "cannot read"),
    "corrupt npy": ("f_1.npy", lambda p: p.write_bytes(b"\x93NUMPY garbage"), "cannot read"),
    "text garbage": ("f_1.xyz", lambda p: p.write_text("a b c\nd e f\n"), "cannot read"),
    "wrong shape": ("f_1.npy", lambda p: np.save(p, np.zeros((200, 4))), r"\(200, 4\)"),
    "mostly NaN": ("f_1.npy", lambda p: np.save(p, np.full((200, 3), np.nan)), "NaN/inf"),
    "inf": ("f_1.npy", lambda p: np.save(p, np.where(np.arange(600)[:, None] < 300, np.inf, hand_sized_cloud(600))), "NaN/inf"),
    "too few points": ("f_1.npy", lambda p: np.save(p, hand_sized_cloud(MIN_POINTS - 1)), "too few points"),
    "all points equal": ("f_1.npy", lambda p: np.save(p, np.ones((200, 3))), "coincide"),
    "empty mesh": ("f_1.ply", lambda p: trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), int)).export(p), "f_1.ply"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_bad_frame_is_an_error_naming_the_file(tmp_path, case):
    name, write, message = BAD_FRAMES[case]
    write_frames(tmp_path)
    (tmp_path / "f_1.npy").unlink()
    write(tmp_path / name)
    with pytest.raises(ScanError, match=message) as info:
        load_scans(tmp_path)
    assert name in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_skip_bad_frames_warns_and_leaves_a_gap(tmp_path, case):
    name, write, _ = BAD_FRAMES[case]
    write_frames(tmp_path)
    (tmp_path / "f_1.npy").unlink()
    write(tmp_path / name)
    with pytest.warns(ScanWarning, match=name):
        scans = load_scans(tmp_path, skip_bad_frames=True)
    assert scans.num_frames == 3
    assert scans.bad_frames == (1,)
    assert scans.good_frames == (0, 2)
    assert scans.points[1].shape == (0, 3)
    assert all(np.isfinite(p).all() for p in scans.points)


def test_a_few_nonfinite_points_are_dropped_with_a_warning(tmp_path):
    cloud = hand_sized_cloud(500)
    cloud[[3, 70]] = [np.nan, np.inf, 0.0]
    np.save(tmp_path / "f.npy", cloud)
    with pytest.warns(ScanWarning, match="dropped 2 of 500"):
        scans = load_scans(tmp_path)
    assert len(scans.points[0]) == 498 and np.isfinite(scans.points[0]).all()


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(ScanError, match="no such file or directory") as info:
        load_scans(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)
    with pytest.raises(ScanError, match="holds no scan files"):
        load_scans(tmp_path)


def test_a_file_that_is_not_a_scan(tmp_path):
    write_frames(tmp_path)
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(ScanError, match="notes.json: not a scan file"):
        load_scans(tmp_path)
    with pytest.warns(ScanWarning, match="notes.json"):
        scans = load_scans(tmp_path, skip_bad_frames=True)
    assert scans.num_frames == 3 and scans.bad_frames == ()  # ignored, not a gap
    with pytest.raises(ScanError, match="not a scan file"):
        load_scans(tmp_path / "notes.json")


def test_all_frames_bad_is_an_error_even_when_skipping(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"")
    (tmp_path / "b.npy").write_bytes(b"")
    with pytest.warns(ScanWarning), pytest.raises(ScanError, match="no usable frame"):
        load_scans(tmp_path, skip_bad_frames=True)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"a": np.zeros(3)}, "holds no scan arrays"),
        ({"points": np.zeros((5, 3))}, r"expected \(T, N, 3\)"),
        ({"points_0": np.array([None, 1], dtype=object)}, "cannot read"),
    ],
)
def test_bad_npz(tmp_path, content, message):
    np.savez(tmp_path / "seq.npz", **content)
    with pytest.raises(ScanError, match=message) as info:
        load_scans(tmp_path / "seq.npz")
    assert "seq.npz" in str(info.value)


def test_keypoints_files(tmp_path):
    (tmp_path / "scans").mkdir()
    write_frames(tmp_path / "scans")
    kp = np.random.default_rng(0).uniform(0, 0.1, (3, 21, 3))
    np.save(tmp_path / "kp.npy", kp)
    scans = load_scans(tmp_path / "scans", keypoints=tmp_path / "kp.npy")
    np.testing.assert_allclose(scans.keypoints, kp)

    with_conf = np.concatenate([kp, np.full((3, 21, 1), 0.5)], axis=2)
    with_conf[1, 4, 0] = np.nan  # a keypoint the detector missed
    np.save(tmp_path / "kp4.npy", with_conf)
    scans = load_scans(tmp_path / "scans", keypoints=tmp_path / "kp4.npy")
    assert scans.keypoint_confidence[1, 4] == 0 and scans.keypoint_confidence[0, 0] == 0.5
    assert np.isfinite(scans.keypoints).all()

    (tmp_path / "kp.json").write_text(json.dumps({"keypoints": kp.tolist(), "confidence": np.ones((3, 21)).tolist()}))
    np.testing.assert_allclose(load_scans(tmp_path / "scans", keypoints=tmp_path / "kp.json").keypoints, kp)

    np.save(tmp_path / "kp_short.npy", kp[:2])
    with pytest.raises(ScanError, match="kp_short.npy: keypoints for 2 frames, but the scans have 3"):
        load_scans(tmp_path / "scans", keypoints=tmp_path / "kp_short.npy")
    np.save(tmp_path / "kp_bad.npy", kp[:, :20])
    with pytest.raises(ScanError, match=r"kp_bad.npy: keypoints must have shape \(T, 21, 3\)"):
        load_scans(tmp_path / "scans", keypoints=tmp_path / "kp_bad.npy")
    with pytest.raises(ScanError, match="no such keypoints file"):
        load_scans(tmp_path / "scans", keypoints=tmp_path / "missing.npy")


def test_openpose_keypoints_are_reordered_to_mano(tmp_path):
    from mano_jax.conventions import OPENPOSE_ORDER

    write_frames(tmp_path)
    mano = np.random.default_rng(1).uniform(0, 0.1, (3, 21, 3))
    np.save(tmp_path.parent / "op.npy", mano[:, list(OPENPOSE_ORDER)])
    scans = load_scans(tmp_path, keypoints=tmp_path.parent / "op.npy", keypoint_order="openpose")
    np.testing.assert_allclose(scans.keypoints, mano)


def test_keypoints_follow_the_scan_units(tmp_path):
    for t in range(2):
        np.save(tmp_path / f"f_{t}.npy", hand_sized_cloud(seed=t) * 1000)
    kp = np.full((2, 21, 3), 50.0)
    np.save(tmp_path.parent / "kp_mm.npy", kp)
    scans = load_scans(tmp_path, keypoints=tmp_path.parent / "kp_mm.npy")
    np.testing.assert_allclose(scans.keypoints, 0.05)


def test_from_arrays_validates_and_converts():
    scans = ScanSequence.from_arrays([hand_sized_cloud() * 1000], units="auto")
    assert scans.units == "mm" and scans.points[0].max() < 1
    with pytest.raises(ScanError, match="frame 0: too few points"):
        ScanSequence.from_arrays([np.zeros((3, 3))])
    with pytest.warns(ScanWarning):
        scans = ScanSequence.from_arrays([hand_sized_cloud(), np.zeros((3, 3))], skip_bad_frames=True)
    assert scans.bad_frames == (1,)


@pytest.mark.parametrize("encoding", ["ascii", "binary_little_endian"])
def test_ply_point_cloud_keeps_its_normals(tmp_path, encoding):
    points = hand_sized_cloud(200)
    rows = np.zeros(200, dtype=[(k, "<f4") for k in ("x", "y", "z", "nx", "ny", "nz")])
    rows["x"], rows["y"], rows["z"] = points.T
    rows["ny"] = -1.0
    header = f"ply\nformat {encoding} 1.0\nelement vertex 200\n" + "".join(
        f"property float {k}\n" for k in rows.dtype.names
    ) + "end_header\n"
    if encoding == "ascii":
        body = "\n".join(" ".join(f"{v:.7g}" for v in row) for row in rows.tolist()).encode() + b"\n"
    else:
        body = rows.tobytes()
    (tmp_path / "cloud.ply").write_bytes(header.encode() + body)
    scans = load_scans(tmp_path / "cloud.ply")
    np.testing.assert_allclose(scans.points[0], points, atol=1e-6)
    np.testing.assert_array_equal(scans.normals[0], np.tile([0.0, -1.0, 0.0], (200, 1)))
