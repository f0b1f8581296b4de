import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import mano_jax  # noqa: E402
from tests.mano_fixture import make_mano_arrays, write_plain_pickle  # noqa: E402


@pytest.fixture(scope="session")
def mano_right(tmp_path_factory):
    """A MANO-format model of real size (778 vertices) from the test fixture, float64."""
    path = write_plain_pickle(tmp_path_factory.mktemp("mano") / "MANO_RIGHT.pkl", make_mano_arrays("right"))
    return mano_jax.load_model(path, dtype=jnp.float64)


@pytest.fixture(scope="session")
def mano_left(tmp_path_factory):
    """The fixture's left model (with the released left file's shapedirs bug fixed on load), float64."""
    path = write_plain_pickle(tmp_path_factory.mktemp("mano") / "MANO_LEFT.pkl", make_mano_arrays("left"))
    return mano_jax.load_model(path, dtype=jnp.float64)
