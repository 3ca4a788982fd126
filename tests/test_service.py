"""A federation that stays up (``fedray serve``): sessions on demand through the HTTP API
and the Python API, clients that stay connected between them, stops that end cleanly."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from rich.console import Console
from test_federation import SEED, DeltaWorker, SlowWorker

import fedray
from fedray.deploy.config_file import config_from_dict
from fedray.deploy.lifecycle import Teardown
from fedray.errors import ApiError, NotFound
from fedray.serialization import decode, encode
from fedray.service.serve import serve_federation
from fedray.storage import open_model_store
from fedray.tracking.store import TrackingStore
from tests.waiting import wait_connected, wait_until

pytestmark = pytest.mark.integration


def _config(name: str, tmp_path, tracking_uri: str, **session):
    seed = tmp_path / "seed.safetensors"
    seed.write_bytes(encode(SEED))
    return config_from_dict({
        "federation": name, "seed_model": str(seed), "data_dir": str(tmp_path / "fed"),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 2, "host": "127.0.0.1", "base_port": 0,
                      "heartbeat_interval_s": 0.5, "offline_after_s": 3},
        "tracking": {"uri": tracking_uri, "database": f"t_{name.replace('-', '_')}"},
        "api": {"port": 0},
        "session": {"rounds": 2, "min_clients": 4, "round_timeout_s": 20, "validate": False,
                    "wait_for_clients_s": 30, **session},
    })


@contextlib.contextmanager
def served(config) -> Iterator[fedray.api.Federation]:
    """``fedray serve`` in a thread of this process (the test session's Ray), until the
    block ends; the Python API's handle on it."""
    teardown, stop, ready = Teardown(), threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            serve_federation(config, console=Console(quiet=True), teardown=teardown,
                             on_ready=lambda control: ready.set(), stop=stop)
        except BaseException as exc:  # noqa: BLE001 - said by the test below
            failed.append(exc)
            ready.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "fedray serve did not come up"
        assert not failed, failed
        yield fedray.connect(config.resolved_data_dir())
    finally:
        stop.set()
        thread.join(30)
        teardown.close()


def _attach(fleet, fed, workers) -> None:
    gateway = fed.info()["gateway"]
    for i, (name, worker) in enumerate(workers.items()):
        fleet.add(name, worker, gateway, backoff_initial_s=0.2)
        wait_connected(fleet, i + 1)


def _connections(tracking: TrackingStore) -> dict[str, str]:
    return {c["client_id"]: c.get("connection_id") for c in tracking.find("clients")}


def test_sessions_one_after_another_keep_the_clients_connected(
        ray_session, tracking_uri, fleet, tmp_path):
    config = _config("serve-three", tmp_path, tracking_uri)
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    with served(config) as fed:
        _attach(fleet, fed, {f"c{i}": DeltaWorker(1.0, 10) for i in range(4)})
        wait_until(lambda: len(fed.clients(status="online")) == 4, "4 clients in tracking")
        before = _connections(tracking)
        assert all(before.values()) and len(before) == 4, before
        ended, lags = [], []
        for aggregator in ("fedavg", "fedavgm", "fedadam"):
            submitted = dt.datetime.now(dt.UTC)
            session = fed.start_session(aggregator=aggregator, rounds=2)
            doc = session.wait(timeout=60)
            ended.append(doc)
            first = session.rounds()[0]
            lags.append((dt.datetime.fromisoformat(first["started_at"]) - submitted)
                        .total_seconds())
        assert [d["status"] for d in ended] == ["finished"] * 3, ended
        assert [d["strategy"] for d in ended] == ["fedavg", "fedavgm", "fedadam"]
        assert _connections(tracking) == before  # nobody reconnected between sessions
        assert max(lags[1:]) < 2.0, lags  # a session starts its first round at once
        listed = [s["session_id"] for s in fed.sessions()]
        assert listed[:3] == [d["session_id"] for d in reversed(ended)]
        # A seed of its own, per session, with nothing restarted:
        other = tmp_path / "other-seed.safetensors"
        other.write_bytes(encode({k: v + 5 for k, v in SEED.items()}))
        fourth = fed.start_session(rounds=1, set=[f"seed_model={other}"])
        doc = fourth.wait(timeout=60)
        assert doc["status"] == "finished" and doc["seed_model_id"] != ended[0]["seed_model_id"]
        store = open_model_store("file", config.resolved_data_dir())
        np.testing.assert_allclose(decode(store.get(doc["model_id"]))["w"], 6.0)  # 5 + 1
        assert _connections(tracking) == before


def test_a_stopped_session_finishes_its_round_and_the_next_continues_from_it(
        ray_session, tracking_uri, fleet, tmp_path):
    config = _config("serve-stop", tmp_path, tracking_uri, min_clients=2)
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    with served(config) as fed:
        _attach(fleet, fed, {"a": SlowWorker(1.0, 10, 0.5), "b": SlowWorker(1.0, 10, 0.5)})
        long = fed.start_session(rounds=50)
        queued = fed.start_session(rounds=1)  # waits behind the long one
        wait_until(lambda: len(long.rounds()) >= 2, "round 2 of the long session to start")
        assert fed.session(queued.id).info()["state"] == "queued"
        queued.stop(reason="not needed")
        asked = time.monotonic()
        long.stop(reason="enough for today", by="tester")
        doc = long.wait(timeout=config.session.round_timeout_s + 15)
        took = time.monotonic() - asked
        assert doc["status"] == "stopped" and doc["reason"] == "enough for today", doc
        assert doc["stopped_by"] == "tester"
        assert took < config.session.round_timeout_s, took
        rounds = long.rounds()
        assert [r["status"] for r in rounds] == ["finished"] * len(rounds)  # cut cleanly
        assert doc["rounds_done"] == len(rounds) >= 2
        assert queued.info()["state"] == "stopped"
        assert not tracking.find("sessions", {"session_id": queued.id})  # it never ran
        nxt = fed.start_session(rounds=1, continue_from="latest")  # the stopped one's model
        assert nxt.wait(timeout=60)["status"] == "finished"
        first = nxt.rounds()[0]
        assert first["parent_model_id"] == doc["model_id"]


def test_the_api_refuses_what_a_session_cannot_change_and_what_it_cannot_find(
        ray_session, tracking_uri, fleet, tmp_path):
    config = _config("serve-refusals", tmp_path, tracking_uri)
    with served(config) as fed:
        with pytest.raises(ApiError, match="combiners.count") as refused:
            fed.start_session(set=["combiners.count=3"])
        assert refused.value.status == 400
        with pytest.raises(ApiError, match="unknown aggregator|names no strategy"):
            fed.start_session(aggregator="no-such-strategy")
        with pytest.raises(NotFound):
            fed.session("ffffffffffff")
        unauthorized = fedray.api.Federation(fedray.api.client.Endpoint(fed.endpoint.url, "x"))
        with pytest.raises(ApiError, match="API token") as denied:
            unauthorized.start_session(rounds=1)
        assert denied.value.status == 401
        assert fed.sessions() == []  # nothing was queued by any of that


def test_an_asynchronous_session_stops_with_the_versions_it_committed(
        ray_session, tracking_uri, fleet, tmp_path):
    config = _config("serve-stop-async", tmp_path, tracking_uri, min_clients=2)
    with served(config) as fed:
        _attach(fleet, fed, {"a": SlowWorker(1.0, 10, 0.2), "b": SlowWorker(1.0, 10, 0.2)})
        session = fed.start_session(aggregator="fedbuff", rounds=500)
        wait_until(lambda: sum(r["status"] == "finished" for r in session.rounds()) >= 2,
                   "two versions committed")
        session.stop(reason="enough")
        doc = session.wait(timeout=30)
        assert doc["status"] == "stopped" and doc["reason"] == "enough", doc
        assert 2 <= doc["rounds_done"] < 500
        committed = [r for r in session.rounds() if r["status"] == "finished"]
        assert committed[-1]["model_id"] == doc["model_id"]
