"""mano-jax against an independent implementation: smplx's MANO layer (outputs from tools/make_golden.py).

The fixture model is rebuilt here, written as a plain and as an official-style (chumpy, Python 2) pickle,
loaded through `load_model` in float64 and posed with the inputs smplx was given.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import mano_jax
from mano_jax.io import load_model
from tests import mano_fixture

DATA = Path(__file__).parent / "data"
TOLERANCE_M = 1e-6


@pytest.fixture(scope="module", params=["right", "left"])
def golden(request):
    side = request.param
    with np.load(DATA / f"golden_{side}.npz") as npz:
        data = {k: npz[k] for k in npz.files}
    arrays = mano_fixture.make_mano_arrays(side)
    assert str(data["fixture_fingerprint"]) == mano_fixture.fixture_fingerprint(arrays), (
        "tests/mano_fixture.py changed since the golden outputs were made: rerun tools/make_golden.py"
    )
    return side, arrays, data


@pytest.fixture(scope="module", params=["plain", "official"])
def loaded(request, golden, tmp_path_factory):
    side, arrays, data = golden
    path = tmp_path_factory.mktemp(f"golden_{side}_{request.param}") / f"MANO_{side.upper()}.pkl"
    if request.param == "plain":
        mano_fixture.write_plain_pickle(path, arrays)
    else:
        mano_fixture.write_official_pickle(path, arrays)
    # smplx keeps the left file's shape blend shapes as stored (the released bug), so compare like that.
    model = load_model(path, dtype=jnp.float64, fix_left_shapedirs=False)
    assert model.side == side
    return model, data


@pytest.mark.parametrize(
    "config", ["axis_angle_flat", "axis_angle_mean", "pca6_flat", "pca6_mean", "pca45_flat", "pca45_mean"]
)
def test_forward_matches_smplx_within_a_micrometre(loaded, config):
    model, data = loaded
    assert config in data["configs"]
    num_pca_comps = int(data[f"{config}/num_pca_comps"])
    hand_pose = data[f"{config}/hand_pose"]
    assert hand_pose.shape[-1] == (num_pca_comps or 45)
    out = mano_jax.forward(
        model,
        hand_pose=hand_pose,
        betas=data[f"{config}/betas"],
        global_orient=data[f"{config}/global_orient"],
        transl=data[f"{config}/transl"],
        pose_space="pca" if num_pca_comps else "axis_angle",
        num_pca_comps=num_pca_comps or None,
        flat_hand_mean=bool(data[f"{config}/flat_hand_mean"]),
    )
    vertex_error = np.abs(np.asarray(out.vertices) - data[f"{config}/vertices"]).max()
    joint_error = np.abs(np.asarray(out.joints) - data[f"{config}/joints"]).max()
    assert vertex_error < TOLERANCE_M, f"vertices differ from smplx by up to {vertex_error:.3g} m"
    assert joint_error < TOLERANCE_M, f"joints differ from smplx by up to {joint_error:.3g} m"
    # The poses are not trivial: the hand moved well beyond the tolerance.
    assert np.abs(data[f"{config}/vertices"] - np.asarray(model.v_template)).max() > 1e-2


def test_left_fix_changes_the_left_hand_beyond_tolerance(tmp_path):
    """The comparison above would notice if the shapedirs fix were applied on the wrong side."""
    arrays = mano_fixture.make_mano_arrays("left")
    path = mano_fixture.write_plain_pickle(tmp_path / "MANO_LEFT.pkl", arrays)
    with np.load(DATA / "golden_left.npz") as npz:
        data = {k: npz[k] for k in npz.files if k.startswith("axis_angle_flat/")}
    fixed = load_model(path, dtype=jnp.float64)
    out = mano_jax.forward(
        fixed,
        hand_pose=data["axis_angle_flat/hand_pose"],
        betas=data["axis_angle_flat/betas"],
        global_orient=data["axis_angle_flat/global_orient"],
        transl=data["axis_angle_flat/transl"],
    )
    assert np.abs(np.asarray(out.vertices) - data["axis_angle_flat/vertices"]).max() > 1e-3
