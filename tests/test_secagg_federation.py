"""Integration: ``aggregator: secagg`` end to end, real Ray, real gRPC edge clients.

A federation of 4 in-process edge clients (whose updates are their model plus a value of
their own, some clipped) runs with 1 and with 3 combiners: the committed models equal
plain FedAvg over the same clipped, quantized deltas, exactly, round after round (fresh
keys each round); a client that drops after sending its masked input, and one that drops
before, leave the survivors' exact sum.
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pytest
import ray

from fedray.actors.controller.queue import SessionRequest
from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from fedray.edge.workers import CallbackWorker
from fedray.serialization import decode, encode
from fedray.storage import open_model_store
from fedray.tracking.store import TrackingStore
from tests.test_secagg_strategy import (
    EXAMPLES,
    KWARGS,
    VALUES,
    DropsAtUnmask,
    OneHalf,
    expected_model,
)
from tests.test_session_runner import SEED
from tests.waiting import wait_connected, wait_until

pytestmark = pytest.mark.integration


def trains_by(value: float, examples: int, fails: set[str], name: str):
    def train(params, config):
        if name in fails:
            raise RuntimeError("this site is gone before its masked input")
        return {k: v + np.float32(value) for k, v in params.items()}, examples, {}
    return train


@pytest.fixture(scope="module", params=[1, 3], ids=["1-combiner", "3-combiners"])
def federation(request, ray_session, tracking_uri, tmp_path_factory):
    from tests.conftest import EdgeFleet

    combiners = request.param
    tmp = tmp_path_factory.mktemp(f"secagg{combiners}")
    config = config_from_dict({
        "federation": f"secagg{combiners}", "seed_model": "unused", "data_dir": str(tmp),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": combiners, "host": "127.0.0.1", "base_port": 0},
        "tracking": {"database": f"t_secagg{combiners}"},
        "session": {"rounds": 2, "min_clients": len(VALUES), "round_timeout_s": 30,
                    "validate": False, "wait_for_clients_s": 60, "seed": 1,
                    "aggregator": "secagg",
                    "secagg": {**KWARGS, "stage_timeout_s": 20.0}},
    })
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(SEED))
    fed = Federation(config, None, tracking_uri).deploy()
    fleet = EdgeFleet()
    fails: set[str] = set()
    try:
        for name, value in VALUES.items():
            fleet.add(name, CallbackWorker(trains_by(value, EXAMPLES[name], fails, name)),
                      fed.gateway)
        wait_connected(fleet, len(VALUES), timeout=60)
        yield fed, store, seed_id, fleet, fails, TrackingStore.from_uri(
            tracking_uri, f"t_secagg{combiners}"), combiners
    finally:
        fleet.close()
        fed.shutdown()


def run(federation, **session) -> dict:
    fed, store, seed_id, *_ = federation
    settings = dataclasses.replace(fed.config.session, **session)
    session_id = uuid.uuid4().hex[:16]
    ray.get(fed.controller.submit_session.remote(SessionRequest(session_id, settings, seed_id)))
    # right after the submit the controller may still report the last session: wait for
    # this one to be the one it reports, then follow it to its end
    wait_until(lambda: (ray.get(fed.controller.watch.remote(-1, 0.0, 0))[1] or {}).get(
        "session_id") == session_id, f"session {session_id} to start")
    status = fed.follow(lambda s: None)
    assert status["session_id"] == session_id
    return status


def expected_after(rounds: int, survivors: set[str]) -> dict[str, np.ndarray]:
    """Plain FedAvg over the clipped, quantized deltas, ``rounds`` times from SEED (every
    client's delta is its value again, so round r's model is r steps of round 1's)."""
    values = {k: v for k, v in VALUES.items() if k in survivors}
    step = expected_model(values, EXAMPLES)
    model = SEED
    for _ in range(rounds):
        model = {k: (model[k] + step[k]).astype(np.float32) for k in SEED}
    return model


def test_secagg_commits_fedavg_of_the_clipped_quantized_deltas_exactly(federation):
    store, tracking, combiners = federation[1], federation[5], federation[6]
    status = run(federation)
    assert status["state"] == "finished", str(status)[:3000]
    for number in (1, 2):  # every combiner folded masked inputs: pairs span combiners
        shares = tracking.get_round(status["session_id"], number)["combiners"]
        folded = [c["updates"] for c in shares.values()]
        assert len(folded) == combiners and sum(folded) == 4 and min(folded) >= 1, shares
        stages = tracking.get_round(status["session_id"], number)["stages"]
        assert sorted(stages) == ["secagg.advertise", "secagg.share", "secagg.unmask"]
        for name, traffic in stages.items():  # every key stage's messages are counted
            assert traffic["asked"] == traffic["replies"] == 4, (name, traffic)
            assert traffic["bytes_in"] > 0 and traffic["seconds"] > 0, (name, traffic)
        assert stages["secagg.share"]["bytes_out"] > 0  # the neighbours' keys went out
    final = decode(store.get(status["model_id"]))
    want = expected_after(2, set(VALUES))
    for name in SEED:
        np.testing.assert_array_equal(final[name], want[name])
    assert not np.array_equal(final["w"], SEED["w"])


def test_a_client_dropping_after_its_masked_input_is_still_in_the_exact_sum(federation):
    fed, store, seed_id, fleet, fails, *_ = federation
    runner = fleet.runners["b"]
    plain = runner.tasks.halves
    runner.tasks.halves = OneHalf(DropsAtUnmask())  # b masks its input, then is gone
    try:
        status = run(federation, rounds=1, min_clients=3)
    finally:
        runner.tasks.halves = plain
    assert status["state"] == "finished", str(status)[:3000]
    final = decode(store.get(status["model_id"]))
    np.testing.assert_array_equal(final["w"], expected_after(1, set(VALUES))["w"])


def test_a_client_dropping_before_its_masked_input_leaves_the_others_exact_sum(federation):
    fed, store, seed_id, fleet, fails, *_ = federation
    fails.add("c")  # c shares its keys, then is gone: its pairwise masks are taken away
    try:  # the round waits for all 4 and commits with the 3 left (session.min_updates)
        status = run(federation, rounds=1, min_clients=4, min_updates=3)
    finally:
        fails.clear()
    assert status["state"] == "finished", str(status)[:3000]
    final = decode(store.get(status["model_id"]))
    np.testing.assert_array_equal(final["w"], expected_after(1, {"a", "b", "d"})["w"])


def test_without_min_updates_a_dropout_fails_the_round_that_needs_every_client(federation):
    fed, store, seed_id, fleet, fails, *_ = federation
    fails.add("c")
    try:
        status = run(federation, rounds=1, min_clients=4, round_attempts=1)
    finally:
        fails.clear()
    assert status["state"] == "failed"
    assert "only 3 update(s) arrived, session.min_clients is 4" in status["reason"], status
