"""The edge's memory bounds (issue 16): one cached copy of a large model, and no second
copy to encode an update a train callback wrote in place."""

import numpy as np

from fedray.edge.tasks import ModelCache
from fedray.edge.workers import CallbackWorker
from fedray.serialization import decode, encode, serialized_in_place, writable_copy

MiB = 1 << 20


def _view(n: int) -> memoryview:
    return memoryview(bytes(n))


def test_a_large_model_evicts_the_old_copy_before_it_is_downloaded():
    cache = ModelCache(size=2, max_bytes=64 * MiB)
    cache.put("a", _view(40 * MiB))
    cache.make_room(40 * MiB)  # 40 + 40 > 64: "a" goes before the download
    assert len(cache) == 0
    cache.put("b", _view(40 * MiB))
    assert cache.get("b") is not None


def test_small_models_keep_two_entries():
    cache = ModelCache(size=2, max_bytes=64 * MiB)
    cache.put("a", _view(MiB))
    cache.make_room(MiB)
    cache.put("b", _view(MiB))
    assert cache.get("a") is not None and cache.get("b") is not None
    cache.make_room(MiB)  # a third: the oldest goes (count bound)
    assert len(cache) == 1 and cache.get("b") is not None


def test_the_newest_entry_stays_even_over_the_byte_bound():
    cache = ModelCache(size=2, max_bytes=MiB)
    cache.put("big", _view(4 * MiB))
    assert cache.get("big") is not None  # a delta's parent must survive until rebuilt


def _model():
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array([1], np.int64)}


def test_writable_copy_gives_views_that_are_the_serialized_model():
    data = bytearray(encode(_model()))  # writable: a copy must not write through to it
    buf, params = writable_copy(memoryview(data).toreadonly())
    params["w"] += 1
    assert serialized_in_place(buf, params, params) is buf
    np.testing.assert_array_equal(decode(buf)["w"], _model()["w"] + 1)
    assert bytes(data) == encode(_model())  # the downloaded bytes are untouched


def test_new_arrays_are_not_taken_for_the_copy():
    buf, params = writable_copy(encode(_model()))
    assert serialized_in_place(buf, params, {**params, "w": params["w"] + 1}) is None
    assert serialized_in_place(buf, params, {"w": params["w"]}) is None


def test_the_callback_worker_encodes_in_place_and_new_results_alike():
    model = encode(_model())

    def in_place(params, config):
        params["w"] *= 2
        return params, 3, {}

    def fresh(params, config):
        return {k: v * 2 for k, v in params.items()}, 3, {}

    a, _, _ = CallbackWorker(in_place).train(model, {})
    b, _, _ = CallbackWorker(fresh).train(model, {})
    np.testing.assert_array_equal(decode(a)["w"], decode(b)["w"])
    assert isinstance(a, bytearray)  # the copy itself went up: nothing re-encoded
    np.testing.assert_array_equal(decode(b)["n"], [2])
