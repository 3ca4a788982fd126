"""Integration: real Ray actors, real gRPC on 127.0.0.1, in-process edge clients.

Each test deploys its own federation (own namespace and tracking database) on the one Ray
instance of the test session.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from fedray.serialization import decode, encode
from fedray.storage import open_model_store
from fedray.tracking.store import TrackingStore
from tests.waiting import wait_connected, wait_until

pytestmark = pytest.mark.integration

SEED = {"w": np.zeros((4, 8), np.float32), "b": np.zeros(8, np.float32)}


class DeltaWorker:
    """Adds ``delta`` to every weight and reports ``examples`` examples."""

    def __init__(self, delta: float, examples: int) -> None:
        self.delta, self.examples = delta, examples

    def train(self, model: bytes, config: dict):
        params = decode(model)
        new = {k: (v + self.delta).astype(v.dtype) for k, v in params.items()}
        return encode(new), self.examples, {"loss": self.delta}

    def validate(self, model: bytes, config: dict):
        return self.examples, {"accuracy": 0.5}


class SlowWorker(DeltaWorker):
    """Trains for ``seconds`` (a straggler, or so a fault can land mid-round); ``training``
    is set once it has started."""

    def __init__(self, delta: float, examples: int, seconds: float) -> None:
        super().__init__(delta, examples)
        self.seconds = seconds
        self.training = threading.Event()

    def train(self, model: bytes, config: dict):
        self.training.set()
        time.sleep(self.seconds)  # behaviour: a slow client's training
        return super().train(model, config)


class SilentWorker(DeltaWorker):
    """Takes a task and never answers (until the test ends)."""

    def __init__(self) -> None:
        super().__init__(0.0, 1)
        self.release = threading.Event()

    def train(self, model: bytes, config: dict):
        self.release.wait(60)
        raise RuntimeError("released at teardown")


class BadWorker(DeltaWorker):
    def __init__(self, update: dict) -> None:
        super().__init__(0.0, 10)
        self.update = update

    def train(self, model: bytes, config: dict):
        return encode(self.update), self.examples, {}


def _config(name: str, tmp_path, combiners: int = 2, **session):
    return config_from_dict({
        "federation": name, "seed_model": "unused", "data_dir": str(tmp_path),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": combiners, "host": "127.0.0.1", "base_port": 0,
                      "heartbeat_interval_s": 0.5, "offline_after_s": 3},
        "tracking": {"database": f"t_{name.replace('-', '_')}"},
        "session": {"rounds": 1, "min_clients": 2, "round_timeout_s": 20, "validate": False,
                    "wait_for_clients_s": 30, **session},
    })


def _run(config, tracking_uri, fleet, workers: dict, token=None, seed=None):
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(SEED if seed is None else seed))
    fed = Federation(config, token, tracking_uri).deploy()
    try:
        for i, (name, worker) in enumerate(workers.items()):
            fleet.add(name, worker, fed.gateway, token=token)
            wait_connected(fleet, i + 1)
        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
    finally:
        for worker in workers.values():
            if isinstance(worker, SilentWorker):
                worker.release.set()
        fed.shutdown()
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    return status, store, tracking


def test_two_combiners_fold_every_client_into_the_weighted_mean(ray_session, tracking_uri,
                                                                fleet, tmp_path):
    config = _config("two-combiners", tmp_path, combiners=2, rounds=2, validate=True)
    workers = {f"c{i}": DeltaWorker(float(i), 10 * i) for i in range(1, 7)}
    status, store, tracking = _run(config, tracking_uri, fleet, workers)
    assert status["state"] == "finished", status
    weights = np.arange(1, 7) * 10.0
    step = float((np.arange(1, 7) * weights).sum() / weights.sum())
    final = decode(store.get(status["model_id"]))
    np.testing.assert_allclose(final["w"], 2 * step, rtol=1e-6)  # two rounds of the same step
    rounds = tracking.find("rounds", {"session_id": status["session_id"]}, sort=[("round", 1)])
    assert [r["status"] for r in rounds] == ["finished", "finished"]
    per_combiner = rounds[0]["combiners"]
    assert sorted(per_combiner) == ["combiner-0", "combiner-1"]
    assert sum(c["updates"] for c in per_combiner.values()) == 6
    assert all(c["updates"] == 3 for c in per_combiner.values())  # the gateway balanced them
    assert rounds[0]["validation_metrics"] == {"accuracy": 0.5}
    trail = tracking.find("models", {"session_id": status["session_id"]}, sort=[("round", 1)])
    assert [m["round"] for m in trail] == [0, 1, 2]
    assert trail[1]["parent_id"] == trail[0]["model_id"] and trail[2]["parent_id"] == trail[1]["model_id"]
    # A clean end is no warning: clients leave because the combiners stop (hardening #21).
    offline = tracking.find("events", {"message": {"$regex": "is offline"}})
    assert offline and {e["level"] for e in offline} == {"info"}, offline


def test_a_client_that_never_answers_closes_the_round_on_its_deadline(ray_session, tracking_uri,
                                                                      fleet, tmp_path):
    config = _config("silent", tmp_path, combiners=1, round_timeout_s=3)
    workers = {"good-1": DeltaWorker(1.0, 10), "good-2": DeltaWorker(3.0, 10), "mute": SilentWorker()}
    started = time.monotonic()
    status, store, tracking = _run(config, tracking_uri, fleet, workers)
    assert status["state"] == "finished", status
    assert time.monotonic() - started < 20
    round_doc = tracking.get_round(status["session_id"], 1)
    assert round_doc["combiners"]["combiner-0"]["close_reason"] == "deadline"
    assert round_doc["updates"] == 2 and round_doc["seconds"] >= 3
    np.testing.assert_allclose(decode(store.get(status["model_id"]))["w"], 2.0)


def test_wrong_shape_and_nan_updates_are_rejected_and_leave_the_aggregate_alone(
        ray_session, tracking_uri, fleet, tmp_path):
    config = _config("bad-updates", tmp_path, combiners=1)
    wrong_shape = {"w": np.zeros((8, 4), np.float32), "b": np.zeros(8, np.float32)}
    with_nan = {"w": np.full((4, 8), np.nan, np.float32), "b": np.zeros(8, np.float32)}
    workers = {"good-1": DeltaWorker(1.0, 10), "good-2": DeltaWorker(3.0, 30),
               "shape": BadWorker(wrong_shape), "nan": BadWorker(with_nan)}
    status, store, tracking = _run(config, tracking_uri, fleet, workers)
    assert status["state"] == "finished", status
    np.testing.assert_allclose(decode(store.get(status["model_id"]))["w"], 2.5)  # (10+90)/40
    doc = tracking.get_round(status["session_id"], 1)["combiners"]["combiner-0"]
    assert doc["updates"] == 2 and doc["rejections"] == {"wrong_shape": 1, "non_finite": 1}
    assert doc["close_reason"] == "all_answered"
    events = tracking.find("events", {"session_id": status["session_id"], "level": "warning"})
    assert any("wrong_shape" in e["message"] for e in events)
    assert any("non_finite" in e["message"] for e in events)
    assert any("REJECTED: non_finite" in line for line in fleet.lines)


def test_too_few_updates_fail_the_session_with_a_reason(ray_session, tracking_uri, fleet, tmp_path):
    config = _config("too-few", tmp_path, combiners=1, min_clients=2, round_timeout_s=2)
    workers = {"good": DeltaWorker(1.0, 10), "mute": SilentWorker()}
    status, _, tracking = _run(config, tracking_uri, fleet, workers)
    assert status["state"] == "failed"
    assert "only 1 update(s) arrived, session.min_clients is 2" in status["reason"]
    assert tracking.get_round(status["session_id"], 1)["status"] == "failed"
    assert tracking.get_session(status["session_id"])["status"] == "failed"


def test_a_wrong_token_is_refused_and_the_right_one_works(ray_session, tracking_uri, fleet, tmp_path):
    from fedray.errors import AuthError

    config = _config("auth", tmp_path, combiners=1, min_clients=1)
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(SEED))
    fed = Federation(config, "s3cret", tracking_uri).deploy()
    try:
        intruder = fleet.add("intruder", DeltaWorker(1.0, 1), fed.gateway, token="wrong")
        fleet.add("member", DeltaWorker(1.0, 1), fed.gateway, token="s3cret")
        wait_connected(fleet, 1)
        fed.start_session(seed_id)
        assert fed.follow(lambda s: None)["state"] == "finished"
        with pytest.raises(AuthError):
            fleet.futures[0].result(timeout=5)
        assert intruder.tasks_done == 0
    finally:
        fed.shutdown()


def test_clients_reconnect_through_the_gateway_when_their_combiner_dies(
        ray_session, tracking_uri, fleet, tmp_path):
    import ray

    config = _config("reconnect", tmp_path, combiners=2, min_clients=2)
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(SEED))
    fed = Federation(config, None, tracking_uri).deploy()
    try:
        runners = [fleet.add(f"r{i}", DeltaWorker(1.0, 10), fed.gateway, backoff_initial_s=0.2)
                   for i in range(2)]
        wait_connected(fleet, 2)
        victim = runners[0].combiner
        ray.kill(ray.get_actor(victim, namespace=config.namespace), no_restart=False)
        wait_connected(fleet, 3, timeout=30)
        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
        assert status["state"] == "finished", status
        assert runners[0].tasks_done == 1 and runners[1].tasks_done == 1
    finally:
        fed.shutdown()
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    combiner_doc = tracking.find("combiners", {"name": victim})[0]
    assert combiner_doc["restarts"] >= 1


def test_remote_package_clients_pick_up_a_changed_package_between_sessions(
        ray_session, tracking_uri, fleet, tmp_path):
    import shutil
    from pathlib import Path

    from examples.digits.data import write_partitions
    from examples.digits.seed import seed_model
    from fedray.deploy.seeds import session_package
    from fedray.edge.workers import RemotePackageWorker

    root = Path(__file__).resolve().parent.parent
    first = session_package(str(root / "examples" / "digits" / "client"), tmp_path)
    changed = tmp_path / "digits-v2"
    shutil.copytree(root / "examples" / "digits" / "client", changed,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (changed / "fedray.yaml").write_text((changed / "fedray.yaml").read_text()
                                         .replace('version: "1"', 'version: "2"'))
    second = session_package(str(changed), tmp_path)
    assert first[0] != second[0]

    config = _config("remote-package", tmp_path, combiners=1, min_clients=2)
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(seed_model()))
    paths = write_partitions(tmp_path / "data", 2)
    workers = [RemotePackageWorker(str(p), cache_dir=tmp_path / "cache") for p in paths]
    fed = Federation(config, None, tracking_uri).deploy(first[:2])
    try:
        for i, worker in enumerate(workers):
            fleet.add(f"remote-{i}", worker, fed.gateway)
        wait_connected(fleet, 2)
        fed.start_session(seed_id, first[0])
        status = fed.follow(lambda s: None)
        assert status["state"] == "finished", (status["reason"], fleet.lines)
        assert all(w.sha256 == first[0] for w in workers)
        fed.serve_package(*second[:2])
        fed.start_session(seed_id, second[0])
        assert fed.follow(lambda s: None)["state"] == "finished"
        assert all(w.sha256 == second[0] for w in workers)
    finally:
        fed.shutdown()
    installs = [line for line in fleet.lines if "installed compute package" in line]
    assert len(installs) == 4, fleet.lines


def test_a_deployed_federation_creates_the_tracking_indexes_with_its_ttl(ray_session,
                                                                         tracking_uri, tmp_path):
    import uuid

    config = config_from_dict({
        "federation": "indexes", "seed_model": "unused", "data_dir": str(tmp_path),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 1, "host": "127.0.0.1", "base_port": 0},
        "tracking": {"database": f"t_{uuid.uuid4().hex[:12]}", "events_ttl_days": 2}})
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    fed = Federation(config, None, tracking_uri).deploy()
    try:
        def indexed():
            specs = list(tracking.db.events.index_information().values())
            ttl = [s.get("expireAfterSeconds") for s in specs if s["key"] == [("ts", 1)]]
            unique = [s for s in tracking.db.rounds.index_information().values()
                      if s.get("unique")]
            return ttl == [2 * 86400] and unique

        wait_until(indexed, "the events TTL index and a unique rounds index",
                   describe=lambda: (tracking.db.events.index_information(),
                                     tracking.db.rounds.index_information()))
    finally:
        fed.shutdown()
        tracking.db.client.drop_database(config.tracking.database)
        tracking.close()
