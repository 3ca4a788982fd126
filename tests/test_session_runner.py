"""The session runner against in-process combiners (tests/simfed.py): no Ray, no gRPC.

Prepare a pool of real combiner cores with simulated clients, run a session, and check
what the runner decided and committed, including a resume after a simulated crash.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fedray.actors.callbacks import RoundCommitted, RoundFailed, RoundStarted
from fedray.actors.session_runner import Start
from fedray.serialization import decode, encode
from fedray.strategies.fedopt import FedAvgM
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


def slow(value: float, seconds: float):
    import time

    def train(params, config, client_id, round_):
        time.sleep(seconds)
        return {k: v + value for k, v in params.items()}, 10, {}
    return train


@pytest.mark.parametrize("combiners", [1, 2])
async def test_buffer_size_closes_the_round_on_its_first_k_updates_across_combiners(combiners):
    pool = SimPool(combiners)
    for i, name in enumerate(["f1", "f2", "f3"]):
        pool.add(name, shift_by(1.0 + i), combiner=pool.names[i % combiners])
    for name in ("s1", "s2"):  # both slow ones on combiner-0, beside a fast one
        pool.add(name, slow(100.0, 0.6), combiner=pool.names[0])
    store = MemoryStore()
    settings = session_settings(rounds=2, min_clients=3, clients_per_round=5, buffer_size=3)
    try:
        state, reason, runner = await run_session(pool, store, settings,
                                                  Start(store.put(encode(SEED))))
        await asyncio.sleep(1.5)  # the slow clients answer round 2 after it closed
    finally:
        await pool.close()
    assert state == "finished", reason
    commits = runner.recorder.of(RoundCommitted)
    assert [c.updates for c in commits] == [3, 3]
    for commit in commits:  # the slow clients' combiner closed on the third update
        assert commit.combiners["combiner-0"]["close_reason"] == "buffer_full"
        assert commit.seconds < 0.5
    np.testing.assert_allclose(decode(store.get(runner.model_id))["w"], 2 * 2.0)  # no 100s
    late = [(lvl, msg) for lvl, msg, data in pool.listener.events
            if data.get("client_id") in {"s1", "s2"} and "dropped (late)" in msg]
    assert {m.split(" for round ")[1][0] for _, m in late} == {"1", "2"}
    assert all(lvl == "info" for lvl, _ in late)


async def test_attribute_and_policy_selection_ask_exactly_the_clients_they_name():
    pool = SimPool(2)
    for i in range(6):
        pool.add(f"c{i}", shift_by(1.0), attrs={"site": "eu" if i % 2 else "us"})
    store = MemoryStore()
    seed = store.put(encode(SEED))
    try:
        by_attr = await run_session(pool, store, session_settings(
            rounds=2, select={"attrs": {"site": "eu"}}), Start(seed))
        by_policy = await run_session(pool, store, session_settings(
            rounds=2, select={"policy": "tests.test_session_runner:first_two"}), Start(seed))
        asked = {name for name, client in pool.clients.items() if client.tasks_seen}
    finally:
        await pool.close()
    assert by_attr[0] == by_policy[0] == "finished"
    for (_, _, runner), wanted in ((by_attr, {"c1", "c3", "c5"}), (by_policy, {"c0", "c1"})):
        for started in runner.recorder.of(RoundStarted):
            assert {c for ids in started.clients.values() for c in ids} == wanted
    assert asked == {"c0", "c1", "c3", "c5"}


def first_two(clients, ctx):
    """A selection policy: the two clients with the smallest ids."""
    return sorted(c.client_id for c in clients)[:2]


async def test_fedbuff_commits_a_version_every_k_updates_weighted_by_staleness():
    pool = SimPool(2)
    for i in range(4):
        pool.add(f"fast{i}", slow(1.0, 0.05))
    pool.add("slow0", slow(1.0, 0.25))  # five times slower
    pool.add("slow1", slow(1.0, 0.25))
    store = MemoryStore()
    settings = session_settings(rounds=12, aggregator="fedbuff", buffer_size=4)
    try:
        state, reason, runner = await run_session(pool, store, settings,
                                                  Start(store.put(encode(SEED))))
    finally:
        await pool.close()
    assert state == "finished", reason
    commits = runner.recorder.of(RoundCommitted)
    assert [c.round for c in commits] == list(range(1, 13))
    assert all(c.mode == "async" and c.updates == 4 == len(c.contributions) for c in commits)
    slow_parts = [p for c in commits for p in c.contributions if p["client_id"].startswith("slow")]
    assert slow_parts and all(p["staleness"] >= 1 for p in slow_parts)  # nobody waited for them
    for p in slow_parts:
        assert p["weight"] == pytest.approx(1 / np.sqrt(1 + p["staleness"]), rel=1e-5)
    # every update moves the model by +1 from its base, discounted by its staleness
    final = decode(store.get(runner.model_id))["w"]
    assert 6 < float(final.mean()) <= 12


async def test_the_user_strategy_of_the_guide_is_exact_across_combiners_and_resumes():
    """examples/custom_strategy (docs/strategies.md): one combiner or two give the same
    model, the decayed learning rate reaches the clients, and its state survives."""
    from examples.custom_strategy.clipped import ClippedFedAvg

    seen: dict[str, list[float]] = {}

    def client(value, examples):
        def train(params, config, client_id, round_):
            seen.setdefault(client_id, []).append(config["lr"])
            return {k: v + value for k, v in params.items()}, examples, {}
        return train

    models = []
    for combiners in (1, 2):
        pool = SimPool(combiners)
        for name, value in (("a", 1.0), ("b", 0.5), ("far", 50.0)):
            pool.add(name, client(value, 10))
        store = MemoryStore()
        settings = session_settings(rounds=3, aggregator="examples.custom_strategy.clipped:"
                                    "ClippedFedAvg",
                                    aggregator_kwargs={"clip": 4.0, "lr": 0.4, "lr_decay": 0.5})
        try:
            state, reason, runner = await run_session(pool, store, settings,
                                                      Start(store.put(encode(SEED))))
        finally:
            await pool.close()
        assert state == "finished", reason
        models.append(decode(store.get(runner.model_id))["w"])
        assert [c.report["clipped_fraction"] for c in runner.recorder.of(RoundCommitted)] \
            == pytest.approx([1 / 3] * 3)
    np.testing.assert_allclose(models[0], models[1], rtol=1e-6)
    assert seen["a"][:3] == pytest.approx([0.4, 0.2, 0.1])
    restored = ClippedFedAvg()
    restored.load_state_dict(runner.strategy.state_dict())
    assert restored.rounds_seen == 3 and restored.clipped_mean == pytest.approx(1 / 3)


class NaNOnSecondRound(FedAvgM):
    """FedAvgM whose second aggregate is NaN (a strategy bug, or extreme inputs)."""

    calls = 0

    def finish(self, global_model, reduced):
        out = super().finish(global_model, reduced)
        NaNOnSecondRound.calls += 1
        if NaNOnSecondRound.calls == 2:
            out = {k: np.full_like(v, np.nan) for k, v in out.items()}
        return out


async def test_a_non_finite_aggregate_is_never_committed_and_the_state_goes_back():
    pool = await _pool({"a": (1.0, 10), "b": (1.0, 10)})
    store = MemoryStore()
    NaNOnSecondRound.calls = 0
    settings = session_settings(rounds=3, round_attempts=2,
                                aggregator="tests.test_session_runner:NaNOnSecondRound")
    try:
        state, reason, runner = await run_session(pool, store, settings,
                                                  Start(store.put(encode(SEED))))
    finally:
        await pool.close()
    assert state == "finished", reason
    failed = runner.recorder.of(RoundFailed)
    assert [(f.round, f.attempt) for f in failed] == [(2, 1)]
    assert "NaN or infinity" in failed[0].reason and "previous model stays" in failed[0].reason
    commits = runner.recorder.of(RoundCommitted)
    assert [c.round for c in commits] == [1, 2, 3]
    assert commits[1].parent_id == commits[0].model_id  # round 2 re-ran from round 1's model
    # FedAvgM's velocity went back to round 1's: as if the NaN attempt never happened
    np.testing.assert_allclose(decode(store.get(runner.model_id))["w"], 1 + 1.9 + 2.71)


async def test_metrics_whose_sum_overflows_across_combiners_are_left_out_of_the_commit():
    # Each combiner's sum is finite (1e308), their total is not: a mean of inf would be
    # stored as null, which the rounds schema refuses, and the commit record would be lost.
    from fedray.tracking import schema

    def huge(params, config, client_id, round_):
        return {k: v + 1.0 for k, v in params.items()}, 1, {"loss": 1e308, "acc": 0.5}

    pool = SimPool(2)
    pool.add("a", huge)
    pool.add("b", huge)
    store = MemoryStore()
    try:
        state, reason, runner = await run_session(pool, store, session_settings(rounds=1),
                                                  Start(store.put(encode(SEED))))
    finally:
        await pool.close()
    assert (state, reason) == ("finished", "")
    [commit] = runner.recorder.of(RoundCommitted)
    assert commit.train_metrics == {"acc": pytest.approx(0.5)}
    schema.check_fields("rounds", {"train_metrics": commit.train_metrics})
