"""`register-many`: manifests, the task runner, retries, resume, and the executors.

The process-pool tests replace `run_task` by `scripted_task` below (spawned workers import it from this
module), which succeeds, fails or crashes as its task's name says: the scheduling is what is under test.
`run_task` itself is tested in-process with a stand-in for the optimisation.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from registration import many, pipeline
from registration.many import ManifestError, Task, read_manifest, run_many, run_task


def scripted_task(task, out_dir, settings):
    """A task whose behaviour is in its name: ok, flaky (fails once), crash (kills its worker once),
    broken (always fails), baddata (bad input: not worth retrying)."""
    folder = Path(out_dir) / task.name
    folder.mkdir(parents=True, exist_ok=True)
    attempts_file = folder / "attempts"
    attempt = int(attempts_file.read_text()) + 1 if attempts_file.exists() else 1
    attempts_file.write_text(str(attempt))
    kind = task.name.split("-")[0]
    if kind == "crash" and attempt == 1:
        os._exit(1)
    if kind == "broken" or (kind == "flaky" and attempt == 1):
        return {"status": "failed", "retry": True, "error": f"RuntimeError: attempt {attempt}"}
    if kind == "baddata":
        return {"status": "failed", "retry": False, "error": "bad.ply: empty file"}
    (folder / "done.json").write_text("{}")
    return {"status": "done", "seconds": 0.0, "summary": {"settings_model": settings["model"]}}


def attempts(out, name):
    return int((out / name / "attempts").read_text())


def test_text_manifest(tmp_path):
    (tmp_path / "manifest.txt").write_text(
        "# sequences of subject 1\n"
        "seq_a\n"
        "\n"
        "custom\t/data/elsewhere/seq_b.npz\n"
        "sub/seq_c.npz  \n"
    )
    tasks = read_manifest(tmp_path / "manifest.txt")
    assert [t.name for t in tasks] == ["seq_a", "custom", "seq_c"]
    assert [t.input for t in tasks] == [str(tmp_path / "seq_a"), "/data/elsewhere/seq_b.npz", str(tmp_path / "sub" / "seq_c.npz")]


def test_json_manifest(tmp_path):
    entries = [
        {"input": "a", "units": "mm", "side": "left"},
        {"input": "b.npz", "name": "bee", "keypoints": "kp/b.npy", "unordered": True, "skip_bad_frames": True},
    ]
    (tmp_path / "m.json").write_text(json.dumps(entries))
    a, b = read_manifest(tmp_path / "m.json")
    assert a == Task(name="a", input=str(tmp_path / "a"), options={"units": "mm", "side": "left"})
    assert b.name == "bee" and b.keypoints == str(tmp_path / "kp" / "b.npy")
    assert b.options == {"unordered": True, "skip_bad_frames": True}


@pytest.mark.parametrize(
    "file_name, content, message",
    [
        ("m.txt", "a\nsub/a\n", "two sequences are named 'a'"),
        ("m.txt", "# nothing\n\n", "lists no sequences"),
        ("m.txt", "x\ty\tz\n", "m.txt:1: expected 'path' or 'name<TAB>path'"),
        ("m.json", "[{\"input\": \"a\", \"speed\": 2}]", "unknown key(s) speed"),
        ("m.json", "{\"input\": \"a\"}", "expected a JSON list"),
        ("m.json", "[{\"name\": \"a\"}]", "entry 0 is not an object with an 'input' entry"),
        ("m.json", "[{\"input\": ", "not valid JSON"),
    ],
)
def test_bad_manifests(tmp_path, file_name, content, message):
    (tmp_path / file_name).write_text(content)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(tmp_path / file_name)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="nope.txt: no such manifest file"):
        read_manifest(tmp_path / "nope.txt")


def test_pool_retries_recovers_from_crashes_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(many, "run_task", scripted_task)
    names = ["ok-1", "ok-2", "flaky-1", "crash-1", "broken-1", "baddata-1"]
    tasks = [Task(name=n, input=str(tmp_path / n)) for n in names]
    out = tmp_path / "out"
    (out / "ok-2").mkdir(parents=True)
    (out / "ok-2" / "done.json").write_text("{}")  # finished in an earlier run

    # One worker: a crash then takes down only the crashing task, so every count below is exact.
    summary = run_many(tasks, out, workers=1, retries=2, model="open-right", progress=False)

    status = {t["name"]: t["status"] for t in summary["tasks"]}
    assert status == {
        "ok-1": "done", "ok-2": "skipped", "flaky-1": "done", "crash-1": "done", "broken-1": "failed", "baddata-1": "failed",
    }  # fmt: skip
    assert not (out / "ok-2" / "attempts").exists()  # a finished task is not run again
    assert attempts(out, "flaky-1") == 2
    assert attempts(out, "crash-1") == 2
    assert attempts(out, "broken-1") == 3  # 1 + 2 retries
    assert attempts(out, "baddata-1") == 1  # bad input is not retried
    assert summary["counts"] == {"done": 3, "skipped": 1, "failed": 2}
    assert json.loads((out / "summary.json").read_text()) == summary
    by_name = {t["name"]: t for t in summary["tasks"]}
    assert by_name["baddata-1"]["error"] == "bad.ply: empty file"
    assert by_name["ok-1"]["summary"] == {"settings_model": "open-right"}

    # Running again re-runs only what did not finish.
    summary = run_many(tasks, out, workers=1, retries=0, progress=False)
    assert {t["name"] for t in summary["tasks"] if t["status"] == "skipped"} == {"ok-1", "ok-2", "flaky-1", "crash-1"}
    assert attempts(out, "flaky-1") == 2 and attempts(out, "broken-1") == 4


@pytest.fixture
def stand_in_pipeline(monkeypatch):
    def register(scans, model=None, config=None, *, checkpoint_dir=None, progress=True):
        from registration.result import RegistrationResult

        if scans.num_frames == 3:
            raise RuntimeError("solver blew up")
        t = scans.num_frames
        centre = np.asarray(model.v_template).mean(axis=0)
        transl = np.array([p.mean(axis=0) if len(p) else centre for p in scans.points]) - centre
        return RegistrationResult(
            betas=np.zeros(model.num_betas), offsets=np.zeros((model.num_vertices, 3)), global_orient=np.zeros((t, 3)),
            hand_pose=np.zeros((t, 45)), transl=transl, model_name=model.name, side=model.side, config=config.to_dict(),
        )  # fmt: skip

    monkeypatch.setattr(pipeline, "register_sequence", register)


def test_run_task_registers_into_its_folder(tmp_path, stand_in_pipeline):
    rng = np.random.default_rng(0)
    frames = {f"points_{i}": rng.uniform(0, 100, (300, 3)) for i in range(4)}
    frames["points_2"] = np.zeros((0, 3))  # a bad frame, skipped as the manifest entry asks
    np.savez(tmp_path / "seq.npz", **frames)
    task = Task(name="s", input=str(tmp_path / "seq.npz"), options={"skip_bad_frames": True})
    settings = {"model": None, "side": "left", "units": "auto", "mesh_format": "obj", "config": {"max_points": 77}}
    outcome = run_task(task, str(tmp_path / "out"), settings)
    assert outcome["status"] == "done"
    assert len(outcome["warnings"]) == 1 and "points_2: empty scan" in outcome["warnings"][0]
    folder = tmp_path / "out" / "s"
    assert (folder / "done.json").is_file() and (folder / "meshes" / "frame_0001.obj").is_file()
    from registration.result import load_result

    result = load_result(folder)
    assert result.side == "left" and result.config["max_points"] == 77


def test_run_task_classifies_failures(tmp_path, stand_in_pipeline):
    outcome = run_task(Task(name="gone", input=str(tmp_path / "missing")), str(tmp_path), {})
    assert outcome["status"] == "failed" and outcome["retry"] is False
    assert "missing: no such file or directory" in outcome["error"]

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "three.npz", **{f"points_{i}": rng.uniform(0, 0.1, (300, 3)) for i in range(3)})
    outcome = run_task(Task(name="three", input=str(tmp_path / "three.npz")), str(tmp_path), {})
    assert outcome["status"] == "failed" and outcome["retry"] is True
    assert outcome["error"] == "RuntimeError: solver blew up"
    log = json.loads((tmp_path / "three" / "error.json").read_text())
    assert "solver blew up" in log["traceback"]


def test_workers_cache_every_compiled_program(tmp_path):
    # In a fresh process (as a worker is): after run_task, even a tiny jitted function lands in the cache.
    import subprocess
    import sys

    script = (
        "import jax, jax.numpy as jnp\n"
        "from registration.many import Task, run_task\n"
        f"run_task(Task(name='x', input={str(tmp_path / 'missing')!r}), {str(tmp_path)!r}, {{'cache_dir': {str(tmp_path / 'cache')!r}}})\n"
        "jax.jit(lambda x: x * 2 + 1)(jnp.arange(3.0)).block_until_ready()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    assert any((tmp_path / "cache").iterdir())


def test_cli_register_many(tmp_path, monkeypatch, capsys):
    import argparse

    from registration.cli import add_commands

    monkeypatch.setattr(many, "run_task", scripted_task)
    (tmp_path / "m.txt").write_text("ok-a\nbaddata-b\n")
    parser = argparse.ArgumentParser(prog="mano-jax")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["register-many", str(tmp_path / "m.txt"), "--out", str(tmp_path / "out"), "--workers", "1", "--quiet"])
    assert args.func(args) == 1  # one sequence failed
    assert "1 done, 0 already done, 1 failed" in capsys.readouterr().out

    args = parser.parse_args(["register-many", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "out")])
    assert args.func(args) == 2
    assert "nope.txt: no such manifest file" in capsys.readouterr().err


def test_ray_executor_without_ray_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(ManifestError, match=r"pip install 'mano-jax\[distributed\]'"):
        run_many([Task(name="a", input="a")], tmp_path, executor="ray")
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None, reason="needs Ray (extra 'distributed')")
# Ray starts its services with fork + exec, which JAX's fork hook warns about (harmless: exec follows at once).
@pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")
def test_ray_executor_runs_retries_and_resumes(tmp_path, monkeypatch):
    import ray

    # Ray's workers import the scripted task from this file by name: put its folder on their path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(many, "run_task", scripted_task)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        tasks = [Task(name=n, input=n) for n in ("ok-1", "flaky-1", "crash-1", "baddata-1")]
        summary = run_many(tasks, tmp_path, executor="ray", retries=1, progress=False)
        assert summary["counts"] == {"done": 3, "failed": 1}
        assert attempts(tmp_path, "flaky-1") == 2 and attempts(tmp_path, "crash-1") == 2
        assert run_many(tasks, tmp_path, executor="ray", retries=0, progress=False)["counts"]["skipped"] == 3
    finally:
        ray.shutdown()
