"""FedAvg and FedAvgM math (pure): weighted means, streaming folds, reduce across combiners."""

import numpy as np
import pytest

from fedray.errors import ConfigError
from fedray.strategies import make_strategy
from fedray.strategies.numeric import add_scaled
from fedray.strategies.snapshots import UpdateMeta
from fedray.strategies.updates import ShareStart, Update

SPEC = {"w": ("F32", (3, 4)), "b": ("F32", (4,))}


def _global():
    return {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}


def _updates(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [({"w": rng.normal(size=(3, 4)).astype(np.float32),
              "b": rng.normal(size=4).astype(np.float32)}, int(rng.integers(1, 500)))
            for _ in range(n)]


def fold_all(strategy, groups, base=None):
    """One accumulator per group (a combiner each); their partials."""
    base = base or _global()
    partials = []
    for group in groups:
        acc = strategy.start(ShareStart(spec=SPEC, base=base))
        for i, (update, weight) in enumerate(group):
            acc.fold(Update(update, UpdateMeta(f"c{i}", 1, weight), b""))
        partials.append(acc.partial())
    return partials


def _run(groups, name="fedavg", **kwargs):
    strategy = make_strategy(name, kwargs)
    reduced = strategy.reduce(fold_all(strategy, groups))
    return strategy.finish(_global(), reduced), reduced


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


def test_empty_partials_are_skipped_and_all_empty_is_an_error():
    strategy = make_strategy("fedavg")
    empty = strategy.start(ShareStart(spec=SPEC, base=_global())).partial()
    with pytest.raises(ValueError):
        strategy.reduce([empty])
    assert strategy.reduce([empty, *fold_all(strategy, [_updates(2)])]).count == 2


def test_integer_tensors_are_rounded_back():
    strategy = make_strategy("fedavg")
    spec = {"n": ("I64", (2,))}
    acc = strategy.start(ShareStart(spec=spec, base={"n": np.zeros(2, np.int64)}))
    acc.fold(Update({"n": np.array([1, 2])}, UpdateMeta("a", 1, 1), b""))
    acc.fold(Update({"n": np.array([2, 3])}, UpdateMeta("b", 1, 1), b""))
    out = strategy.finish({"n": np.zeros(2, np.int64)}, strategy.reduce([acc.partial()]))
    assert out["n"].dtype == np.int64 and out["n"].tolist() == [2, 2]


def test_add_scaled_works_across_block_boundaries(monkeypatch):
    import fedray.strategies.numeric as base

    monkeypatch.setattr(base, "BLOCK", 7)
    acc = np.zeros(50)
    value = np.arange(50, dtype=np.float32)
    add_scaled(acc, value, 2.0)
    np.testing.assert_array_equal(acc, value * 2)


def test_unknown_strategy_and_bad_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown aggregator"):
        make_strategy("nope")
    with pytest.raises(ConfigError, match="aggregator_kwargs"):
        make_strategy("fedavg", {"lr": 1})
    with pytest.raises(ConfigError, match="cannot import"):
        make_strategy("no_such_module:Thing")
    with pytest.raises(ConfigError, match="has no 'Missing'"):
        make_strategy("fedray.strategies.fedavg:Missing")
    with pytest.raises(ConfigError, match="not a fedray.strategies.Strategy"):
        make_strategy("fedray.strategies.fedavg:WeightedSums")


def test_fedavgm_moves_with_server_momentum_and_its_state_round_trips():
    strategy = make_strategy("fedavgm", {"momentum": 0.5, "server_lr": 1.0})
    model = _global()
    for _ in range(2):
        acc = strategy.start(ShareStart(spec=SPEC, base=model))
        acc.fold(Update({k: v + 1 for k, v in model.items()}, UpdateMeta("a", 1, 10), b""))
        model = strategy.finish(model, strategy.reduce([acc.partial()]))
    np.testing.assert_allclose(model["w"], 1 + 1.5)  # velocity -1, then -1.5
    restored = make_strategy("fedavgm", {"momentum": 0.5})
    restored.load_state_dict(strategy.state_dict())
    np.testing.assert_array_equal(restored.velocity["w"], strategy.velocity["w"])
    with pytest.raises(ConfigError):
        make_strategy("fedavgm", {"momentum": 1.5})
