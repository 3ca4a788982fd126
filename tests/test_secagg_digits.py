"""Integration: the digits federation with ``aggregator: secagg`` learns what plain FedAvg
learns: real Ray, 2 combiners, 10 real gRPC edge clients, 5 rounds each; held-out
accuracy within 0.01 (issue 18). With ``clip`` above the deltas' norms (about 3 in round
1 on digits) nothing is clipped, and 16 bits move the mean by under 1e-4 a value."""

from __future__ import annotations

import dataclasses
import sys
import uuid
from pathlib import Path

import pytest
import ray

from fedray.actors.controller.queue import SessionRequest
from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from fedray.edge.workers import CallbackWorker
from fedray.serialization import decode, encode
from fedray.storage import open_model_store
from tests.waiting import wait_connected, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.digits import app  # noqa: E402
from examples.digits.client import model  # noqa: E402
from examples.digits.data import load_client_data, write_partitions  # noqa: E402
from examples.digits.seed import seed_model  # noqa: E402

pytestmark = pytest.mark.integration

CLIENTS, ROUNDS = 10, 5


@pytest.fixture(scope="module")
def federation(ray_session, tracking_uri, tmp_path_factory):
    from tests.conftest import EdgeFleet

    tmp = tmp_path_factory.mktemp("secagg_digits")
    paths = write_partitions(tmp / "data", CLIENTS, "iid", seed=0)
    config = config_from_dict({
        "federation": "secagg-digits", "seed_model": "unused", "data_dir": str(tmp),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 2, "host": "127.0.0.1", "base_port": 0},
        "tracking": {"database": "t_secagg_digits"},
        "session": {"rounds": ROUNDS, "min_clients": CLIENTS, "round_timeout_s": 60,
                    "validate": False, "wait_for_clients_s": 60, "seed": 1},
    })
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(seed_model()))
    fed = Federation(config, None, tracking_uri).deploy()
    fleet = EdgeFleet()
    try:
        for i, path in enumerate(paths):
            fleet.add(f"digits-{i:02d}", CallbackWorker(*app.make_client_fns(str(path))),
                      fed.gateway)
        wait_connected(fleet, CLIENTS, timeout=60)
        yield fed, store, seed_id, load_client_data(tmp / "data" / "test.npz")
    finally:
        fleet.close()
        fed.shutdown()


def accuracy(federation, **session) -> float:
    fed, store, seed_id, test = federation
    settings = dataclasses.replace(fed.config.session, **session)
    session_id = uuid.uuid4().hex[:16]
    ray.get(fed.controller.submit_session.remote(SessionRequest(session_id, settings, seed_id)))
    wait_until(lambda: (ray.get(fed.controller.watch.remote(-1, 0.0, 0))[1] or {}).get(
        "session_id") == session_id, f"session {session_id} to start")
    status = fed.follow(lambda s: None)
    assert status["state"] == "finished", str(status)[:3000]
    return model.evaluate(decode(store.get(status["model_id"])), test.X, test.y)["accuracy"]


def test_secagg_reaches_plain_fedavgs_held_out_accuracy_within_a_hundredth(federation):
    plain = accuracy(federation, aggregator="fedavg")
    secure = accuracy(federation, aggregator="secagg",
                      aggregator_kwargs={"clip": 5.0, "quantization_bits": 16})
    print(f"\ndigits, {ROUNDS} rounds: fedavg {plain:.4f}, secagg {secure:.4f}")
    assert plain > 0.85
    assert abs(secure - plain) <= 0.01
