"""FedBuff (pure): options refused when the config loads, the staleness-weighted step, and
the memory its reduce and finish take at the controller."""

from __future__ import annotations

import dataclasses
import math
import tracemalloc

import numpy as np
import pytest

from fedray.deploy.config_file import config_from_dict
from fedray.errors import ConfigError
from fedray.strategies import make_strategy
from fedray.strategies.numeric import BLOCK
from fedray.strategies.snapshots import UpdateMeta
from fedray.strategies.updates import ShareStart, Update


def _fold(strategy, model, updates):
    """One accumulator over ``updates``: (model, staleness, examples) each, base = ``model``;
    each update carries the strategy's ``weigh`` decision, as the controller folds it."""
    spec = {k: (str(v.dtype), v.shape) for k, v in model.items()}
    acc = strategy.start(ShareStart(spec=spec, base=model, base_of=lambda v: model))
    for i, (update, staleness, examples) in enumerate(updates):
        meta = UpdateMeta(f"c{i}", 1, examples, staleness=staleness)
        meta = dataclasses.replace(meta, weight=strategy.weigh(meta).weight)
        acc.fold(Update(update, meta, b""))
    return acc.partial()


@pytest.mark.parametrize("kwargs", [
    {"staleness": "hinge", "hinge_a": 0, "hinge_b": -1},  # weight(1) divided by zero
    {"staleness": "hinge", "hinge_a": -1.0},
    {"staleness": "hinge", "hinge_b": math.inf},
    {"server_lr": math.inf},
    {"staleness": "tests.test_strategy_fedbuff:negative_after_two"},
])
def test_options_that_give_no_usable_weight_are_refused_when_the_config_loads(kwargs):
    with pytest.raises(ConfigError, match="aggregator_kwargs"):
        make_strategy("fedbuff", kwargs)
    with pytest.raises(ConfigError, match="session.aggregator"):
        config_from_dict({"federation": "buff", "seed_model": "unused", "session": {
            "aggregator": "fedbuff", "aggregator_kwargs": kwargs}})


def negative_after_two(tau: int) -> float:
    """A user staleness weight that goes wrong for stale updates only."""
    return 1.0 if tau <= 2 else -0.5


def test_hinge_weights_are_one_up_to_a_then_fall():
    strategy = make_strategy("fedbuff", {"staleness": "hinge", "hinge_a": 0, "hinge_b": 0.5})
    assert [strategy.weight(t) for t in (0, 1, 3)] == [1.0, 1 / 1.5, 1 / 2.5]


def test_the_step_is_the_staleness_weighted_mean_delta_in_the_models_dtypes():
    model = {"w": np.full((2, 3), 1.0, np.float32), "n": np.array([10, 20], np.int64)}
    strategy = make_strategy("fedbuff", {"server_lr": 0.5})
    updates = [({"w": model["w"] + 2, "n": model["n"] + 3}, 0, 10),
               ({"w": model["w"] + 4, "n": model["n"] + 3}, 3, 30)]
    partial = _fold(strategy, model, updates)
    reduced = strategy.reduce([partial])
    assert reduced is partial  # one partial: reduced as it is, not copied
    new = strategy.finish(model, reduced)
    step = 0.5 * (2 * 10 + 4 * 30 / 2) / 40  # 1/sqrt(1+3) = 1/2
    np.testing.assert_allclose(new["w"], 1.0 + step, rtol=1e-6)
    assert new["w"].dtype == np.float32 and new["n"].dtype == np.int64
    np.testing.assert_array_equal(new["n"], np.rint([10 + 0.5 * 2.5, 20 + 0.5 * 2.5]))
    two = strategy.reduce([_fold(strategy, model, updates[:1]), _fold(strategy, model,
                                                                       updates[1:])])
    np.testing.assert_allclose(strategy.finish(model, two)["w"], new["w"], rtol=1e-6)


def test_reduce_and_finish_hold_no_model_sized_float64_temporary():
    """docs/strategies.md: one float64 model at the controller (the fold's sums). Beside
    it, reduce + finish may hold only the new model and block-sized temporaries."""
    model = {"w1": np.zeros((1000, 1500), np.float32), "w2": np.zeros((500, 1000), np.float32),
             "b": np.zeros(1000, np.float32)}  # 2,001,000 parameters
    strategy = make_strategy("fedbuff")
    partial = _fold(strategy, model, [({k: v + 1 for k, v in model.items()}, 0, 10)] * 3)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        new = strategy.finish(model, strategy.reduce([partial]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = sum(v.nbytes for v in model.values())  # the new model, float32
    assert peak - before < size + 2 * BLOCK * 8  # was 2.75 float64 models (42 MiB)
    assert all(np.allclose(v, 1.0) for v in new.values())
