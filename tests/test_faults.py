"""Faults injected for real: actors killed mid-session, rounds rerun, sessions resumed."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray
from test_federation import SEED, DeltaWorker, SlowWorker, _config

from fedray.deploy.federation import Federation
from fedray.serialization import decode, encode
from fedray.storage import open_model_store
from fedray.tracking.resume import ResumePoint, resume_point
from fedray.tracking.store import TrackingStore
from tests.waiting import async_wait_until, wait_connected, wait_until

pytestmark = pytest.mark.integration


def _deploy(config, tracking_uri, fleet, workers, **settings):
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(SEED))
    fed = Federation(config, None, tracking_uri).deploy()
    for i, (name, worker) in enumerate(workers.items()):
        fleet.add(name, worker, fed.gateway, backoff_initial_s=0.2, **settings)
        wait_connected(fleet, i + 1)
    return fed, store, seed_id


def _server_optimizer_run(name: str, kwargs: dict, rounds: int, reset_after: int = 0):
    """The global ``w`` after ``rounds`` rounds in which every client adds 1 (pure); with
    ``reset_after``, as if the server state had been lost after that round."""
    from fedray.strategies import make_strategy
    from fedray.strategies.snapshots import UpdateMeta
    from fedray.strategies.updates import ShareStart, Update

    strategy, model = make_strategy(name, kwargs), dict(SEED)
    spec = {k: ("F32", v.shape) for k, v in model.items()}
    for number in range(1, rounds + 1):
        if number == reset_after + 1:
            strategy.load_state_dict({})
        acc = strategy.start(ShareStart(spec=spec, base=model))
        for client in ("a", "b"):
            acc.fold(Update({k: v + 1 for k, v in model.items()}, UpdateMeta(client, number, 10),
                            b""))
        model = strategy.finish(model, strategy.reduce([acc.partial()]))
    return model["w"]


# FedYogi and FedAdagrad keep the same m and v as FedAdam (AdaptiveOptimizer); their own
# save/load is tested without Ray in test_strategy_fedopt, so one adaptive case is enough.
@pytest.mark.parametrize(("aggregator", "kwargs"), [("fedavgm", {"momentum": 0.9}),
                                                    ("fedadam", {})], ids=["fedavgm", "fedadam"])
def test_a_killed_controller_resumes_after_its_last_committed_round(
        ray_session, tracking_uri, fleet, tmp_path, aggregator, kwargs):
    # Server optimizers keep state (momentum, moments): the final model is right only if it
    # survived the restart between rounds 2 and 3.
    config = _config(f"controller-dies-{aggregator}", tmp_path, combiners=1, rounds=4,
                     min_clients=2, aggregator=aggregator, aggregator_kwargs=kwargs)
    workers = {"a": SlowWorker(1.0, 10, 0.3), "b": SlowWorker(1.0, 10, 0.3)}
    fed, store, seed_id = _deploy(config, tracking_uri, fleet, workers)
    killed = threading.Event()

    def on_status(status):
        if status["rounds_done"] == 2 and not killed.is_set():
            killed.set()
            ray.kill(ray.get_actor("controller", namespace=config.namespace), no_restart=False)

    try:
        session_id = fed.start_session(seed_id)
        status = fed.follow(on_status)
    finally:
        fed.shutdown()
    assert killed.is_set()
    assert status["state"] == "finished" and status["session_id"] == session_id, status
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    rounds = tracking.find("rounds", {"session_id": session_id}, sort=[("round", 1)])
    assert [(r["round"], r["status"]) for r in rounds] == [(i, "finished") for i in range(1, 5)]
    trail = tracking.find("models", {"session_id": session_id}, sort=[("round", 1)])
    assert [m["round"] for m in trail] == [0, 1, 2, 3, 4]  # no round committed twice
    for parent, child in zip(trail, trail[1:], strict=False):
        assert child["parent_id"] == parent["model_id"]
    final = decode(store.get(status["model_id"]))["w"]
    expected = _server_optimizer_run(aggregator, kwargs, 4)
    np.testing.assert_allclose(final, expected, rtol=1e-5)
    lost = _server_optimizer_run(aggregator, kwargs, 4, reset_after=2)
    assert not np.allclose(final, lost, rtol=1e-3)  # a lost state would show
    if aggregator == "fedavgm":  # velocity -1, -1.9, -2.71, -3.439 -> 1 + 1.9 + 2.71 + 3.439
        np.testing.assert_allclose(final, 9.049, rtol=1e-5)
    assert rounds[2]["aggregator_state_id"]
    events = [e["message"] for e in tracking.find("events", {"session_id": session_id})]
    # After round 2, or 3 when the kill came late (a loaded machine: the status that says
    # round 2 is done can arrive while round 3 commits); never before round 2.
    assert any(f"resumed after round {n}" in m for m in events for n in (2, 3)), events


def test_a_resumed_session_does_not_train_from_a_model_tracking_was_made_to_name(
        ray_session, tracking_uri, fleet, tmp_path):
    """Finding 6 of issue 14: the resumed session's model and state ids came from tracking,
    which anyone who can write it may alter (the embedded server has no authentication):
    with a writable model store, that is model substitution. Commits are signed with the
    federation's key; a resume passes over a round whose signature does not verify."""
    config = _config("resume-signed", tmp_path, combiners=1, rounds=4, min_clients=2)
    workers = {"a": SlowWorker(1.0, 10, 1.0), "b": SlowWorker(1.0, 10, 1.0)}
    fed, store, seed_id = _deploy(config, tracking_uri, fleet, workers)
    planted = store.put(encode({k: np.full_like(v, 1000.0) for k, v in SEED.items()}))
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    killed = threading.Event()

    def on_status(status):
        if status["rounds_done"] == 2 and not killed.is_set():
            killed.set()  # tracking says round 2 committed the planted model, then a crash
            # The status runs ahead of the queued tracking writes: tamper with round 2 only
            # once its own commit landed, or that commit would overwrite the planted id.
            wait_until(lambda: tracking.find("rounds", {"session_id": status["session_id"],
                                                        "round": 2, "status": "finished",
                                                        "commit_mac": {"$exists": True}}),
                       timeout=10, what="round 2's commit in tracking")
            tracking.update_round(status["session_id"], 2, model_id=planted)
            ray.kill(ray.get_actor("controller", namespace=config.namespace), no_restart=False)

    try:
        session_id = fed.start_session(seed_id)
        status = fed.follow(on_status)
    finally:
        fed.shutdown()
    assert killed.is_set() and status["state"] == "finished", status
    trail = tracking.find("models", {"session_id": session_id})
    assert planted not in {m.get("parent_id") for m in trail}  # never trained from
    events = [e["message"] for e in tracking.find("events", {"session_id": session_id})]
    assert any("do not verify under this federation's key" in m for m in events), events
    assert any("resumed after round 1" in m for m in events), events
    # 4 rounds of +1 from the seed's 0, round 2 done twice: never 1000-something
    np.testing.assert_allclose(decode(store.get(status["model_id"]))["w"], 4.0, rtol=1e-6)


def test_a_combiner_killed_mid_round_does_not_hang_the_round(
        ray_session, tracking_uri, fleet, tmp_path):
    config = _config("combiner-dies", tmp_path, combiners=2, rounds=2, min_clients=4,
                     round_timeout_s=20)
    workers = {f"w{i}": SlowWorker(1.0, 10, 1.5) for i in range(4)}
    fed, store, seed_id = _deploy(config, tracking_uri, fleet, workers)
    started = time.monotonic()
    try:
        fed.start_session(seed_id)
        wait_until(lambda: all(w.training.is_set() for w in workers.values()),
                   "round 1 to be out, every client training",
                   describe=lambda: [n for n, w in workers.items() if not w.training.is_set()])
        ray.kill(ray.get_actor("combiner-1", namespace=config.namespace), no_restart=False)
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()
    assert status["state"] == "finished", status["reason"]
    assert time.monotonic() - started < 60
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    round_one = tracking.get_round(status["session_id"], 1)
    assert round_one["status"] == "finished" and round_one["attempt"] == 2  # rerun, not hung
    events = [e["message"] for e in tracking.find("events", {"round": 1})]
    assert any("attempt 1 failed" in m for m in events), events
    assert tracking.find("combiners", {"name": "combiner-1"})[0]["restarts"] >= 1


def test_resume_point_is_the_last_committed_round():
    session = {"seed_model_id": "seed"}
    assert resume_point(session, []) == ResumePoint(0, "seed")
    rounds = [{"round": 1, "status": "finished", "model_id": "m1"},
              {"round": 2, "status": "finished", "model_id": "m2"},
              {"round": 3, "status": "running", "model_id": "m2"}]
    assert resume_point(session, rounds) == ResumePoint(2, "m2")
    assert resume_point(session, rounds[::-1]) == ResumePoint(2, "m2")


def test_the_embedded_tracking_server_dies_and_nothing_committed_is_lost(
        ray_session, fleet, tmp_path):
    import os
    import signal

    from fedray.tracking.embedded import EmbeddedMongo
    from fedray.tracking.supervisor import SupervisedMongo

    supervised = SupervisedMongo(EmbeddedMongo(tmp_path / "trk")).start()
    config = _config("tracking-dies", tmp_path, combiners=1, rounds=3, min_clients=2)
    workers = {"a": SlowWorker(1.0, 10, 0.4), "b": SlowWorker(1.0, 10, 0.4)}
    fed, _, seed_id = _deploy(config, supervised.uri, fleet, workers)
    killed = threading.Event()

    def on_status(status):
        if status["rounds_done"] == 1 and not killed.is_set():
            killed.set()
            os.kill(supervised.server.pid, signal.SIGKILL)

    try:
        session_id = fed.start_session(seed_id)
        status = fed.follow(on_status)
    finally:
        fed.shutdown()
    try:
        assert status["state"] == "finished", status["reason"]
        assert supervised.restarts == 1
        tracking = TrackingStore.from_uri(supervised.uri, config.tracking.database)
        rounds = tracking.find("rounds", {"session_id": session_id}, sort=[("round", 1)])
        assert [(r["round"], r["status"]) for r in rounds] == [(1, "finished"), (2, "finished"),
                                                              (3, "finished")]
        assert tracking.get_session(session_id)["status"] == "finished"
        messages = [e["message"] for e in tracking.find("events", {"session_id": session_id})]
        for n in (1, 2, 3):
            assert any(f"round {n} committed" in m for m in messages), messages
    finally:
        supervised.stop()


def test_a_client_that_keeps_its_socket_but_stops_heartbeating_goes_offline(
        ray_session, tracking_uri, tmp_path):
    import asyncio

    import grpc

    from fedray.bridge.proto import fedray_v1_pb2 as pb
    from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc

    config = _config("stalled", tmp_path, combiners=1, min_clients=1)
    fed = Federation(config, None, tracking_uri).deploy()

    async def stall() -> float:
        async with grpc.aio.insecure_channel(fed.gateway) as ch:
            assignment = await pb_grpc.GatewayStub(ch).Assign(pb.AssignRequest(name="staller"))
        async with grpc.aio.insecure_channel(assignment.address) as ch:
            stream = pb_grpc.CombinerStub(ch).Join(pb.JoinRequest(client_id=assignment.client_id,
                                                                  name="staller"))
            await stream.wait_for_connection()
            joined = time.monotonic()
            tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)

            async def offline() -> bool:
                docs = await asyncio.to_thread(tracking.find, "clients", {"name": "staller"})
                return bool(docs) and docs[0]["status"] == "offline"

            # the socket stays open, no heartbeat is sent
            await async_wait_until(offline, "the stalled client to be marked offline",
                                   timeout=15)
            return time.monotonic() - joined

    try:
        elapsed = asyncio.run(stall())
    finally:
        fed.shutdown()
    offline_after = config.combiners.offline_after_s
    assert offline_after <= elapsed < offline_after + 5


class SlowValidator(DeltaWorker):
    """Validates slowly, so the controller can be killed while round 1 is validated."""

    def __init__(self, delta: float, examples: int) -> None:
        super().__init__(delta, examples)
        self.validating = threading.Event()

    def validate(self, model: bytes, config: dict):
        self.validating.set()
        time.sleep(1.5)  # behaviour: a slow validation, long enough to kill the controller in
        return super().validate(model, config)


def test_a_controller_killed_while_validating_keeps_the_round_it_committed(
        ray_session, tracking_uri, fleet, tmp_path):
    # Commit first, then validate: round 1 is in tracking before its validation starts,
    # so a controller that dies during validation resumes after round 1, not before it.
    config = _config("killed-validating", tmp_path, combiners=1, rounds=2, min_clients=2,
                     validate=True)
    workers = {"a": SlowValidator(1.0, 10), "b": SlowValidator(1.0, 10)}
    fed, store, seed_id = _deploy(config, tracking_uri, fleet, workers)
    try:
        session_id = fed.start_session(seed_id)
        assert workers["a"].validating.wait(30)
        tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
        round_1 = tracking.get_round(session_id, 1)
        assert round_1["status"] == "finished" and round_1["model_id"]  # committed already
        ray.kill(ray.get_actor("controller", namespace=config.namespace), no_restart=False)
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()
    assert status["state"] == "finished" and status["session_id"] == session_id, status
    trail = tracking.find("models", {"session_id": session_id}, sort=[("round", 1)])
    assert [m["round"] for m in trail] == [0, 1, 2]  # round 1 was not trained twice
    assert tracking.get_round(session_id, 1)["model_id"] == round_1["model_id"]
    np.testing.assert_allclose(decode(store.get(status["model_id"]))["w"], 2.0)
    events = [e["message"] for e in tracking.find("events", {"session_id": session_id})]
    assert any("resumed after round 1" in m for m in events), events


def test_a_session_continued_from_another_keeps_its_server_optimizer_state(
        ray_session, tracking_uri, fleet, tmp_path):
    # session.continue_from: the new session starts from the old one's last model and
    # strategy state, so FedAdam's moments carry on as if it were one session of 4 rounds.
    kwargs = {"server_lr": 0.1}
    first = _config("continued", tmp_path, combiners=1, rounds=2, min_clients=2,
                    aggregator="fedadam", aggregator_kwargs=kwargs)
    workers = {"a": DeltaWorker(1.0, 10), "b": DeltaWorker(1.0, 10)}
    fed, store, seed_id = _deploy(first, tracking_uri, fleet, workers)
    try:
        earlier = fed.start_session(seed_id)
        assert fed.follow(lambda s: None)["state"] == "finished"
    finally:
        fed.shutdown()
    fleet.stop()
    fleet.lines.clear()
    second = _config("continued", tmp_path, combiners=1, rounds=2, min_clients=2,
                     aggregator="fedadam", aggregator_kwargs=kwargs,
                     continue_from=earlier[:8])  # a unique prefix is enough
    fed, store, _ = _deploy(second, tracking_uri, fleet, workers)
    try:
        later = fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()
    assert status["state"] == "finished" and later != earlier
    final = decode(store.get(status["model_id"]))["w"]
    np.testing.assert_allclose(final, _server_optimizer_run("fedadam", kwargs, 4), rtol=1e-5)
    lost = _server_optimizer_run("fedadam", kwargs, 4, reset_after=2)
    assert not np.allclose(final, lost, rtol=1e-3)  # a fresh optimizer would show
    tracking = TrackingStore.from_uri(tracking_uri, second.tracking.database)
    doc = tracking.get_session(later)
    assert doc["continued_from"] == earlier
    assert doc["seed_model_id"] == tracking.get_session(earlier)["model_id"]


def test_a_resume_counts_only_what_the_federation_signed():
    from fedray.tracking.resume import commit_mac

    key = b"k" * 32
    session = {"session_id": "s", "seed_model_id": "seed", "seed_mac": commit_mac(key, "s", 0, "seed")}
    rounds = [{"round": 1, "status": "finished", "model_id": "m1", "aggregator_state_id": "x1",
               "commit_mac": commit_mac(key, "s", 1, "m1", "x1")},
              {"round": 2, "status": "finished", "model_id": "planted",  # altered after signing
               "commit_mac": commit_mac(key, "s", 2, "m2")},
              {"round": 3, "status": "finished", "model_id": "m3"}]  # no signature at all
    assert resume_point(session, rounds, key) == ResumePoint(1, "m1", "x1", unverified=2)
    assert resume_point(session, rounds[1:], key) == ResumePoint(0, "seed", unverified=2)
    forged_seed = {**session, "seed_model_id": "planted"}
    assert not resume_point(forged_seed, rounds[1:], key).trusted
    assert resume_point(forged_seed, rounds[1:]).trusted  # without a key, as before
