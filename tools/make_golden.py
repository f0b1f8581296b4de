"""Generate golden MANO outputs with an independent implementation (smplx's MANO layer, PyTorch).

Runs in a throwaway environment, not the project's (no JAX needed, smplx and torch are not project
dependencies):

    python3 -m venv /tmp/smplx-venv
    /tmp/smplx-venv/bin/pip install torch==2.13.0 smplx scipy
    /tmp/smplx-venv/bin/python tools/make_golden.py

It builds the synthetic MANO-format fixture of `tests/mano_fixture.py` (right and left, real size), writes
it as MANO_RIGHT.pkl / MANO_LEFT.pkl (plain pickles, which smplx reads without chumpy), poses it with
smplx in float64 for seeded random inputs in every pose convention, and stores inputs and outputs in
`tests/data/golden_{right,left}.npz`. `tests/test_golden.py` requires mano-jax to agree within 1e-6 m.

What is compared: smplx's MANO returns the 16 joints of the kinematic chain (its fingertip selector is
disabled in MANO.forward and no joint_mapper is set here), the same as `ManoOutput.joints`. The left
model is used as stored, with the released file's unmirrored shape blend shapes (smplx does not fix
them), so the test loads it with `fix_left_shapedirs=False`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import smplx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import mano_fixture  # noqa: E402  (numpy/scipy only, shared with the tests)

SEED = 20240
BATCH = 2
#: name -> (number of PCA components or None for axis-angle, flat_hand_mean)
CONFIGS = {
    "axis_angle_flat": (None, True),
    "axis_angle_mean": (None, False),
    "pca6_flat": (6, True),
    "pca6_mean": (6, False),
    "pca45_flat": (45, True),
    "pca45_mean": (45, False),
}


def smplx_layer(model_file: Path, is_rhand: bool, num_pca_comps, flat_hand_mean: bool):
    use_pca = num_pca_comps is not None
    layer = smplx.MANO(
        str(model_file),
        is_rhand=is_rhand,
        use_pca=use_pca,
        num_pca_comps=num_pca_comps or 6,
        flat_hand_mean=flat_hand_mean,
        batch_size=BATCH,
        dtype=torch.float64,
    )
    if num_pca_comps == 45:
        # smplx switches PCA off when asked for 45 components (it then reads hand_pose as axis-angle).
        # Turn it back on with the full basis so the layer really maps 45 PCA coefficients through
        # hands_components, which is what mano-jax's pose_space="pca" with 45 components means. This uses
        # smplx's own forward (einsum with `hand_components`, then adding the mean pose) unchanged.
        assert not layer.use_pca, "smplx no longer disables PCA at 45 components: drop this workaround"
        layer.use_pca = True
        layer.register_buffer("hand_components", torch.tensor(layer.np_hand_components, dtype=torch.float64))
    assert layer.use_pca == use_pca and layer.is_rhand == is_rhand
    if use_pca:
        assert tuple(layer.hand_components.shape) == (num_pca_comps, 45)
    assert layer.joint_mapper is None
    return layer


def golden_for_side(side: str, workdir: Path, rng: np.random.Generator) -> dict:
    arrays = mano_fixture.make_mano_arrays(side)
    model_file = mano_fixture.write_plain_pickle(workdir / f"MANO_{side.upper()}.pkl", arrays)
    out = {
        "side": np.array(side),
        "fixture_fingerprint": np.array(mano_fixture.fixture_fingerprint(arrays)),
        "configs": np.array(list(CONFIGS)),
        "smplx_version": np.array(_version("smplx")),
        "torch_version": np.array(torch.__version__),
        "numpy_version": np.array(np.__version__),
    }
    for name, (num_pca_comps, flat_hand_mean) in CONFIGS.items():
        layer = smplx_layer(model_file, side == "right", num_pca_comps, flat_hand_mean)
        inputs = {
            "betas": rng.normal(size=(BATCH, mano_fixture.NUM_SHAPES)),
            "global_orient": rng.normal(size=(BATCH, 3)) * 0.8,
            "transl": rng.normal(size=(BATCH, 3)) * 0.1,
            "hand_pose": rng.normal(size=(BATCH, num_pca_comps or 45)) * (1.0 if num_pca_comps else 0.4),
        }
        with torch.no_grad():
            result = layer(**{k: torch.tensor(v, dtype=torch.float64) for k, v in inputs.items()})
        vertices = result.vertices.numpy()
        joints = result.joints.numpy()
        assert vertices.shape == (BATCH, mano_fixture.NUM_VERTICES, 3)
        assert joints.shape == (BATCH, mano_fixture.NUM_JOINTS, 3), joints.shape
        for key, value in inputs.items():
            out[f"{name}/{key}"] = value
        out[f"{name}/num_pca_comps"] = np.array(num_pca_comps or 0)
        out[f"{name}/flat_hand_mean"] = np.array(flat_hand_mean)
        out[f"{name}/vertices"] = vertices
        out[f"{name}/joints"] = joints
    return out


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "tests" / "data")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("right", "left"):
            data = golden_for_side(side, Path(tmp), rng)
            target = args.out_dir / f"golden_{side}.npz"
            # mano_jax._atomic is not importable here (no JAX in this environment): same idea inline.
            partial = target.with_name(f".{target.name}.partial.npz")
            np.savez_compressed(partial, **data)
            os.replace(partial, target)
            print(f"{target}: {target.stat().st_size / 1e3:.0f} kB, smplx {data['smplx_version']}, "
                  f"torch {data['torch_version']}")  # fmt: skip


if __name__ == "__main__":
    main()
