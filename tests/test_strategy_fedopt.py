"""FedAdam, FedYogi and FedAdagrad (pure): the paper's update against a plain numpy
reference, one combiner or three, state that survives a save and load, and defaults that
train the digits example."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fedray.errors import ConfigError
from fedray.serialization import copy_model, decode, encode
from fedray.strategies import make_strategy
from fedray.strategies.snapshots import UpdateMeta
from fedray.strategies.updates import ShareStart, Update

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/ is not installed

ADAPTIVE = ["fedadam", "fedyogi", "fedadagrad"]
SPEC = {"w": ("F32", (3, 4)), "b": ("F32", (4,))}
SEED = {"w": np.full((3, 4), 0.5, np.float32), "b": np.zeros(4, np.float32)}
OPTIONS = {"server_lr": 0.2, "beta1": 0.8, "beta2": 0.95, "tau": 0.05}


def _options(name: str) -> dict:
    return {k: v for k, v in OPTIONS.items() if not (name == "fedadagrad" and k == "beta2")}


def _round_updates(model, round_: int, n: int = 6):
    """``n`` client models near ``model`` with their example counts, fixed per round."""
    rng = np.random.default_rng(round_)
    return [({k: (v + rng.normal(0.3, 1.0, v.shape)).astype(np.float32) for k, v in model.items()},
             int(rng.integers(1, 300))) for _ in range(n)]


def _one_round(strategy, model, updates, combiners: int = 1):
    """The round's updates dealt to ``combiners`` accumulators; the next global model."""
    spec = {k: ("F32", v.shape) for k, v in model.items()}
    accs = [strategy.start(ShareStart(spec=spec, base=model)) for _ in range(combiners)]
    for i, (update, examples) in enumerate(updates):
        accs[i % combiners].fold(Update(update, UpdateMeta(f"c{i}", 1, examples), b""))
    return strategy.finish(model, strategy.reduce([a.partial() for a in accs]))


def _reference(name: str, rounds: int, server_lr, beta1, beta2=0.0, tau=1e-3):
    """Algorithm 2 of Reddi et al. (2021) written out: m = 0, v = tau^2, no bias correction."""
    x = {k: v.astype(np.float64) for k, v in SEED.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(val, tau**2) for k, val in x.items()}
    for r in range(1, rounds + 1):
        updates = _round_updates({k: val.astype(np.float32) for k, val in x.items()}, r)
        total = sum(n for _, n in updates)
        for k in x:
            mean = sum(u[k].astype(np.float64) * n for u, n in updates) / total
            delta = mean - x[k].astype(np.float32).astype(np.float64)
            m[k] = beta1 * m[k] + (1 - beta1) * delta
            if name == "fedadam":
                v[k] = beta2 * v[k] + (1 - beta2) * delta**2
            elif name == "fedyogi":
                v[k] = v[k] - (1 - beta2) * delta**2 * np.sign(v[k] - delta**2)
            else:
                v[k] = v[k] + delta**2
            x[k] = (x[k].astype(np.float32) + server_lr * m[k] / (np.sqrt(v[k]) + tau)
                    ).astype(np.float32).astype(np.float64)
    return x


def _run(name: str, rounds: int, combiners: int = 1, strategy=None):
    strategy = strategy or make_strategy(name, _options(name))
    model = SEED
    for r in range(1, rounds + 1):
        model = _one_round(strategy, model, _round_updates(model, r), combiners)
    return model, strategy


@pytest.mark.parametrize("name", ADAPTIVE)
def test_each_optimizer_matches_the_papers_update_over_three_rounds(name):
    model, _ = _run(name, 3)
    expected = _reference(name, 3, **_options(name))
    for k in SEED:
        assert model[k].dtype == np.float32
        np.testing.assert_allclose(model[k], expected[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(model["w"], SEED["w"])


@pytest.mark.parametrize("name", ADAPTIVE)
def test_one_combiner_and_three_give_the_same_model(name):
    one, _ = _run(name, 3, combiners=1)
    three, _ = _run(name, 3, combiners=3)
    for k in one:
        np.testing.assert_allclose(three[k], one[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_state_saved_after_round_two_gives_the_uninterrupted_result(name):
    whole, _ = _run(name, 3)
    strategy = make_strategy(name, _options(name))
    model = SEED
    for r in (1, 2):
        model = _one_round(strategy, model, _round_updates(model, r))
    saved = encode(strategy.state_dict())  # as a commit stores it in the model store
    assert sorted(decode(saved)) == ["m.b", "m.w", "v.b", "v.w"]
    assert all(a.dtype == np.float64 for a in decode(saved).values())
    restarted = make_strategy(name, _options(name))  # a new controller
    restarted.load_state_dict(copy_model(decode(saved)))
    model = _one_round(restarted, model, _round_updates(model, 3))
    for k in whole:
        np.testing.assert_array_equal(model[k], whole[k])


def test_state_is_reset_by_an_empty_load_and_integers_are_averaged():
    strategy = make_strategy("fedadam")
    base = {"w": np.zeros(2, np.float32), "steps": np.array([4, 8], np.int64)}
    spec = {"w": ("F32", (2,)), "steps": ("I64", (2,))}
    acc = strategy.start(ShareStart(spec=spec, base=base))
    acc.fold(Update({"w": np.ones(2, np.float32), "steps": np.array([5, 9])},
                    UpdateMeta("a", 1, 1), b""))
    acc.fold(Update({"w": np.ones(2, np.float32), "steps": np.array([6, 10])},
                    UpdateMeta("b", 1, 1), b""))
    out = strategy.finish(base, strategy.reduce([acc.partial()]))
    assert out["steps"].dtype == np.int64 and out["steps"].tolist() == [6, 10]  # rint(5.5)
    np.testing.assert_allclose(out["w"], 0.1 * 0.1 / (np.sqrt(0.01 * 1 + 0.99e-6) + 1e-3),
                               rtol=1e-5)
    assert sorted(strategy.state_dict()) == ["m.w", "v.w"]
    strategy.load_state_dict({})  # what a refused round restores before any commit
    assert strategy.state_dict() == {}


def test_options_are_checked_when_the_config_is_loaded():
    assert make_strategy("fedyogi", {"server_lr": 0.5, "tau": 1e-2}).server_lr == 0.5
    for name, bad in [("fedadam", {"beta1": 1.0}), ("fedyogi", {"tau": 0}),
                      ("fedadam", {"server_lr": -1}), ("fedadagrad", {"beta2": 0.9}),
                      ("fedyogi", {"momentum": 0.9}), ("fedadam", {"tau": "small"})]:
        with pytest.raises(ConfigError, match="aggregator_kwargs"):
            make_strategy(name, bad)


# --------------------------------------------------------------- the digits example


@pytest.fixture(scope="module")
def digits():
    from examples.digits.data import load_split, partition

    return partition(4, scheme="iid", seed=0), load_split()


@pytest.mark.parametrize("name", ADAPTIVE)
def test_defaults_train_digits_to_90_percent_within_10_rounds(name, digits):
    """The demo's round settings (epochs 5, lr 0.3, batch 32), 4 IID clients, defaults."""
    from examples.digits.client import model as mlp

    clients, split = digits
    strategy = make_strategy(name)
    params = mlp.init_model(0)
    spec = {k: ("F32", v.shape) for k, v in params.items()}
    accuracies = []
    for r in range(1, 11):
        acc = strategy.start(ShareStart(spec=spec, base=params))
        for i, (X, y) in enumerate(clients):
            new, _ = mlp.train(params, X, y, epochs=5, lr=0.3, batch_size=32)
            acc.fold(Update(new, UpdateMeta(f"c{i}", r, len(y)), b""))
        params = strategy.finish(params, strategy.reduce([acc.partial()]))
        accuracies.append(mlp.evaluate(params, split.X_test, split.y_test)["accuracy"])
    assert max(accuracies) >= 0.90 and accuracies[-1] >= 0.90, accuracies
