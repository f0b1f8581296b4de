"""`mano-jax register` and `mano-jax demo`: arguments, outputs, resume hooks and user errors.

The optimisation itself is tested in test_registration*.py; here `register_sequence` is replaced by a quick
stand-in with the same signature (checked against the real one), so these tests exercise everything around
it in seconds.
"""

import argparse
import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from registration import many, pipeline
from registration.cli import add_commands
from registration.result import RegistrationResult, load_result
from registration.scans import ScanWarning, load_scans

FRAMES = 4


def run(argv) -> int:
    parser = argparse.ArgumentParser(prog="mano-jax")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def model():
    from mano_jax import load_model

    return load_model()


@pytest.fixture
def calls(monkeypatch, model):
    """Replace the optimisation by the model at rest centred on each scan; record each call."""
    record = []
    real = inspect.signature(pipeline.register_sequence)

    def stand_in(scans, model=None, config=None, *, checkpoint_dir=None, progress=True):
        real.bind(scans, model, config, checkpoint_dir=checkpoint_dir, progress=progress)
        record.append({"scans": scans, "config": config, "checkpoint_dir": checkpoint_dir, "model": model})
        rest = np.asarray(model.v_template).mean(axis=0)
        centres = np.array([p.mean(axis=0) if len(p) else rest for p in scans.points])
        t = scans.num_frames
        return RegistrationResult(
            betas=np.zeros(model.num_betas),
            offsets=np.zeros((model.num_vertices, 3)),
            global_orient=np.zeros((t, 3)),
            hand_pose=np.zeros((t, 45)),
            transl=centres - rest,
            model_name=model.name,
            side=model.side,
            bad_frames=scans.bad_frames,
            stage_times={"stage0": 1.0, "stage1": 2.0, "stage2": 3.0},
            config=config.to_dict(),
        )

    monkeypatch.setattr(pipeline, "register_sequence", stand_in)
    return record


@pytest.fixture(autouse=True)
def cache_dirs(monkeypatch):
    """The real cache would stay switched on for the rest of the test process: record where it would go."""
    record = []
    monkeypatch.setattr(many, "enable_compilation_cache", lambda folder: record.append(Path(folder)))
    return record


@pytest.fixture(scope="module")
def scan_dir(model, tmp_path_factory):
    """A tiny synthetic sequence saved as millimetre .npy frames."""
    from registration.synthetic import make_sequence

    scans, _ = make_sequence(model, num_frames=FRAMES, points_per_frame=600, seed=4)
    folder = tmp_path_factory.mktemp("scans")
    for t, points in enumerate(scans.points):
        np.save(folder / f"scan_{t}.npy", points * 1000)
    return folder


def test_register_writes_every_output(calls, scan_dir, tmp_path, capsys):
    config = tmp_path / "fast.json"
    config.write_text(json.dumps({"max_points": 321, "num_keyframes": 2}))
    out = tmp_path / "out"
    assert run(["register", scan_dir, "--out", out, "--config", config, "--quiet"]) == 0

    (call,) = calls
    assert call["config"].max_points == 321 and call["config"].num_keyframes == 2
    assert call["checkpoint_dir"] == out / "checkpoints"
    assert call["scans"].units == "mm" and call["scans"].num_frames == FRAMES
    result = load_result(out)
    assert result.num_frames == FRAMES and result.model_name == call["model"].name
    assert sorted(p.name for p in (out / "meshes").iterdir()) == [f"frame_{t:04d}.ply" for t in range(FRAMES)]
    for name in ("template.ply", "report.json", "preview.png", "done.json"):
        assert (out / name).is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["input_units"] == "mm" and len(report["frames"]) == FRAMES
    printed = capsys.readouterr().out
    assert f"{FRAMES} frames" in printed and "stage0 1.0 s" in printed and str(out) in printed


def test_register_options_reach_the_loader_and_the_config(calls, scan_dir, tmp_path):
    out = tmp_path / "out"
    assert run(["register", scan_dir, "--out", out, "--unordered", "--format", "obj", "--units", "m", "--quiet"]) == 0
    (call,) = calls
    assert call["config"].unordered is True and call["scans"].unordered
    assert call["scans"].units == "m"
    assert (out / "meshes" / "frame_0000.obj").is_file()


def test_compiled_programs_are_kept_between_runs(calls, cache_dirs, scan_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MANO_JAX_CACHE", raising=False)
    assert run(["register", scan_dir, "--out", tmp_path / "a", "--quiet"]) == 0
    monkeypatch.setenv("MANO_JAX_CACHE", str(tmp_path / "env"))
    assert run(["register", scan_dir, "--out", tmp_path / "b", "--quiet"]) == 0
    assert run(["register", scan_dir, "--out", tmp_path / "c", "--jax-cache", tmp_path / "given", "--quiet"]) == 0
    assert run(["register", scan_dir, "--out", tmp_path / "d", "--jax-cache", "none", "--quiet"]) == 0
    assert run(["demo", "--out", tmp_path / "e", "--frames", 3, "--points", 300, "--quiet"]) == 0
    assert cache_dirs == [tmp_path / "xdg" / "mano-jax" / "jax", tmp_path / "env", tmp_path / "given", tmp_path / "env"]


def test_an_unusable_cache_folder_is_a_warning(calls, scan_dir, tmp_path, monkeypatch, capsys):
    def refuse(folder):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(many, "enable_compilation_cache", refuse)
    with pytest.warns(UserWarning, match="cannot keep compiled programs there"):
        assert run(["register", scan_dir, "--out", tmp_path / "out", "--jax-cache", tmp_path / "ro", "--quiet"]) == 0
    assert (tmp_path / "out" / "done.json").is_file()


def test_register_left_hand_uses_the_left_model(calls, scan_dir, tmp_path):
    assert run(["register", scan_dir, "--out", tmp_path, "--side", "left", "--quiet"]) == 0
    assert calls[0]["model"].side == "left"
    assert load_result(tmp_path).side == "left"


def test_skip_bad_frames(calls, scan_dir, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for p in scan_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "scan_1.npy").write_bytes(b"")
    assert run(["register", folder, "--out", tmp_path / "a", "--quiet"]) == 2
    with pytest.warns(ScanWarning, match="scan_1.npy"):
        assert run(["register", folder, "--out", tmp_path / "b", "--skip-bad-frames", "--quiet"]) == 0
    assert calls[0]["scans"].bad_frames == (1,)
    assert json.loads((tmp_path / "b" / "report.json").read_text())["bad_frames"] == [1]


def write(path, content):
    path.write_text(content) if isinstance(content, str) else path.write_bytes(content)
    return path


USER_ERRORS = {
    "missing input": (lambda d, s: ["register", d / "nowhere", "--out", d / "o"], "nowhere: no such file or directory"),
    "corrupt frame": (
        lambda d, s: ["register", write(d / "bad.ply", "ply\nrubbish"), "--out", d / "o"],
        "bad.ply: cannot read",
    ),
    "config not json": (
        lambda d, s: ["register", s, "--out", d / "o", "--config", write(d / "c.json", "{max_points: 3")],
        "c.json: not valid JSON",
    ),
    "config unknown field": (
        lambda d, s: ["register", s, "--out", d / "o", "--config", write(d / "c.json", '{"speed": 3}')],
        "unknown RegistrationConfig field(s): speed",
    ),
    "config bad value": (
        lambda d, s: ["register", s, "--out", d / "o", "--config", write(d / "c.json", '{"window": 0}')],
        "window",
    ),
    "missing model": (
        lambda d, s: ["register", s, "--out", d / "o", "--model", d / "MANO_RIGHT.pkl"],
        "MANO_RIGHT.pkl: no such file",
    ),
    "keypoints for other frames": (
        lambda d, s: ["register", s, "--out", d / "o", "--keypoints", _save(d / "kp.npy", np.zeros((FRAMES + 1, 21, 3)))],
        f"keypoints for {FRAMES + 1} frames, but the scans have {FRAMES}",
    ),
    "demo too small": (lambda d, s: ["demo", "--out", d / "o", "--frames", "2"], "--frames must be >= 3"),
}


def _save(path, array):
    np.save(path, array)
    return path


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_exit_2_with_one_clear_line(calls, scan_dir, tmp_path, capsys, case):
    make_argv, message = USER_ERRORS[case]
    assert run(make_argv(tmp_path, scan_dir)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("mano-jax ") and err.count("\n") == 1 and "Traceback" not in err
    assert calls == []


def test_pipeline_errors_and_interrupts(monkeypatch, scan_dir, tmp_path, capsys):
    def no_data(*args, **kwargs):
        raise pipeline.RegistrationError("no frame has enough points")

    monkeypatch.setattr(pipeline, "register_sequence", no_data)
    assert run(["register", scan_dir, "--out", tmp_path]) == 2
    assert "mano-jax register: error: no frame has enough points" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "register_sequence", interrupted)
    assert run(["register", scan_dir, "--out", tmp_path]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not (tmp_path / "done.json").exists()


def test_demo_reports_the_error_against_ground_truth(calls, model, tmp_path, capsys):
    out = tmp_path / "demo"
    assert run(["demo", "--out", out, "--frames", FRAMES, "--points", 600, "--quiet"]) == 0
    printed = capsys.readouterr().out
    demo = json.loads((out / "demo.json").read_text())
    # The printed error is the mean distance between the registered and the true vertices.
    with np.load(out / "ground_truth.npz") as truth:
        true_vertices = truth["vertices"]
    posed = load_result(out).posed_vertices(model)
    expected = 1000 * np.linalg.norm(posed - true_vertices, axis=-1).mean()
    assert demo["mean_vertex_error_mm"] == pytest.approx(expected, rel=1e-6)
    assert f"mean per-vertex {expected:.2f} mm" in printed
    assert json.loads((out / "report.json").read_text())["ground_truth"] == {k: demo[k] for k in demo if k.endswith("_mm")}
    # The synthetic scans are kept, loadable as a sequence.
    scans = load_scans(out / "scans.npz")
    assert scans.num_frames == FRAMES and scans.units == "m"
    np.testing.assert_array_equal(scans.points[0], calls[0]["scans"].points[0])
