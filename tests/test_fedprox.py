"""FedProx: ``session.round_config: {mu: ...}`` reaches the clients' train, and the digits
example's local objective adds the proximal term ``mu/2 ||w - w_global||^2``."""

from __future__ import annotations

import numpy as np
import pytest
from test_federation import _config, _run

from examples.digits.client import model
from examples.digits.data import load_split, partition
from fedray.edge.workers import CallbackWorker
from fedray.serialization import decode


def test_the_proximal_term_pulls_each_step_back_towards_the_global_model():
    """Pure. Full-batch steps (one per epoch): the first step of FedProx and of plain SGD
    are the same (the term is zero at the global model); the second differs by exactly
    ``lr * mu * (w1 - w0)``, the proximal gradient at w1."""
    X, y = partition(4, scheme="label_skew", seed=0)[0]
    w0 = model.init_model(0)
    lr, mu = 0.3, 0.5
    one = model.train(w0, X, y, epochs=1, lr=lr, batch_size=len(y), seed=1)[0]
    one_prox = model.train(w0, X, y, epochs=1, lr=lr, batch_size=len(y), seed=1, mu=mu)[0]
    plain = model.train(w0, X, y, epochs=2, lr=lr, batch_size=len(y), seed=1)[0]
    prox = model.train(w0, X, y, epochs=2, lr=lr, batch_size=len(y), seed=1, mu=mu)[0]
    for name in w0:
        np.testing.assert_allclose(one_prox[name], one[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(plain[name] - prox[name], lr * mu * (one[name] - w0[name]),
                                   rtol=1e-4, atol=1e-6)
    distance = {m: sum(float(np.linalg.norm(p[k] - w0[k])) for k in w0)
                for m, p in (("plain", plain), ("prox", prox))}
    assert distance["prox"] < distance["plain"]


@pytest.mark.integration
def test_fedprox_on_a_label_skewed_split_trains_and_mu_reaches_every_client(
        ray_session, tracking_uri, fleet, tmp_path):
    split = load_split()
    parts = partition(4, scheme="label_skew", seed=0)
    seen: list[float] = []

    def client(X, y):
        def train(params, config):
            seen.append(config["mu"])
            settings = model.round_settings(config)
            new, metrics = model.train(params, X, y, epochs=settings["epochs"],
                                       lr=settings["lr"], seed=0, mu=settings["mu"])
            return new, len(y), metrics
        return CallbackWorker(train)

    config = _config("fedprox", tmp_path, combiners=2, rounds=5, min_clients=4,
                     round_config={"mu": 0.01, "epochs": 5, "lr": 0.3})
    workers = {f"site-{i}": client(X, y) for i, (X, y) in enumerate(parts)}
    status, store, _ = _run(config, tracking_uri, fleet, workers, seed=model.init_model(0))
    assert status["state"] == "finished", status["reason"]
    assert seen == [0.01] * 20  # 4 clients x 5 rounds
    accuracy = model.evaluate(decode(store.get(status["model_id"])), split.X_test,
                              split.y_test)["accuracy"]
    assert accuracy >= 0.85, accuracy
