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


def test_fedprox_is_fedavg_whose_train_tasks_carry_mu():
    """Pure: ``aggregator: fedprox`` adds ``mu`` to the round config every client's train
    receives, keeps the rest of it, and aggregates as FedAvg."""
    from fedray.strategies import ClientInfo, RoundContext, make_strategy
    from fedray.strategies.fedavg import FedAvg
    from tests.simfed import session_settings

    strategy = make_strategy("fedprox", {"mu": 0.25})
    online = tuple(ClientInfo(c, "c0") for c in "abc")
    ctx = RoundContext("s", 1, 1, online, session_settings(round_config={"lr": 0.1}), seed=1)
    plan = strategy.configure(ctx)
    assert dict(plan.config) == {"lr": 0.1, "mu": 0.25}
    assert plan.clients == FedAvg().configure(ctx).clients
    with pytest.raises(Exception, match="mu must be a finite number >= 0"):
        make_strategy("fedprox", {"mu": -1})


async def test_every_client_trains_with_the_strategys_mu():
    from fedray.actors.controller.session_runner import Start
    from fedray.serialization import encode
    from tests.simfed import MemoryStore, SimPool, run_session, session_settings

    seen: list[float] = []

    def train(params, config, client_id, round_):
        seen.append(config["mu"])
        return params, 10, {}

    pool = SimPool(2)
    for name in "abc":
        pool.add(name, train)
    store = MemoryStore()
    settings = session_settings(rounds=2, min_clients=3, aggregator="fedprox",
                                aggregator_kwargs={"mu": 0.05})
    try:
        state, reason, _ = await run_session(pool, store, settings,
                                             Start(store.put(encode(model.init_model(0)))))
    finally:
        await pool.close()
    assert (state, reason) == ("finished", "")
    assert seen == [0.05] * 6
