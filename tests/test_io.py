"""Loading MANO files safely: official/plain pickles, the left-hand fix, tips, .npz round trips, bad files."""

import pickle

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from mano_jax.io import BUNDLED_MODELS, ManoFileError, load_model, read_mano_pickle, save_model
from mano_jax.model import MANO_PARENTS
from tests import mano_fixture
from tests.mano_fixture import _Global, _Instance, _Py2Emitter, _Reduce


@pytest.fixture(scope="module")
def right_arrays():
    return mano_fixture.make_mano_arrays("right")


@pytest.fixture(scope="module")
def left_arrays():
    return mano_fixture.make_mano_arrays("left")


@pytest.fixture(scope="module")
def official_right(right_arrays, tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    return mano_fixture.write_official_pickle(folder / "MANO_RIGHT.pkl", right_arrays)


def _fields(model):
    return {k: np.asarray(v) for k, v in model.numpy().items()}


def _assert_same_model(a, b):
    fa, fb = _fields(a), _fields(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)
    assert (a.parents, a.tip_ids, a.side) == (b.parents, b.tip_ids, b.side)


# --- reading the official format ----------------------------------------------------------------------


@pytest.mark.parametrize("chumpy_via", ["reconstructor", "newobj"])
def test_official_and_plain_pickles_load_identically(right_arrays, official_right, tmp_path, chumpy_via):
    official = mano_fixture.write_official_pickle(
        tmp_path / "MANO_RIGHT.pkl", right_arrays, chumpy_via=chumpy_via
    )
    plain = mano_fixture.write_plain_pickle(tmp_path / "plain_right.pkl", right_arrays)
    a = load_model(official, dtype=jnp.float64)
    b = load_model(plain, dtype=jnp.float64)
    _assert_same_model(a, b)
    np.testing.assert_array_equal(np.asarray(a.J_regressor), right_arrays["J_regressor"].toarray())
    np.testing.assert_array_equal(np.asarray(a.v_template), right_arrays["v_template"])
    np.testing.assert_array_equal(np.asarray(a.faces), right_arrays["f"].astype(np.int32))
    np.testing.assert_allclose(np.asarray(a.hands_var), right_arrays["hands_coeffs"].var(axis=0), rtol=1e-12)
    assert a.faces.dtype == jnp.int32 and a.name == "MANO_RIGHT"


def test_chumpy_select_keeps_the_used_components_of_the_stored_ones(right_arrays, tmp_path):
    stored = right_arrays["shapedirs_stored"]
    assert stored.shape[-1] == 20
    raw = read_mano_pickle(mano_fixture.write_official_pickle(tmp_path / "MANO_RIGHT.pkl", right_arrays))
    np.testing.assert_array_equal(raw["shapedirs"], stored[:, :, :10])
    assert sp.issparse(raw["J_regressor"])  # tools that call .toarray() keep working

    seven = mano_fixture.official_shapedirs(stored, num_used=7)
    path = tmp_path / "seven.pkl"
    path.write_bytes(_Py2Emitter().dump({"shapedirs": seven}))
    np.testing.assert_array_equal(read_mano_pickle(path)["shapedirs"], stored[:, :, :7])


def test_float32_default_and_root_parent_mapped_to_minus_one(official_right, right_arrays):
    assert right_arrays["kintree_table"][0, 0] == 4294967295
    model = load_model(official_right)
    assert model.parents == MANO_PARENTS
    assert model.v_template.dtype == jnp.float32 and model.shapedirs.shape == (778, 3, 10)


@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_regressor_may_be_csr_or_dense(right_arrays, tmp_path, storage):
    arrays = dict(right_arrays)
    J = right_arrays["J_regressor"]
    arrays["J_regressor"] = sp.csr_matrix(J) if storage == "csr" else J.toarray()
    model = load_model(mano_fixture.write_plain_pickle(tmp_path / "m_right.pkl", arrays), dtype=jnp.float64)
    np.testing.assert_array_equal(np.asarray(model.J_regressor), J.toarray())


def test_modern_protocol_5_pickle_loads(right_arrays, tmp_path):
    path = tmp_path / "p5_right.pkl"
    path.write_bytes(pickle.dumps(mano_fixture._file_dict(right_arrays), protocol=5))
    reference = mano_fixture.write_plain_pickle(tmp_path / "p2_right.pkl", right_arrays)
    _assert_same_model(load_model(path, dtype=jnp.float64), load_model(reference, dtype=jnp.float64))


@pytest.mark.parametrize("protocol", [2, 5])
def test_numpy_scalars_load(tmp_path, protocol):
    path = tmp_path / "scalars.pkl"
    path.write_bytes(pickle.dumps({"scale": np.float64(2.5), "count": np.uint32(7)}, protocol=protocol))
    raw = read_mano_pickle(path)
    assert raw == {"scale": 2.5, "count": 7} and raw["count"].dtype == np.uint32


# --- sides and the left-hand shapedirs fix ------------------------------------------------------------


def test_left_fix_confirmed_against_sibling_right_file(right_arrays, left_arrays, tmp_path):
    mano_fixture.write_official_pickle(tmp_path / "MANO_RIGHT.pkl", right_arrays)
    left_path = mano_fixture.write_official_pickle(tmp_path / "MANO_LEFT.pkl", left_arrays)
    fixed = load_model(left_path, dtype=jnp.float64)
    as_stored = load_model(left_path, dtype=jnp.float64, fix_left_shapedirs=False)
    assert fixed.side == as_stored.side == "left"
    stored = left_arrays["shapedirs"]
    np.testing.assert_array_equal(np.asarray(as_stored.shapedirs), stored)
    np.testing.assert_array_equal(np.asarray(fixed.shapedirs)[:, 0], -stored[:, 0])
    np.testing.assert_array_equal(np.asarray(fixed.shapedirs)[:, 1:], stored[:, 1:])
    assert "confirmed by comparing with MANO_RIGHT.pkl" in fixed.provenance
    assert "fix_left_shapedirs=False" in as_stored.provenance
    # The fixed left hand's shape blend shapes are the right hand's mirrored.
    right = load_model(tmp_path / "MANO_RIGHT.pkl", dtype=jnp.float64)
    np.testing.assert_array_equal(np.asarray(fixed.shapedirs) * [[-1], [1], [1]], np.asarray(right.shapedirs))


def test_already_fixed_left_file_is_not_negated_twice(right_arrays, left_arrays, tmp_path):
    mano_fixture.write_official_pickle(tmp_path / "MANO_RIGHT.pkl", right_arrays)
    good = dict(left_arrays)
    good["shapedirs_stored"] = left_arrays["shapedirs_stored"] * np.array([-1.0, 1.0, 1.0])[:, None]
    path = mano_fixture.write_official_pickle(tmp_path / "MANO_LEFT.pkl", good)
    model = load_model(path, dtype=jnp.float64)
    np.testing.assert_array_equal(np.asarray(model.shapedirs), good["shapedirs_stored"][:, :, :10])
    assert "already mirrored" in model.provenance


def test_left_fix_assumed_without_sibling(left_arrays, tmp_path):
    path = mano_fixture.write_plain_pickle(tmp_path / "MANO_LEFT.pkl", left_arrays)
    model = load_model(path, dtype=jnp.float64)
    np.testing.assert_array_equal(np.asarray(model.shapedirs)[:, 0], -left_arrays["shapedirs"][:, 0])
    assert "assumed" in model.provenance


@pytest.mark.parametrize(
    "filename, side_arg, expected",
    [
        ("MANO_LEFT.pkl", None, "left"),
        ("my_left_hand.pkl", None, "left"),
        ("MANO_RIGHT.pkl", None, "right"),
        ("hand_model.pkl", None, "right"),
        ("hand_model.pkl", "left", "left"),
        ("MANO_LEFT.pkl", "right", "right"),
    ],
)
def test_side_from_argument_or_file_name(right_arrays, tmp_path, filename, side_arg, expected):
    model = load_model(mano_fixture.write_plain_pickle(tmp_path / filename, right_arrays), side=side_arg)
    assert model.side == expected
    if side_arg is None and filename == "hand_model.pkl":
        assert "assumed" in model.provenance
    elif side_arg is None:
        assert "from the file name" in model.provenance


# --- fingertips -------------------------------------------------------------------------------------


def test_tip_selection(official_right):
    assert load_model(official_right).tip_ids == (745, 317, 444, 556, 673)
    assert load_model(official_right, tips="smplx").tip_ids == (744, 320, 443, 554, 671)
    assert load_model(official_right, tips="boukhayma").tip_ids == (745, 333, 444, 555, 672)
    assert load_model(official_right, tips=(1, 2, 3, 4, 5)).tip_ids == (1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="unknown fingertip set"):
        load_model(official_right, tips="openpose")
    with pytest.raises(ValueError, match="5 vertex ids"):
        load_model(official_right, tips=(1, 2, 3, 4, 778))


def test_non_mano_topology_needs_explicit_tips(tmp_path):
    arrays = mano_fixture.make_mano_arrays("right")
    keep = np.arange(700)
    arrays.update(
        v_template=arrays["v_template"][keep],
        weights=arrays["weights"][keep],
        J_regressor=arrays["J_regressor"][:, keep],
        shapedirs=arrays["shapedirs"][keep],
        posedirs=arrays["posedirs"][keep],
        f=arrays["f"][(arrays["f"] < 700).all(axis=1)],
    )
    path = mano_fixture.write_plain_pickle(tmp_path / "small_right.pkl", arrays)
    with pytest.raises(ManoFileError, match="700 vertices.*pass tips"):
        load_model(path)
    assert load_model(path, tips=(0, 1, 2, 3, 4)).num_vertices == 700


# --- mano-jax .npz ----------------------------------------------------------------------------------


def test_npz_round_trip_is_exact_and_byte_reproducible(left_arrays, tmp_path):
    path = mano_fixture.write_official_pickle(tmp_path / "MANO_LEFT.pkl", left_arrays)
    model = load_model(path, tips="smplx")
    first = save_model(model, tmp_path / "a.npz")
    again = load_model(first)
    _assert_same_model(model, again)
    assert (again.name, again.provenance, again.side) == (model.name, model.provenance, "left")
    second = save_model(again, tmp_path / "b.npz")
    assert first.read_bytes() == second.read_bytes()
    assert load_model(first, tips="manopth").tip_ids == (745, 317, 444, 556, 673)
    with pytest.raises(ValueError, match="holds a left hand"):
        load_model(first, side="right")


def test_npz_extras_are_stored_and_ignored(official_right, tmp_path):
    model = load_model(official_right)
    path = save_model(model, tmp_path / "m.npz", extras={"rig_joints": np.ones((16, 3))})
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["rig_joints"], np.ones((16, 3)))
    _assert_same_model(load_model(path), model)
    with pytest.raises(ValueError, match="model entries"):
        save_model(model, tmp_path / "bad.npz", extras={"faces": np.zeros(3)})


def test_npz_dtype_cast(official_right, tmp_path):
    path = save_model(load_model(official_right, dtype=jnp.float64), tmp_path / "m.npz")
    assert load_model(path).v_template.dtype == jnp.float32
    assert load_model(path, dtype=jnp.float64).v_template.dtype == jnp.float64


def test_npz_problems_name_the_file(official_right, tmp_path):
    path = save_model(load_model(official_right), tmp_path / "m.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ManoFileError, match="truncated.npz"):
        load_model(truncated)
    with np.load(path) as npz:
        entries = {k: npz[k] for k in npz.files}
    no_faces = tmp_path / "no_faces.npz"
    np.savez(no_faces, **{k: v for k, v in entries.items() if k != "faces"})
    with pytest.raises(ManoFileError, match=r"no_faces.npz: missing model entries \['faces'\]"):
        load_model(no_faces)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(ManoFileError, match="foreign.npz: not a mano-jax model file"):
        load_model(foreign)


# --- unsafe and broken files ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", mano_fixture.MALICIOUS_KINDS)
def test_malicious_pickle_is_refused_before_its_payload_runs(tmp_path, kind):
    marker = tmp_path / "payload_ran"
    path = mano_fixture.write_malicious_pickle(tmp_path / "MANO_RIGHT.pkl", marker, kind=kind)
    with pytest.raises(ManoFileError, match="refused to load") as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "posix.system", "builtins.eval", "stack_global"])
def test_malicious_fixture_payload_is_real(tmp_path, kind):
    """The payloads above do run under a plain unpickler, so the refusal test means something."""
    marker = tmp_path / "payload_ran"
    path = mano_fixture.write_malicious_pickle(tmp_path / "evil.pkl", marker, kind=kind)
    pickle.loads(path.read_bytes(), encoding="latin1")
    assert marker.exists()


_OBJECT = _Global("__builtin__", "object")
_SET = _Global("__builtin__", "set")
_RECONSTRUCTOR = _Global("copy_reg", "_reconstructor")
_ARRAY = _Global("numpy.core.multiarray", "_reconstruct")


@pytest.mark.parametrize(
    "payload, message",
    [
        (_Reduce(_RECONSTRUCTOR, (_Global("numpy", "dtype"), _OBJECT, None)), "_reconstructor"),
        (_Reduce(_Global("_codecs", "encode"), ("abc", "rot13")), "rot13"),
        (_Reduce(_ARRAY, (_SET, (0,), b"b")), "array reconstruction"),
        (_Instance(_Global("chumpy.ch_ops", "add"), {}), "unsupported chumpy class chumpy.ch_ops.add"),
    ],
)  # fmt: skip
def test_allowed_names_in_unexpected_combinations_are_refused(tmp_path, payload, message):
    path = tmp_path / "odd.pkl"
    path.write_bytes(_Py2Emitter().dump({"v_template": payload}))
    with pytest.raises(ManoFileError, match=message):
        load_model(path)


def test_truncated_garbage_and_empty_files(official_right, tmp_path):
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(official_right.read_bytes()[: 1_000_000])
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(np.random.default_rng(0).bytes(2000))
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    cases = [(truncated, "truncated or corrupt"), (garbage, "not a readable MANO pickle"), (empty, "empty")]
    for path, message in cases:
        with pytest.raises(ManoFileError, match=message) as info:
            load_model(path)
        assert str(path) in str(info.value)


def test_not_a_dictionary(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ManoFileError, match="expected a pickled dictionary"):
        load_model(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("posedirs"), r"missing model entries \['posedirs'\]"),
        (lambda a: a.update(posedirs=a["posedirs"][:, :, :134]),
         r"'posedirs' has shape \(778, 3, 134\), expected \(778, 3, 135\)"),
        (lambda a: a.update(weights=a["weights"][:, :15]), r"'weights' has shape"),
        (lambda a: a.update(J_regressor=a["J_regressor"][:, :700]), r"'J_regressor' has shape \(16, 700\)"),
        (lambda a: a.update(hands_components=a["hands_components"][:44]), r"'hands_components' has shape"),
        (lambda a: a.update(v_template=np.where(np.arange(778)[:, None] == 5, np.nan, a["v_template"])),
         r"'v_template' has NaN or infinite entries \(first at index \(5, 0\)\)"),
        (lambda a: a.update(f=a["f"] + 1000), "faces refer to vertex ids outside"),
        (lambda a: a.update(kintree_table=a["kintree_table"][:, ::-1]), "kintree_table"),
        (lambda a: a.update(hands_coeffs=a["hands_coeffs"][:, :40]), r"'hands_coeffs' has shape"),
    ],
)  # fmt: skip
def test_inconsistent_files_name_the_file_and_the_problem(right_arrays, tmp_path, change, message):
    arrays = dict(right_arrays)
    change(arrays)
    path = mano_fixture.write_official_pickle(tmp_path / "MANO_RIGHT.pkl", arrays)
    with pytest.raises(ManoFileError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_unknown_model_name_lists_the_bundled_ones():
    with pytest.raises(ManoFileError, match="no such bundled model") as info:
        load_model("open-middle")
    for name in BUNDLED_MODELS:
        assert name in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ManoFileError, match="no such file"):
        load_model(tmp_path / "MANO_RIGHT.pkl")
    with pytest.raises(ManoFileError, match="is a folder"):
        load_model(tmp_path)
