"""Registering many scan sequences: one independent task per sequence, on a local process pool or Ray.

Manifest (`read_manifest`), either

- a text file, one sequence per line: `path` or `name<TAB>path`; blank lines and `#` comments are skipped;
  the name defaults to the input's file name without suffix;
- or a `.json` list of objects `{"input": path, "name": ..., "keypoints": path, "units": "auto"|"m"|"mm",
  "side": "right"|"left", "unordered": bool, "skip_bad_frames": bool}` (only "input" is required; the rest
  override the command-line defaults for that sequence).

Relative paths are relative to the manifest's folder. Names must be unique: sequence `name` is written to
`OUT/<name>/` (the layout of `registration.outputs`).

Each task is retried up to `retries` more times when it fails for a reason that may not repeat (a crashed
worker, an unexpected exception); bad input (`ScanError`, a bad model) is reported at once. A task whose
`OUT/<name>/done.json` exists is skipped, so running the same command again resumes; an interrupted task
resumes from its own checkpoints. `OUT/summary.json` is rewritten (atomically) as tasks finish.

Workers share a persistent JAX compilation cache (default `OUT/.jax_cache`, thresholds at zero so every
compiled solver is cached): only the first worker to meet a problem size pays for compiling it. The local
executor starts workers with "spawn", since JAX is not fork-safe. Ray (`pip install 'mano-jax[distributed]'`)
connects to the cluster in `RAY_ADDRESS` (or starts a local one); `OUT` must then be on storage every node
sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

from .outputs import write_json


class ManifestError(ValueError):
    """A manifest (or an executor choice) that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One sequence to register."""

    name: str
    """Output subdirectory name."""
    input: str
    """Scan directory, `.npz` sequence or scan file."""
    keypoints: str | None = None
    """Optional keypoints file (see `load_scans`)."""
    options: dict = dataclasses.field(default_factory=dict)
    """Per-task overrides of `units`, `side`, `unordered`, `skip_bad_frames`."""


_TASK_OPTIONS = ("units", "side", "unordered", "skip_bad_frames")


def read_manifest(path: str | os.PathLike) -> list[Task]:
    """The tasks listed in a manifest file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    base = path.parent
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e})") from None
    tasks = []
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(entries, list):
            raise ManifestError(f"{path}: expected a JSON list of objects with an 'input' entry")
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict) or "input" not in entry:
                raise ManifestError(f"{path}: entry {k} is not an object with an 'input' entry")
            unknown = set(entry) - {"input", "name", "keypoints", *_TASK_OPTIONS}
            if unknown:
                raise ManifestError(f"{path}: entry {k} has unknown key(s) {', '.join(sorted(unknown))}")
            source = _resolve(base, entry["input"])
            tasks.append(
                Task(
                    name=str(entry.get("name") or _default_name(source)),
                    input=source,
                    keypoints=_resolve(base, entry["keypoints"]) if entry.get("keypoints") else None,
                    options={k: entry[k] for k in _TASK_OPTIONS if k in entry},
                )
            )
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) > 2:
                raise ManifestError(f"{path}:{number}: expected 'path' or 'name<TAB>path', got {len(parts)} fields")
            source = _resolve(base, parts[-1].strip())
            name = parts[0].strip() if len(parts) == 2 else _default_name(source)
            tasks.append(Task(name=name, input=source))
    if not tasks:
        raise ManifestError(f"{path}: the manifest lists no sequences")
    seen = {}
    for task in tasks:
        if not task.name or "/" in task.name or task.name in (".", ".."):
            raise ManifestError(f"{path}: {task.name!r} is not a usable output name (for {task.input})")
        if task.name in seen:
            raise ManifestError(f"{path}: two sequences are named {task.name!r} ({seen[task.name]} and {task.input})")
        seen[task.name] = task.input
    return tasks


def _resolve(base: Path, value: str) -> str:
    p = Path(os.path.expanduser(str(value)))
    return str(p if p.is_absolute() else base / p)


def _default_name(source: str) -> str:
    p = Path(source)
    return p.stem if p.suffix else p.name


def enable_compilation_cache(cache_dir: str | os.PathLike) -> None:
    """Use a persistent JAX compilation cache in `cache_dir`, caching every compiled program."""
    import jax

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_task(task: Task, out_dir: str, settings: dict) -> dict:
    """Register one sequence into `out_dir/<name>/` (runs in a worker). Never raises: returns an outcome dict
    with "status" ("done" or "failed"), "seconds", on success "summary" (the report's) and "warnings" (about
    the input, e.g. skipped bad frames), on failure "error" and "retry" (worth retrying?)."""
    from mano_jax.io import ManoFileError

    from .cli import UsageError, load_config, load_model_for
    from .outputs import register_to_directory
    from .pipeline import RegistrationError
    from .scans import ScanError, ScanWarning, load_scans

    started = time.perf_counter()
    target = Path(out_dir) / task.name
    try:
        if settings.get("cache_dir"):
            enable_compilation_cache(settings["cache_dir"])
        options = {k: settings.get(k) for k in _TASK_OPTIONS} | task.options
        model = load_model_for(settings.get("model"), options["side"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ScanWarning)
            scans = load_scans(
                task.input,
                units=options["units"] or "auto",
                skip_bad_frames=bool(options["skip_bad_frames"]),
                keypoints=task.keypoints,
                unordered=bool(options["unordered"]),
            )
        config = load_config(None, **(settings.get("config") or {}))
        if options["unordered"]:
            config = config.replace(unordered=True)
        _, report = register_to_directory(
            scans, target, model=model, config=config, mesh_format=settings.get("mesh_format", "ply"), progress=False
        )
        return {
            "status": "done",
            "seconds": time.perf_counter() - started,
            "summary": report["summary"],
            "warnings": [str(w.message) for w in caught],
        }
    except (ScanError, ManoFileError, UsageError, RegistrationError) as e:
        return {"status": "failed", "retry": False, "error": str(e), "seconds": time.perf_counter() - started}
    except Exception as e:  # a worker must report, not die: the scheduler decides about retrying
        details = traceback.format_exc()
        with contextlib.suppress(OSError):  # the report below matters more than the log
            target.mkdir(parents=True, exist_ok=True)
            write_json(target / "error.json", {"error": f"{type(e).__name__}: {e}", "traceback": details})
        return {"status": "failed", "retry": True, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - started}


def run_many(
    tasks: Sequence[Task],
    out_dir: str | os.PathLike,
    *,
    executor: str = "local",
    workers: int | None = None,
    retries: int = 2,
    model: str | None = None,
    side: str | None = None,
    units: str = "auto",
    skip_bad_frames: bool = False,
    unordered: bool = False,
    mesh_format: str = "ply",
    config: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Register every task into `out_dir/<name>/`; return (and write to `out_dir/summary.json`) the summary.

    `executor`: "local" (a spawn process pool of `workers`, default half the CPU cores) or "ray".
    `retries`: extra attempts for a task that failed in a way that may not repeat. `model`, `side`, `units`,
    `skip_bad_frames`, `unordered`: defaults for every task (a JSON manifest can override the last four per
    task). `config`: `RegistrationConfig` fields as a dict. `cache_dir`: the shared JAX compilation cache
    (default `out_dir/.jax_cache`).
    """
    if executor not in ("local", "ray"):
        raise ManifestError(f"executor must be 'local' or 'ray', got {executor!r}")
    if retries < 0:
        raise ManifestError(f"retries must be >= 0, got {retries}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": model,
        "side": side,
        "units": units,
        "skip_bad_frames": skip_bad_frames,
        "unordered": unordered,
        "mesh_format": mesh_format,
        "config": config or {},
        "cache_dir": str(cache_dir or out_dir / ".jax_cache"),
    }
    if executor == "ray":
        # Checked before anything runs, so a missing extra is a clear error, not a half-done batch.
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ManifestError(
                "executor 'ray' needs Ray: install the optional extra with pip install 'mano-jax[distributed]'"
            ) from None
    book = _Book(tasks, out_dir, retries, progress)
    todo = [t for t in tasks if not (out_dir / t.name / "done.json").exists()]
    for t in tasks:
        if t not in todo:
            book.record(t, {"status": "skipped"})
    if todo:
        if executor == "local":
            _run_local(todo, str(out_dir), settings, workers, book)
        else:
            _run_ray(todo, str(out_dir), settings, book)
    return book.write()


class _Book:
    """Outcomes and attempts per task; decides retries; keeps `summary.json` current."""

    def __init__(self, tasks, out_dir: Path, retries: int, progress: bool):
        self.tasks, self.out_dir, self.retries, self.progress = list(tasks), out_dir, retries, progress
        self.attempts = {t.name: 0 for t in tasks}
        self.outcomes = {}

    def record(self, task: Task, outcome: dict) -> bool:
        """Store an outcome; True if the task should run again."""
        if outcome["status"] != "skipped":
            self.attempts[task.name] += 1
        again = outcome["status"] == "failed" and outcome.get("retry", False) and self.attempts[task.name] <= self.retries
        self.outcomes[task.name] = outcome | {"attempts": self.attempts[task.name]}
        if self.progress and outcome["status"] != "skipped":
            note = f" ({outcome['error']}); retrying" if again else (f" ({outcome['error']})" if "error" in outcome else "")
            print(f"[{len(self.outcomes)}/{len(self.tasks)}] {task.name}: {outcome['status']}{note}", flush=True)
        if not again:
            self.write()
        return again

    def write(self) -> dict:
        entries = [
            {"name": t.name, "input": t.input, **self.outcomes.get(t.name, {"status": "pending", "attempts": 0})}
            for t in self.tasks
        ]
        counts = {}
        for e in entries:
            counts[e["status"]] = counts.get(e["status"], 0) + 1
        summary = {"counts": counts, "tasks": entries}
        write_json(self.out_dir / "summary.json", summary)
        return summary


def _run_local(todo: list[Task], out_dir: str, settings: dict, workers: int | None, book: _Book) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    workers = max(1, (os.cpu_count() or 2) // 2) if workers is None else workers
    if workers < 1:
        raise ManifestError(f"workers must be >= 1, got {workers}")
    context = multiprocessing.get_context("spawn")
    queue = list(todo)
    while queue:
        # A crashed worker breaks the whole pool: the tasks it took down are retried in a fresh one. Only
        # `workers` tasks are handed to the pool at a time, so a crash takes down only tasks that were running.
        with ProcessPoolExecutor(max_workers=min(workers, len(queue)), mp_context=context) as pool:
            running = {}
            broken = False
            while queue or running:
                while queue and len(running) < workers and not broken:
                    task = queue.pop(0)
                    running[pool.submit(run_task, task, out_dir, settings)] = task
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = running.pop(future)
                    try:
                        outcome = future.result()
                    except BrokenProcessPool as e:
                        broken = True
                        outcome = {"status": "failed", "retry": True, "error": f"worker crashed ({e})"}
                    if book.record(task, outcome):
                        queue.append(task)
                if broken and not running:
                    break


def _run_ray(todo: list[Task], out_dir: str, settings: dict, book: _Book) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    # Ray retries a task whose worker died (max_retries); failures run_task reports are retried by the book.
    remote = ray.remote(max_retries=book.retries)(run_task)
    running = {remote.remote(task, out_dir, settings): task for task in todo}
    while running:
        finished, _ = ray.wait(list(running), num_returns=1)
        for ref in finished:
            task = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as e:
                outcome = {"status": "failed", "retry": False, "error": f"ray task failed ({type(e).__name__}: {e})"}
            if book.record(task, outcome):
                running[remote.remote(task, out_dir, settings)] = task
