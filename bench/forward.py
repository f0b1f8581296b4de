"""Forward-model speed: hands/s forward and forward+backward, exact Jacobians/s, compiled memory.

Float32 on the CPU, median of repeated runs after warm-up. By default on a MANO-sized model (778 vertices,
10 shape components, dense pose blend shapes, built by the test fixture) so numbers compare with the PyTorch
layers on the official files; `--model PATH` uses any model (e.g. the real MANO_RIGHT.pkl).

    python bench/forward.py [--model PATH] [--repeat-seconds 2] [--out bench/results/forward.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mano_jax  # noqa: E402
from mano_jax._atomic import atomic_path  # noqa: E402

BATCHES = (1, 64, 1024, 8192)
# PyTorch layers on this machine kind (2-core CPU, float32), from ../shared/notes/mano-facts.md.
PEERS = {
    "forward": {1: {"manopth": 530, "manotorch": 650, "smplx": 810},
                1024: {"manopth": 5900, "manotorch": 6700, "smplx": 15000}},
    "forward_backward": {1024: {"manopth": 2900, "smplx": 6000}},
}  # fmt: skip


def load(path: str | None):
    if path is not None:
        return mano_jax.load_model(path, dtype=jnp.float32)
    from tests.mano_fixture import make_mano_arrays, write_plain_pickle

    with tempfile.TemporaryDirectory() as tmp:
        file = write_plain_pickle(Path(tmp) / "MANO_RIGHT.pkl", make_mano_arrays("right"))
        return mano_jax.load_model(file, dtype=jnp.float32)


def median_seconds(fn, args, budget: float) -> float:
    """Median wall time of fn(*args) over repeated calls filling about `budget` seconds."""
    jax.block_until_ready(fn(*args))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < 2000):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def inputs(model, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = lambda *shape, s=1.0: jnp.asarray(rng.normal(size=shape) * s, jnp.float32)  # noqa: E731
    return (
        f(batch, 45, s=0.5),
        f(batch, model.num_betas),
        f(batch, 3, s=0.5),
        f(batch, 3, s=0.1),
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model file (default: MANO-sized fixture)")
    parser.add_argument("--repeat-seconds", type=float, default=2.0, help="time budget per measurement")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "forward.json"))
    args = parser.parse_args(argv)

    model = load(args.model)

    def vertices(model, hand_pose, betas, global_orient, transl):
        return mano_jax.forward(
            model, hand_pose=hand_pose, betas=betas, global_orient=global_orient, transl=transl
        ).vertices

    forward = jax.jit(vertices)

    def loss(params, model, target):
        return jnp.mean((vertices(model, *params) - target) ** 2)

    forward_backward = jax.jit(jax.value_and_grad(loss))

    results: dict = {
        "model": model.name or "fixture",
        "vertices": model.num_vertices,
        "dtype": "float32",
        "jax": jax.__version__,
        "machine": f"{platform.machine()}, {jax.devices()[0].platform}, {jax.local_device_count()} device(s)",
        # Other work on the machine slows every number here; the load says how busy it was.
        "load_average_start": os.getloadavg()[0],
        "forward_hands_per_s": {},
        "forward_backward_hands_per_s": {},
        "batch1_latency_ms": None,
        "compiled_memory_mb": {},
        "peers_hands_per_s": PEERS,
    }
    for batch in BATCHES:
        x = inputs(model, batch)
        t = median_seconds(forward, (model, *x), args.repeat_seconds)
        results["forward_hands_per_s"][batch] = batch / t
        if batch == 1:
            results["batch1_latency_ms"] = t * 1e3
        target = forward(model, *inputs(model, batch, seed=1))
        t = median_seconds(forward_backward, (x, model, target), args.repeat_seconds)
        results["forward_backward_hands_per_s"][batch] = batch / t
        for key, compiled in (
            ("compiled_memory_mb", forward.lower(model, *x).compile()),
            ("compiled_memory_forward_backward_mb", forward_backward.lower(x, model, target).compile()),
        ):
            memory = compiled.memory_analysis()
            if memory is not None:
                total = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
                results.setdefault(key, {})[batch] = total / 2**20
        print(
            f"batch {batch:5d}: forward {results['forward_hands_per_s'][batch]:>10,.0f} hands/s   "
            f"forward+backward {results['forward_backward_hands_per_s'][batch]:>10,.0f} hands/s   "
            f"compiled memory {results['compiled_memory_mb'].get(batch, float('nan')):7.1f} MB "
            f"(with backward {results.get('compiled_memory_forward_backward_mb', {}).get(batch, float('nan')):.1f} MB)",
            flush=True,
        )

    # Exact Jacobian of all vertices w.r.t. the 61 parameters (3 + 45 + S + 3) of each hand.
    def flat_vertices(params):
        s = model.num_betas
        return vertices(model, params[3:48], params[48 : 48 + s], params[:3], params[48 + s :])

    generic = jax.jit(jax.vmap(jax.jacfwd(flat_vertices)))

    @jax.jit
    def closed_form(params):
        s = model.num_betas
        return mano_jax.vertex_jacobian(
            model, global_orient=params[:, :3], hand_pose=params[:, 3:48],
            betas=params[:, 48 : 48 + s], transl=params[:, 48 + s :],
        )[1]  # fmt: skip

    for batch in (1, 64):
        params = jnp.asarray(
            np.random.default_rng(2).normal(size=(batch, 51 + model.num_betas)) * 0.3, jnp.float32
        )
        for name, fn in (("vertex_jacobian", closed_form), ("jax.jacfwd", generic)):
            t = median_seconds(fn, (params,), args.repeat_seconds)
            results.setdefault("jacobians_per_s", {}).setdefault(name, {})[batch] = batch / t
            print(
                f"exact Jacobians ({model.num_vertices * 3} x {params.shape[1]}) by {name}, "
                f"batch {batch}: {batch / t:,.0f} /s"
            )
    print(f"batch-1 forward latency: {results['batch1_latency_ms']:.3f} ms")

    results["load_average_end"] = os.getloadavg()[0]
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
