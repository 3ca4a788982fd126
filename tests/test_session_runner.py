"""The session runner against in-process combiners (tests/simfed.py): no Ray, no gRPC.

Prepare a pool of real combiner cores with simulated clients, run a session, and check
what the runner decided and committed, including a resume after a simulated crash.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedray.actors.callbacks import RoundCommitted, RoundFailed, RoundStarted
from fedray.actors.session_runner import Start
from fedray.serialization import decode, encode
from tests.simfed import MemoryStore, SimPool, run_session, session_settings

SEED = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}


def shift_by(value: float, examples: int = 10):
    """A client whose update is its model plus ``value`` (and that reports ``examples``)."""
    def train(params, config, client_id, round_):
        return {k: v + value for k, v in params.items()}, examples, {"loss": value}
    return train


async def _pool(clients: dict[str, tuple[float, int]], combiners: int = 1) -> SimPool:
    pool = SimPool(combiners)
    for name, (value, examples) in clients.items():
        pool.add(name, shift_by(value, examples))
    return pool


async def test_fedavg_commits_the_example_weighted_mean_every_round():
    pool = await _pool({"a": (1.0, 10), "b": (4.0, 30)}, combiners=2)
    store = MemoryStore()
    try:
        state, reason, runner = await run_session(pool, store, session_settings(rounds=3),
                                                  Start(store.put(encode(SEED))))
    finally:
        await pool.close()
    assert (state, reason) == ("finished", "")
    final = decode(store.get(runner.model_id))
    np.testing.assert_allclose(final["w"], 3 * (1.0 * 10 + 4.0 * 30) / 40, rtol=1e-6)
    commits = runner.recorder.of(RoundCommitted)
    assert [c.round for c in commits] == [1, 2, 3] and all(c.updates == 2 for c in commits)
    assert commits[0].train_metrics == {"loss": pytest.approx((1.0 * 10 + 4.0 * 30) / 40)}


async def test_a_resumed_session_continues_after_its_last_commit_and_ends_the_same():
    store = MemoryStore()
    seed = store.put(encode(SEED))
    settings = session_settings(rounds=4, aggregator="fedavgm",
                                aggregator_kwargs={"momentum": 0.5})
    pool = await _pool({"a": (1.0, 10), "b": (2.0, 10)})
    try:
        _, _, whole = await run_session(pool, store, settings, Start(seed))
        first = await run_session(pool, store, session_settings(
            rounds=2, aggregator="fedavgm", aggregator_kwargs={"momentum": 0.5}), Start(seed))
        done = first[2]
        resumed = await run_session(pool, store, settings,
                                    Start(done.model_id, done.rounds_done, done.state_id,
                                          resume=True), session_id=done.session_id)
    finally:
        await pool.close()
    assert resumed[0] == "finished"
    assert [c.round for c in resumed[2].recorder.of(RoundCommitted)] == [3, 4]
    np.testing.assert_allclose(decode(store.get(resumed[2].model_id))["w"],
                               decode(store.get(whole.model_id))["w"], rtol=1e-6)


async def test_a_round_without_enough_updates_runs_again_and_names_the_failed_client():
    pool = SimPool(1)

    def broken(params, config, client_id, round_):
        raise RuntimeError("no data here")

    pool.add("good", shift_by(1.0))
    bad = pool.add("bad", broken)
    store = MemoryStore()
    try:
        state, reason, runner = await run_session(
            pool, store, session_settings(rounds=1, round_attempts=2, round_timeout_s=0.5),
            Start(store.put(encode(SEED))))
    finally:
        await pool.close()
    assert state == "failed" and "round 1 failed 2 time(s)" in reason
    assert "[bad]: RuntimeError: no data here" in reason  # who failed, and why
    failed = runner.recorder.of(RoundFailed)
    assert len(failed) == 2 and failed[0].failures == {"bad": "RuntimeError: no data here"}
    assert bad.tasks_seen == [("train", 1), ("train", 1)]
    assert [e.attempt for e in runner.recorder.of(RoundStarted)] == [1, 2]
