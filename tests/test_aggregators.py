"""FedAvg math: weighted means, streaming folds, and reduce across combiners."""

import numpy as np
import pytest

from fedray.aggregators import make_aggregator
from fedray.aggregators.base import add_scaled
from fedray.errors import ConfigError

SPEC = {"w": ("F32", (3, 4)), "b": ("F32", (4,))}


def _updates(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [({"w": rng.normal(size=(3, 4)).astype(np.float32),
              "b": rng.normal(size=4).astype(np.float32)}, int(rng.integers(1, 500)))
            for _ in range(n)]


def _global():
    return {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}


def _run(groups):
    agg = make_aggregator("fedavg")
    partials = []
    for group in groups:
        acc = agg.start(SPEC)
        for update, weight in group:
            acc.fold(update, weight, {"loss": float(weight)})
        partials.append(acc.partial())
    return agg.finish(_global(), agg.reduce(partials)), agg.reduce(partials)


def test_fedavg_is_the_example_weighted_mean():
    updates = _updates(5)
    model, reduced = _run([updates])
    weights = np.array([w for _, w in updates], float)
    for name in ("w", "b"):
        expected = sum(u[name] * w for u, w in updates) / weights.sum()
        np.testing.assert_allclose(model[name], expected, rtol=1e-5, atol=1e-6)
        assert model[name].dtype == np.float32
    assert reduced.count == 5 and reduced.weight == weights.sum()


def test_two_combiners_of_three_equal_one_combiner_of_six():
    updates = _updates(6, seed=1)
    split, _ = _run([updates[:3], updates[3:]])
    single, _ = _run([updates])
    for name in split:
        np.testing.assert_allclose(split[name], single[name], rtol=1e-6, atol=1e-7)


def test_reduce_is_weighted_by_examples_not_by_combiner():
    big = [({"w": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32)}, 900)]
    small = [({"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}, 100)]
    model, _ = _run([big, small])
    np.testing.assert_allclose(model["w"], 0.9, rtol=1e-6)  # an unweighted mean would say 0.5


def test_metrics_are_example_weighted_and_skip_non_numbers():
    agg = make_aggregator("fedavg")
    acc = agg.start(SPEC)
    u = _global()
    acc.fold(u, 1, {"acc": 1.0, "note": "x", "flag": True})
    acc.fold(u, 3, {"acc": 0.0, "bad": float("nan")})
    assert acc.partial().metrics() == {"acc": 0.25}


def test_empty_partials_are_skipped_and_all_empty_is_an_error():
    agg = make_aggregator("fedavg")
    empty = agg.start(SPEC).partial()
    model, _ = _run([_updates(2)])
    with pytest.raises(ValueError):
        agg.reduce([empty])
    assert agg.reduce([empty, _run([_updates(2)])[1]]).count == 2
    assert model["w"].shape == (3, 4)


def test_integer_tensors_are_rounded_back():
    agg = make_aggregator("fedavg")
    acc = agg.start({"n": ("I64", (2,))})
    acc.fold({"n": np.array([1, 2])}, 1)
    acc.fold({"n": np.array([2, 3])}, 1)
    out = agg.finish({"n": np.zeros(2, np.int64)}, agg.reduce([acc.partial()]))
    assert out["n"].dtype == np.int64 and out["n"].tolist() == [2, 2]


def test_add_scaled_works_across_block_boundaries(monkeypatch):
    import fedray.aggregators.base as base

    monkeypatch.setattr(base, "BLOCK", 7)
    acc = np.zeros(50)
    value = np.arange(50, dtype=np.float32)
    add_scaled(acc, value, 2.0)
    np.testing.assert_array_equal(acc, value * 2)


def test_unknown_aggregator_and_bad_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown aggregator"):
        make_aggregator("nope")
    with pytest.raises(ConfigError, match="aggregator_kwargs"):
        make_aggregator("fedavg", {"lr": 1})
    with pytest.raises(ConfigError, match="cannot load"):
        make_aggregator("no_such_module:Thing")


def test_fedavgm_moves_with_server_momentum_and_its_state_round_trips():
    agg = make_aggregator("fedavgm", {"momentum": 0.5, "server_lr": 1.0})
    model = _global()
    for _ in range(2):
        acc = agg.start(SPEC)
        acc.fold({k: v + 1 for k, v in model.items()}, 10)
        model = agg.finish(model, agg.reduce([acc.partial()]))
    np.testing.assert_allclose(model["w"], 1 + 1.5)  # velocity -1, then -1.5
    restored = make_aggregator("fedavgm", {"momentum": 0.5})
    restored.load_state_dict(agg.state_dict())
    np.testing.assert_array_equal(restored.velocity["w"], agg.velocity["w"])
    with pytest.raises(ConfigError):
        make_aggregator("fedavgm", {"momentum": 1.5})
