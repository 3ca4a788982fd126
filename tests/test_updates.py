"""The update checker: what an update must look like before it is folded."""

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedray.actors.combiner.checks import check_update, expected_for
from fedray.actors.combiner.share import ModelVersion
from fedray.errors import SerializationError, UpdateRejected
from fedray.serialization import decode, encode, read_layout
from fedray.strategies.declaration import UpdateLayout


def expected(model: dict, layout: UpdateLayout | None = None):
    """What updates of ``model`` are checked against, as a combiner builds it."""
    data = encode(model)
    version = ModelVersion(0, "m", read_layout(data), decode(data), len(data))
    return expected_for(layout or UpdateLayout(), version, 1 << 30)


GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
LAYOUT = expected(GLOBAL)


def _reason(update: dict) -> str:
    with pytest.raises(UpdateRejected) as info:
        check_update(encode(update), LAYOUT, 1 << 20)
    return info.value.reason


def test_a_matching_finite_update_passes_as_views():
    model, _ = check_update(encode({"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}),
                         LAYOUT, 1 << 20)
    assert model["w"].sum() == 6


@pytest.mark.parametrize(("update", "reason"), [
    ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}, "wrong_shape"),
    ({"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float32)}, "wrong_dtype"),
    ({"w": np.zeros((2, 3), np.float32)}, "wrong_names"),
    ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32),
      "x": np.zeros(1, np.float32)}, "wrong_names"),
    ({"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}, "non_finite"),
    ({"w": np.zeros((2, 3), np.float32), "b": np.array([0, np.inf, 0], np.float32)}, "non_finite"),
])
def test_bad_updates_are_rejected_with_a_reason(update, reason):
    assert _reason(update) == reason


def test_size_bound_and_garbage():
    with pytest.raises(UpdateRejected) as info:
        check_update(encode(GLOBAL), LAYOUT, 10)
    assert info.value.reason == "too_large"
    with pytest.raises(UpdateRejected) as info:
        check_update(b"garbage bytes here", LAYOUT, 1 << 20)
    assert info.value.reason == "malformed"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_checker(data):
    with contextlib.suppress(UpdateRejected):
        check_update(data, LAYOUT, 1 << 20)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=3, max_size=3))
def test_non_finite_values_anywhere_are_caught(values):
    update = {"w": np.zeros((2, 3), np.float32), "b": np.array(values, np.float32)}
    if np.isfinite(update["b"]).all():
        check_update(encode(update), LAYOUT, 1 << 20)
    else:
        assert _reason(update) == "non_finite"


# --- properties: random layouts against random candidates, random safetensors headers ---

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
          "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = st.sampled_from(["w", "b", "conv.weight", "bn.num_batches_tracked", "x"])
SHAPES = st.lists(st.integers(0, 3), max_size=3).map(tuple)
SPECS = st.dictionaries(NAMES, st.tuples(st.sampled_from(sorted(DTYPES)), SHAPES),
                        min_size=1, max_size=4)


def _model(spec, fill=1) -> dict:
    return {name: np.full(shape, fill, DTYPES[dtype]) for name, (dtype, shape) in spec.items()}


def _expected_reason(want: dict, got: dict, poisoned: bool) -> str | None:
    """What check_update must say, from the specs alone (in the global model's order)."""
    if set(want) != set(got):
        return "wrong_names"
    for name, (dtype, shape) in want.items():
        if got[name][0] != dtype:
            return "wrong_dtype"
        if got[name][1] != shape:
            return "wrong_shape"
    return "non_finite" if poisoned else None


@settings(max_examples=300, deadline=None)
@given(SPECS, st.data())
def test_the_checker_accepts_exactly_the_updates_that_match_the_layout(spec, data):
    layout = expected(_model(spec, fill=0))
    want = layout.spec
    got = dict(want)
    for name in list(got):
        change = data.draw(st.sampled_from(["keep", "keep", "dtype", "shape", "drop"]), name)
        if change == "dtype":
            got[name] = (data.draw(st.sampled_from(sorted(DTYPES))), got[name][1])
        elif change == "shape":
            got[name] = (got[name][0], data.draw(SHAPES))
        elif change == "drop" and len(got) > 1:
            del got[name]
    if data.draw(st.booleans(), "add a tensor"):
        got.update(data.draw(SPECS, "extra"))
    update = _model(got)
    floats = [n for n, a in update.items() if a.dtype.kind == "f" and a.size]
    poisoned = bool(floats) and data.draw(st.booleans(), "poison")
    if poisoned:
        target = update[data.draw(st.sampled_from(floats))].reshape(-1)
        target[data.draw(st.integers(0, target.size - 1))] = data.draw(
            st.sampled_from([np.nan, np.inf, -np.inf]))
    reason = _expected_reason(want, {n: (k, tuple(a.shape)) for n, (k, _), a in
                                     ((n, got[n], update[n]) for n in got)}, poisoned)
    if reason is None:
        model, _ = check_update(encode(update), layout, 1 << 20)
        assert {n: a.shape for n, a in model.items()} == {n: s for n, (_, s) in want.items()}
        assert all(np.array_equal(model[n], update[n]) for n in model)
    else:
        with pytest.raises(UpdateRejected) as info:
            check_update(encode(update), layout, 1 << 20)
        assert info.value.reason == reason


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=8)
DIMS = st.one_of(st.integers(-2, 4), st.integers(2**31, 2**66), st.floats(0, 4), st.booleans(),
                 st.text(max_size=2), st.just(None))
ENTRIES = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from([*DTYPES, "F8", "f32", ""]), JSON),
    "shape": st.one_of(st.lists(DIMS, max_size=3), JSON),
    "data_offsets": st.one_of(st.lists(DIMS, min_size=2, max_size=2),
                              st.lists(st.integers(0, 64), min_size=2, max_size=2).map(sorted),
                              JSON),
}) | JSON


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["w", "b", "__metadata__", ""]) | st.text(max_size=3),
                       ENTRIES, max_size=4),
       st.binary(max_size=64), st.booleans())
def test_random_safetensors_headers_are_parsed_safely_or_refused(entries, payload, as_array):
    head = json.dumps(list(entries.values()) if as_array else entries).encode()
    data = struct.pack("<Q", len(head)) + head + payload
    try:
        layout = read_layout(data)
    except SerializationError:
        pass
    else:  # whatever it accepted describes bytes that are really there, and decodes
        for info in layout.tensors.values():
            assert layout.data_offset + info.end <= len(data)
            count = int(np.prod(info.shape)) if info.shape else 1
            assert info.end - info.start == count * np.dtype(DTYPES.get(info.dtype, "u2")).itemsize
        model = decode(data, layout)
        assert {n: a.shape for n, a in model.items()} == {n: t.shape for n, t in layout.tensors.items()}
    with contextlib.suppress(UpdateRejected):
        check_update(data, LAYOUT, 1 << 20)


def test_a_scalar_tensor_keeps_its_shape():
    """Like PyTorch's ``num_batches_tracked``: 0-d, not (1,)."""
    model = {"bn.num_batches_tracked": np.int64(7), "w": np.ones(2, np.float32)}
    assert read_layout(encode(model)).spec()["bn.num_batches_tracked"] == ("I64", ())
    assert decode(encode(model))["bn.num_batches_tracked"].shape == ()


def test_the_magnitude_bound_finds_every_nan_and_infinity_even_past_an_overflowing_sum():
    from fedray.actors.combiner.checks import magnitude_bound

    big = np.full(3_000, 3e38, np.float32)  # its sum overflows float32, yet all are finite
    assert magnitude_bound(big) == np.finfo(np.float32).max
    for bad in (np.inf, -np.inf, np.nan):
        poisoned = big.copy()
        poisoned[1234] = bad
        assert np.isnan(magnitude_bound(poisoned))
    wide = np.full(10, 1e300)
    assert magnitude_bound(wide) == 1e300  # float64: the true magnitude (overflow check)
    assert magnitude_bound(np.arange(5, dtype=np.int32)) == np.iinfo(np.int32).max
