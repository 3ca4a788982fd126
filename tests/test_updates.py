"""The update checker: what an update must look like before it is folded."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedray.errors import UpdateRejected
from fedray.serialization import encode, read_layout
from fedray.updates import check_update

GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
LAYOUT = read_layout(encode(GLOBAL))


def _reason(update: dict) -> str:
    with pytest.raises(UpdateRejected) as info:
        check_update(encode(update), LAYOUT, 1 << 20)
    return info.value.reason


def test_a_matching_finite_update_passes_as_views():
    model = check_update(encode({"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}),
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
