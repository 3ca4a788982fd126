"""FedBuff's pipeline against in-process combiners (tests/simfed.py): which version each
task carries, and what each version records. No Ray, no gRPC.

Issue 15: with 6 equally fast clients and a version every 6 updates, every update from
version 16 on had staleness 10 and a third were dropped as stale: a client's next task
was sent the moment its update was accepted, on the version its combiner had then, and
clients that outpaced the controller queued updates there until they were
``max_staleness`` versions old.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from fedray.actors.controller.async_runner import buffer_target
from fedray.actors.controller.callbacks import Notice, RoundCommitted
from fedray.actors.controller.session_runner import Start
from fedray.serialization import encode
from fedray.strategies.fedbuff import FedBuff
from fedray.strategies.snapshots import Staleness
from tests.simfed import MemoryStore, SimPool, run_session, session_settings

SEED = {"w": np.zeros((30, 40), np.float32), "b": np.zeros(40, np.float32)}


def shift(seconds: float = 0.0):
    """A client that adds 1 to every weight, after ``seconds`` of training."""
    def train(params, config, client_id, round_):
        if seconds:
            time.sleep(seconds)  # behaviour: a slower client's training
        return {k: v + 1.0 for k, v in params.items()}, 10, {}
    return train


async def _session(pool: SimPool, strategy=None, **settings):
    store = MemoryStore()
    try:
        return await run_session(pool, store, session_settings(aggregator="fedbuff",
                                                               **settings),
                                 Start(store.put(encode(SEED))), strategy=strategy)
    finally:
        await pool.close()


async def test_equally_fast_clients_train_the_newest_version_and_none_is_dropped():
    pool = SimPool(2)
    for i in range(6):
        pool.add(f"c{i}", shift())  # as fast as the pipeline goes: the case that lagged
    state, reason, session = await _session(pool, rounds=40, buffer_size=6, min_clients=6)
    assert state == "finished", reason
    commits = session.recorder.of(RoundCommitted)
    staleness = [c["staleness"] for v in commits for c in v.contributions]
    assert len(commits) == 40 and len(staleness) == 240
    assert statistics.median(staleness) <= 1, sorted(staleness)  # was 10
    drops = [n.message for n in session.recorder.of(Notice) if "dropped" in n.message]
    late = [e for e in pool.listener.events if e[2].get("reason") == "stale"]
    assert not drops and not late, (drops[:3], late[:3])  # were 476 of 716


class NewestOnly(FedBuff):
    """FedBuff that takes updates of the newest version only (its ``weigh`` drops the
    others as stale, at the combiner already), and keeps older versions servable."""

    def weigh(self, meta):
        if meta.staleness > 0:
            return Staleness.dropped("stale", f"staleness {meta.staleness}: newest only")
        return super().weigh(meta)


async def test_a_participant_whose_update_the_combiner_drops_as_stale_trains_again():
    """Its task is over: it gets the next one (it used to wait for one for ever)."""
    pool = SimPool(1)
    pool.add("fast", shift(0.03))
    slow = pool.add("slow", shift(0.15))  # a few versions behind (of 11 kept) when it answers
    state, reason, _ = await _session(pool, NewestOnly(), rounds=100_000, buffer_size=1,
                                      min_clients=2, time_budget_s=3.0)
    assert state == "finished", reason
    refused = [r for r in slow.replies if not r[1]]
    assert refused and all(why.startswith("stale") for _, _, why in refused), slow.replies
    assert len(slow.tasks_seen) >= 3, slow.tasks_seen  # was 1


async def test_each_version_records_its_combiners_shares_like_a_round():
    """bytes_in/bytes_out and the other counts of each combiner, per version (they were
    {} for FedBuff: 0 bytes)."""
    from fedray.tracking import checker

    pool = SimPool(2)
    for i in range(4):
        pool.add(f"c{i}", shift(0.01))
    state, reason, session = await _session(pool, rounds=6, buffer_size=4, min_clients=4)
    assert state == "finished", reason
    size = len(encode({k: v + 1.0 for k, v in SEED.items()}))  # every update's bytes
    commits = session.recorder.of(RoundCommitted)
    received = 0
    for commit in commits:
        checker.check_fields("rounds", {"combiners": commit.combiners})  # a CombinerShare each
        assert sorted(commit.combiners) == ["combiner-0", "combiner-1"]
        assert all(c["asked"] == 2 and c["close_reason"] == "buffer_full"
                   for c in commit.combiners.values()), commit.combiners
        received += sum(c["bytes_in"] for c in commit.combiners.values())
    # an update's bytes count in the version being built when it arrived: never a later one
    assert received >= size * sum(c.updates for c in commits) > 0
    assert commits[0].combiners["combiner-0"]["bytes_in"] > 0


@pytest.mark.parametrize(("buffer_size", "taking_part", "k"), [
    (0, 6, 3), (0, 5, 3), (0, 8, 4), (0, 1, 1), (0, 0, 1), (5, 6, 5), (10, 2, 10)])
def test_a_version_takes_buffer_size_updates_else_half_the_clients_taking_part(
        buffer_size, taking_part, k):
    assert buffer_target(buffer_size, taking_part) == k


async def test_without_buffer_size_a_version_takes_half_the_clients_updates():
    """It was session.min_clients (2 in the stock configs: every 2 updates, which lost to
    FedAvg on the digits when training is quick)."""
    pool = SimPool(2)
    for i in range(5):
        pool.add(f"c{i}", shift(0.01))
    state, reason, session = await _session(pool, rounds=4, min_clients=5)
    assert state == "finished", reason
    assert [c.updates for c in session.recorder.of(RoundCommitted)] == [3, 3, 3, 3]
