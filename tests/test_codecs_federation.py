"""Integration: update codecs on the digits workload, real Ray, real gRPC edge clients.

One federation (2 combiners, 10 in-process edge clients over real sockets) runs the same
sessions with ``session.codec`` none and int8: int8 must cut the bytes of a round (updates
in, models out as deltas, after round 1 whose seed every client fetches whole) by at
least 3.5x and end within 0.01 of none's held-out accuracy.
topk, a robust rule (median) over int8 and DP (clipping on the client, then int8) must
each learn. Bytes come from tracking (each round's ``bytes_in``), accuracy from the
committed models.
"""

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
from fedray.tracking.store import TrackingStore
from tests.waiting import wait_connected

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

    tmp = tmp_path_factory.mktemp("codecs")
    paths = write_partitions(tmp / "data", CLIENTS, "iid", seed=0)
    config = config_from_dict({
        "federation": "codecs", "seed_model": "unused", "data_dir": str(tmp),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 2, "host": "127.0.0.1", "base_port": 0},
        "tracking": {"database": "t_codecs"},
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
        yield fed, store, seed_id, TrackingStore.from_uri(tracking_uri, "t_codecs"), \
            load_client_data(tmp / "data" / "test.npz")
    finally:
        fleet.close()
        fed.shutdown()


def run(federation, **session):
    """(held-out accuracy of the final model, bytes in and out of rounds 2 and later)."""
    fed, store, seed_id, tracking, test = federation
    settings = dataclasses.replace(fed.config.session, **session)
    session_id = uuid.uuid4().hex[:16]
    ray.get(fed.controller.submit_session.remote(SessionRequest(session_id, settings, seed_id)))
    status = fed.follow(lambda s: None)
    assert status["session_id"] == session_id
    assert status["state"] == "finished", str({k: v for k, v in status.items() if k != "history"})[:3000]
    accuracy = model.evaluate(decode(store.get(status["model_id"])), test.X, test.y)["accuracy"]
    rounds = [tracking.get_round(status["session_id"], r) for r in range(2, ROUNDS + 1)]
    assert all(r["codec"] == session.get("codec", "none") for r in rounds)
    return accuracy, sum(r["bytes_in"] + r["bytes_out"] for r in rounds)


def test_int8_cuts_the_bytes_of_a_round_3_5x_at_the_same_accuracy(federation):
    plain, plain_bytes = run(federation, codec="none")
    int8, int8_bytes = run(federation, codec="int8")
    print(f"\ncodecs on digits: none {plain:.4f} ({plain_bytes} B), int8 {int8:.4f} "
          f"({int8_bytes} B, {plain_bytes / int8_bytes:.2f}x fewer)")
    assert plain > 0.85
    assert plain_bytes / int8_bytes >= 3.5
    assert abs(int8 - plain) <= 0.01
    _, uplink_only = run(federation, codec="int8", codec_downlink=False)
    assert plain_bytes / uplink_only < 2.0  # the model went down whole: ~1.6x


def test_topk_with_error_feedback_learns(federation):
    accuracy, _ = run(federation, codec="topk", codec_kwargs={"fraction": 0.1})
    assert accuracy > 0.7, accuracy


def test_codecs_compose_with_a_robust_rule_and_with_dp(federation):
    median, _ = run(federation, codec="int8", aggregator="median")
    dp, _ = run(federation, codec="fp16", aggregator="dp_fixed",
                aggregator_kwargs={"noise_multiplier": 0.1, "clipping_norm": 5.0})
    assert median > 0.85, median
    assert dp > 0.5, dp
