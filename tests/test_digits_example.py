"""The digits demo workload: partitions, a pure-numpy FedAvg run, and the callback API."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fedray.serialization import decode, encode

# examples/ is not an installed package; it imports from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.digits import app, seed  # noqa: E402
from examples.digits.client import model  # noqa: E402
from examples.digits.data import (  # noqa: E402
    load_client_data,
    load_split,
    partition,
    partition_indices,
    write_partitions,
)


def _label_shift(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and the pool's."""
    pool = np.bincount(y, minlength=10) / len(y)
    return float(
        np.mean(
            [0.5 * np.abs(np.bincount(y[p], minlength=10) / len(p) - pool).sum() for p in parts]
        )
    )


@pytest.mark.parametrize("scheme", ["iid", "label_skew"])
def test_partitions_are_disjoint_and_cover_the_pool(scheme: str) -> None:
    split = load_split()
    parts = partition_indices(split.y_pool, 5, scheme=scheme, seed=3)
    joined = np.concatenate(parts)
    assert len(parts) == 5 and all(len(p) >= 10 for p in parts)
    assert np.array_equal(np.sort(joined), np.arange(len(split.y_pool)))
    assert len(split.y_pool) + len(split.y_test) == 1797


def test_label_skew_is_skewed_and_iid_is_not() -> None:
    y = load_split().y_pool
    iid = _label_shift(y, partition_indices(y, 4, "iid", seed=0))
    skew = _label_shift(y, partition_indices(y, 4, "label_skew", seed=0, alpha=0.5))
    assert iid < 0.08 and skew > 0.25


def _fedavg(scheme: str, rounds: int = 5, n_clients: int = 4) -> list[float]:
    split = load_split()
    clients = partition(n_clients, scheme=scheme, seed=0)
    global_params = model.init_model(0)
    accuracies = []
    for _ in range(rounds):
        updates = [(model.train(global_params, X, y, epochs=5)[0], len(y)) for X, y in clients]
        total = sum(n for _, n in updates)
        global_params = {
            name: (sum(p[name].astype(np.float64) * n for p, n in updates) / total).astype(
                np.float32
            )
            for name in global_params
        }
        accuracies.append(model.evaluate(global_params, split.X_test, split.y_test)["accuracy"])
    return accuracies


def test_fedavg_simulation_reaches_90_percent_in_5_rounds() -> None:
    iid = _fedavg("iid")
    assert iid[-1] >= 0.90, iid
    assert iid[-1] > iid[0]


def test_app_callbacks_signatures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_partitions(tmp_path, n_clients=3, scheme="iid", seed=0)
    params = decode(encode(seed.seed_model()))  # read-only arrays, as the runtime passes them
    train, validate = app.make_client_fns(str(paths[0]))

    new, num_examples, metrics = train(params, {"epochs": 1, "round": 1})
    count, val = validate(new, {})
    monkeypatch.setenv("FEDRAY_DATA", str(paths[1]))
    env_new, env_n, _ = app.train(params, {"epochs": 1})
    env_count, _ = app.validate(env_new, {})

    assert {k: (v.shape, v.dtype) for k, v in new.items()} == {
        k: (v.shape, np.dtype(np.float32)) for k, v in params.items()
    }
    assert num_examples == len(load_client_data(paths[0]).y) and env_n > 0
    assert set(metrics) == {"loss", "accuracy"}
    assert count == len(load_client_data(paths[0]).y_val) and env_count > 0
    assert set(val) == {"accuracy", "loss"} and 0.0 <= val["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="lr"):
        train(params, {"lr": "fast"})


def test_write_partitions_files(tmp_path: Path) -> None:
    paths = write_partitions(tmp_path, n_clients=4, scheme="label_skew", seed=1)
    clients = [load_client_data(p) for p in paths]
    test = load_client_data(tmp_path / "test.npz")
    assert [p.name for p in paths] == [f"client-{i}.npz" for i in range(4)]
    assert sum(len(c.y) + len(c.y_val) for c in clients) + len(test.y) == 1797
    assert all(c.X.dtype == np.float32 and c.X.max() <= 1.0 and len(c.y_val) for c in clients)
    assert len(test.y_val) == 0


def test_seed_writes_init_model(tmp_path: Path) -> None:
    out = tmp_path / "seed.safetensors"
    assert seed.main([str(out)]) == 0
    loaded = decode(out.read_bytes())
    expected = model.init_model(0)
    assert sorted(loaded) == sorted(expected)
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)
