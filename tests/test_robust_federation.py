"""Integration: Byzantine clients against real federations (Ray actors, gRPC on 127.0.0.1,
in-process edge clients training the digits MLP).

Two clients of each federation attack every round: one sends the global model pushed ten
times the wrong way (``g - 10 (x - g)`` from its honestly trained ``x``), the other large
Gaussian noise, N(0, 100^2), finite so that the runtime's own checks let it through and
the strategy is what is tested. FedAvg is ruined; median, trimmed mean and Krum (8 clients,
f = 2) and Bulyan (11 clients, n >= 4f + 3) each keep the committed model accurate on the
held-out split, read back from the model store.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_federation import _config

from fedray.deploy.federation import Federation
from fedray.edge.workers import CallbackWorker
from fedray.serialization import decode, encode
from fedray.storage import open_model_store
from fedray.tracking.store import TrackingStore
from tests.waiting import connections, wait_connected

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/ is not installed

from examples.digits.client import model as mlp  # noqa: E402
from examples.digits.data import load_split, partition  # noqa: E402

pytestmark = pytest.mark.integration

ROUNDS = 4
ATTACKERS = 2
FEDERATIONS = [  # (aggregator, options, clients, accuracy bound)
    ("fedavg", {}, 8, "below 0.5"),
    ("median", {}, 8, "at least 0.85"),
    ("trimmed_mean", {"beta": 0.25}, 8, "at least 0.85"),  # trims 2 of 8 at each end
    ("krum", {"f": ATTACKERS}, 8, "at least 0.85"),
    ("bulyan", {"f": ATTACKERS}, 11, "at least 0.85"),
]


def honest(X, y):
    def train(params, config):
        new, metrics = mlp.train(params, X, y, epochs=5, lr=0.3, batch_size=32)
        return new, len(y), metrics
    return train


def sign_flipper(X, y):
    def train(params, config):
        new, _ = mlp.train(params, X, y, epochs=5, lr=0.3, batch_size=32)
        return {k: params[k] - 10 * (new[k] - params[k]) for k in params}, len(y), {}
    return train


def noise(X, y, seed: int):
    rng = np.random.default_rng(seed)

    def train(params, config):
        return {k: rng.normal(0, 100, v.shape) for k, v in params.items()}, len(y), {}
    return train


def _federate(aggregator, options, clients, tmp_path, tracking_uri, fleet, seed_bytes):
    """Deploy, connect ``clients`` edge clients (the last two attack), run ROUNDS rounds,
    tear down; the accuracy of every committed model on the held-out split."""
    name = f"byz-{aggregator.replace('_', '-')}"
    config = _config(name, tmp_path / name, combiners=2, rounds=ROUNDS, min_clients=clients,
                     clients_per_round=clients, aggregator=aggregator, aggregator_kwargs=options)
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(seed_bytes)
    parts = partition(clients, scheme="iid", seed=0)
    fns = [honest(X, y) for X, y in parts[:-ATTACKERS]]
    fns += [sign_flipper(*parts[-2]), noise(*parts[-1], seed=clients)]
    fed = Federation(config, None, tracking_uri).deploy()
    names = [f"{name}-{i:02d}" for i in range(clients)]
    try:
        before = connections(fleet.lines)
        for client, train in zip(names, fns, strict=True):
            fleet.add(client, CallbackWorker(train), fed.gateway)
        wait_connected(fleet, before + clients)
        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
    finally:
        for client in names:
            fleet.stop(client)
        fed.shutdown()
    assert status["state"] == "finished", status
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    rounds = tracking.find("rounds", {"session_id": status["session_id"]}, sort=[("round", 1)])
    assert [r["updates"] for r in rounds] == [clients] * ROUNDS  # the attacks were accepted
    assert all(len(r["combiners"]) == 2 for r in rounds)  # kept updates came from both
    trail = tracking.find("models", {"session_id": status["session_id"]}, sort=[("round", 1)])
    assert trail[-1]["model_id"] == status["model_id"]
    split = load_split()
    return [mlp.evaluate(decode(store.get(m["model_id"])), split.X_test, split.y_test)["accuracy"]
            for m in trail[1:]]


def test_two_byzantine_clients_ruin_fedavg_but_not_the_robust_strategies(
        ray_session, tracking_uri, fleet, tmp_path):
    seed_bytes = encode(mlp.init_model(0))
    started = time.monotonic()
    measured = {}
    for aggregator, options, clients, _ in FEDERATIONS:
        measured[aggregator] = _federate(aggregator, options, clients, tmp_path, tracking_uri,
                                         fleet, seed_bytes)
    seconds = time.monotonic() - started
    print(f"\n{len(FEDERATIONS)} federations, {ROUNDS} rounds each, in {seconds:.1f}s")
    for aggregator, accuracies in measured.items():
        print(f"  {aggregator:13s} " + " ".join(f"{a:.3f}" for a in accuracies))
    for aggregator, _, _, bound in FEDERATIONS:
        final = measured[aggregator][-1]
        if bound == "below 0.5":
            assert final < 0.5, (aggregator, measured[aggregator])
        else:
            assert final >= 0.85, (aggregator, measured[aggregator])
