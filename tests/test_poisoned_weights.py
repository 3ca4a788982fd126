"""Self-reported weights cannot poison the model (hardening probe, end to end).

The issue's reproduction: with six digits clients, one returning values of 1e30 with
num_examples 2**63 - 1 made round 1's model useless and failed the session in round 2;
two claiming 2**62 examples drove held-out accuracy to 0.08. Real Ray, real gRPC, edge
clients in-process; the attackers' updates are refused (too_many_examples) and the
session trains as if they were not there.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_federation import _config, _run

from fedray.edge.workers import CallbackWorker
from fedray.serialization import decode

pytestmark = pytest.mark.integration


def test_clients_claiming_huge_weights_are_refused_and_the_model_still_trains(
        ray_session, tracking_uri, fleet, tmp_path):
    from examples.digits.client import model
    from examples.digits.data import load_split, partition

    split = load_split()
    parts = partition(6, scheme="iid", seed=0)

    def honest(X, y):
        def train(params, config):
            new, metrics = model.train(params, X, y, epochs=5, lr=0.3, seed=0)
            return new, len(y), metrics
        return CallbackWorker(train)

    def huge_values(params, config):
        return {k: np.full_like(v, 1e30) for k, v in params.items()}, 2**63 - 1, {}

    def huge_count(X, y):
        def train(params, config):
            new, metrics = model.train(params, X, y, epochs=5, lr=0.3, seed=0)
            return {k: -v for k, v in new.items()}, 2**62, metrics
        return CallbackWorker(train)

    workers = {f"honest-{i}": honest(*parts[i]) for i in range(3)}
    workers.update({"values-1e30": CallbackWorker(huge_values), "count-a": huge_count(*parts[3]),
                    "count-b": huge_count(*parts[4])})
    config = _config("poisoned-weights", tmp_path, combiners=2, rounds=3, min_clients=3,
                     clients_per_round=6)
    status, store, tracking = _run(config, tracking_uri, fleet, workers, seed=model.init_model(0))
    assert status["state"] == "finished", status["reason"]
    accuracy = model.evaluate(decode(store.get(status["model_id"])), split.X_test,
                              split.y_test)["accuracy"]
    assert accuracy > 0.9, accuracy
    for r in tracking.find("rounds", {"session_id": status["session_id"]}):
        refused = sum(c["rejections"].get("too_many_examples", 0) for c in r["combiners"].values())
        assert (r["updates"], refused) == (3, 3)
