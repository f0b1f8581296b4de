"""The registration output directory: report numbers on known cases, files, atomic writes."""

import json

import numpy as np
import pytest
import trimesh

from registration.outputs import jitter_mm, scan_to_mesh_distance, write_outputs
from registration.scans import ScanSequence
from registration.synthetic import make_sequence

T = 4  # frames of every sequence here: one compiled forward for the whole module


@pytest.fixture(scope="module")
def model():
    from mano_jax import load_model

    return load_model()


@pytest.fixture(scope="module")
def clean(model):
    """A noise-free, outlier-free, forearm-free sequence and its ground truth."""
    return make_sequence(model, num_frames=T, points_per_frame=1500, noise=0.0, outlier_ratio=0.0, forearm=False, seed=2)


def test_distance_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.05)  # millimetre-sized triangles, in metres
    points = np.concatenate([sphere.sample(500, seed=1) + rng.normal(0, 0.002, (500, 3)), rng.uniform(-0.1, 0.1, (50, 3))])
    d = scan_to_mesh_distance(points, sphere.vertices, sphere.faces)
    # Brute force: the distance to every triangle's plane-clamped closest point, over all triangles.
    brute = np.array(
        [np.linalg.norm(trimesh.triangles.closest_point(sphere.triangles * 100, np.tile(p * 100, (len(sphere.faces), 1))) - p * 100, axis=1).min() / 100 for p in points]
    )
    np.testing.assert_allclose(d[:500], brute[:500], atol=1e-12)
    assert (d[500:] >= brute[500:] - 1e-12).all()  # far points: an upper bound
    np.testing.assert_allclose(d[500:], brute[500:], rtol=0.05)


def test_distance_of_points_on_millimetre_triangles_is_zero():
    # trimesh's own closest_point misplaces points inside small triangles given in metres.
    tri = np.array([[0.05835038, 0.10950373, -0.06260159], [0.0583615, 0.1090387, -0.06227166], [0.05805829, 0.1098507, -0.06144456]])
    inside = np.array([0.139, 0.134, 0.727]) @ tri
    assert scan_to_mesh_distance(inside[None], tri, np.array([[0, 1, 2]]))[0] < 1e-15


def test_perfect_result_gives_zero_residuals(model, clean, tmp_path):
    scans, truth = clean
    report = write_outputs(truth.to_result(model), scans, model, tmp_path)
    for frame in report["frames"]:
        assert frame["median_mm"] < 1e-3 and frame["p90_mm"] < 1e-3
        assert frame["within_2mm"] == 1.0
    assert report["summary"]["within_2mm"] == 1.0


def test_known_offset_surface_gives_its_distance(model, clean, tmp_path):
    _, truth = clean
    faces = np.asarray(model.faces)
    # Scan points = model vertices pushed 1 mm out along their normals: 1 mm from the surface wherever the
    # surface is locally convex, less in creases.
    points = []
    for t in range(T):
        mesh = trimesh.Trimesh(truth.vertices[t], faces, process=False)
        points.append(mesh.vertices + 0.001 * mesh.vertex_normals)
    report = write_outputs(truth.to_result(model), ScanSequence.from_arrays(points), model, tmp_path)
    float32 = 1e-4  # mm: the model (float32) posed twice
    for frame in report["frames"]:
        assert 0.95 < frame["median_mm"] <= 1.0 + float32
        assert frame["p90_mm"] <= 1.0 + float32
        assert frame["within_2mm"] == 1.0


def test_jitter_of_a_known_acceleration(model, clean):
    _, truth = clean
    # A rigid translation t -> 0.5 a t^2 accelerates every vertex by a per frame^2.
    a = 0.0015
    along_x = np.array([1.0, 0.0, 0.0])[None, None]
    t = np.arange(T)[:, None, None]
    assert jitter_mm(truth.vertices[:1] + 0.5 * a * t**2 * along_x) == pytest.approx(1000 * a)
    assert jitter_mm(truth.vertices[:1] + 0.01 * t * along_x) == pytest.approx(0.0, abs=1e-9)
    assert jitter_mm(truth.vertices[:2]) is None


def test_files_units_and_bad_frames(model, clean, tmp_path):
    scans, truth = clean
    # The scans came in millimetres, frame 2 was bad: meshes are written in millimetres, the report skips it.
    in_mm = [p * 1000 for p in scans.points]
    in_mm[2] = np.zeros((1, 3))
    with pytest.warns(UserWarning, match="frame 2"):
        mm_scans = ScanSequence.from_arrays(in_mm, units="mm", skip_bad_frames=True)
    result = truth.to_result(model)
    report = write_outputs(result, mm_scans, model, tmp_path, mesh_format="obj")

    meshes = sorted(p.name for p in (tmp_path / "meshes").iterdir())
    assert meshes == [f"frame_{t:04d}.obj" for t in range(T)]
    frame0 = trimesh.load(tmp_path / "meshes" / "frame_0000.obj", process=False)
    np.testing.assert_allclose(frame0.vertices, truth.vertices[0] * 1000, atol=1e-3)
    template = trimesh.load(tmp_path / "template.ply", process=False)
    np.testing.assert_allclose(template.vertices, result.template_vertices(model), atol=1e-6)
    assert (tmp_path / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    assert report["frames"][2]["bad"] and report["frames"][2]["median_mm"] is None
    assert report["bad_frames"] == [2]
    assert report["frames"][0]["median_mm"] < 1e-3
    assert report["summary"]["jitter_mm_per_frame2"] > 0
    assert report["input_units"] == "mm"
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left behind


def test_a_failed_write_keeps_the_previous_file_whole(model, clean, tmp_path, monkeypatch):
    import matplotlib.figure

    scans, truth = clean
    result = truth.to_result(model)
    write_outputs(result, scans, model, tmp_path)
    before = (tmp_path / "preview.png").read_bytes()

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(result, scans, model, tmp_path)
    assert (tmp_path / "preview.png").read_bytes() == before
    assert not [p for p in tmp_path.rglob(".*")]


def test_non_finite_result_is_refused(model, clean, tmp_path):
    import dataclasses

    scans, truth = clean
    pose = truth.hand_pose.copy()
    pose[1, 0] = np.nan
    result = dataclasses.replace(truth.to_result(model), hand_pose=pose)
    with pytest.raises(FloatingPointError, match="non-finite"):
        write_outputs(result, scans, model, tmp_path)
    assert not (tmp_path / "meshes").exists()
