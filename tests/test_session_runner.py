"""The session runner against in-process combiners (tests/simfed.py): no Ray, no gRPC.

Prepare a pool of real combiner cores with simulated clients, run a session, and check
what the runner decided and committed, including a resume after a simulated crash.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fedray.actors.controller.callbacks import Notice, RoundCommitted, RoundFailed, RoundStarted
from fedray.actors.controller.session_runner import Start
from fedray.serialization import decode, encode
from fedray.strategies.fedbuff import FedBuff, StaleWeightedDeltas
from fedray.strategies.fedopt import FedAvgM
from tests.simfed import MemoryStore, Recorder, SimPool, run_session, session_settings
from tests.waiting import async_wait_until

SEED = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}


async def _from_seed(pool: SimPool, store: MemoryStore, settings, **kwargs):
    """One session from SEED on ``pool``, closed after it: (state, reason, the runner)."""
    try:
        return await run_session(pool, store, settings, Start(store.put(encode(SEED))), **kwargs)
    finally:
        await pool.close()


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
    state, reason, runner = await _from_seed(pool, store, session_settings(rounds=3))
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
        time.sleep(seconds)  # behaviour: a slow client's training
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
        # the slow clients answer round 2 after it closed
        await async_wait_until(lambda: all(any(r[0] == 2 for r in pool.clients[n].replies)
                                           for n in ("s1", "s2")),
                               "the slow clients' answers to round 2",
                               describe=lambda: {n: pool.clients[n].replies
                                                 for n in ("s1", "s2")})
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
    state, reason, runner = await _from_seed(pool, store, settings)
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
    state, reason, runner = await _from_seed(pool, store, settings)
    assert state == "finished", reason
    failed = runner.recorder.of(RoundFailed)
    assert [(f.round, f.attempt) for f in failed] == [(2, 1)]
    assert "NaN or infinity" in failed[0].reason and "previous model stays" in failed[0].reason
    commits = runner.recorder.of(RoundCommitted)
    assert [c.round for c in commits] == [1, 2, 3]
    assert commits[1].parent_id == commits[0].model_id  # round 2 re-ran from round 1's model
    # FedAvgM's velocity went back to round 1's: as if the NaN attempt never happened
    np.testing.assert_allclose(decode(store.get(runner.model_id))["w"], 1 + 1.9 + 2.71)


async def test_an_async_session_sends_its_strategy_to_each_combiner_once_more_not_to_all():
    """Starting combiner k (or restarting it) sends the strategy to k only: linear, not N²."""
    pool = SimPool(3)
    for i in range(6):
        pool.add(f"c{i}", slow(1.0, 0.02))
    store = MemoryStore()
    settings = session_settings(rounds=2, aggregator="fedbuff", buffer_size=2)
    state, reason, _ = await _from_seed(pool, store, settings)
    assert state == "finished", reason
    assert sorted(pool.sessions_sent) == sorted(pool.names * 2)  # the session's start, then each


@pytest.fixture
def quick_retries(monkeypatch):
    """A failed attempt runs again at once, not after a second."""
    from fedray.actors.controller import sync_rounds as session_runner

    monkeypatch.setattr(session_runner, "RETRY_BACKOFF_S", (0.01, 0.01))


class FlakyResolvePool(SimPool):
    """Kept updates that cannot be read the first ``failures`` times (the combiner that
    ray.put them died after it answered: OwnerDiedError)."""

    def __init__(self, combiners: int = 1, failures: int = 1) -> None:
        super().__init__(combiners)
        self.failures = failures
        self.models: set[int] = set()

    def put_model(self, data: bytes):
        ref = super().put_model(data)
        self.models.add(id(ref))
        return ref

    async def resolve(self, handle):
        if id(handle) not in self.models and self.failures > 0:
            self.failures -= 1
            raise RuntimeError("OwnerDiedError: the object's owner has exited")
        return handle


async def test_a_kept_update_lost_with_its_combiner_reruns_the_round(quick_retries):
    pool = FlakyResolvePool(2)
    for name in ("a", "b", "c"):
        pool.add(name, shift_by(1.0))
    store = MemoryStore()
    settings = session_settings(rounds=2, round_attempts=2, aggregator="median",
                                clients_per_round=3)
    state, reason, runner = await _from_seed(pool, store, settings)
    assert state == "finished", reason
    failed = runner.recorder.of(RoundFailed)
    assert [(f.round, f.attempt) for f in failed] == [(1, 1)]
    assert "could not be read (RuntimeError: OwnerDiedError" in failed[0].reason
    assert [c.round for c in runner.recorder.of(RoundCommitted)] == [1, 2]


class ConfigureFails(FedAvgM):
    """FedAvgM whose configure fails: once (``transient``), or for good (a ConfigError)."""

    def __init__(self, transient: bool = True) -> None:
        super().__init__()
        self.transient, self.calls = transient, []

    def configure(self, ctx):
        from fedray.errors import ConfigError

        self.calls.append(ctx.attempt)
        if not self.transient:
            raise ConfigError("session.round_config.mu must be set for this strategy")
        if ctx.attempt == 1:
            raise RuntimeError("no client list yet")
        return super().configure(ctx)


@pytest.mark.parametrize("transient", [True, False])
async def test_configure_errors_fail_the_attempt_unless_the_settings_cannot_work(
        quick_retries, transient):
    pool = await _pool({"a": (1.0, 10), "b": (1.0, 10)})
    store = MemoryStore()
    settings = session_settings(rounds=1, round_attempts=3, aggregator="fedavgm")
    strategy = ConfigureFails(transient)
    state, reason, runner = await _from_seed(pool, store, settings, strategy=strategy)
    notes = [n.message for n in runner.recorder.of(Notice) if n.level == "warning"]
    if transient:  # runs again, and commits
        assert state == "finished", reason
        assert strategy.calls == [1, 2]
        assert any("attempt 1 failed: strategy 'fedavgm' failed in configure: RuntimeError: "
                   "no client list yet" in n for n in notes)
    else:  # a ConfigError can never pass: the session ends at once, saying why
        assert state == "failed" and "round_config.mu must be set" in reason
        assert strategy.calls == [1]


def every_client(clients, ctx):
    """A selection policy: every eligible client."""
    return [c.client_id for c in clients]


@pytest.mark.parametrize("select", [{}, {"policy": "tests.test_session_runner:every_client"}])
async def test_a_plan_asking_more_than_max_kept_updates_is_sampled_down_with_a_notice(select):
    shifts = {f"c{i}": (float(i), 10) for i in range(5)}
    pool = await _pool(shifts, combiners=2)
    store = MemoryStore()
    # A fraction (1.0) of 5 clients, or a policy that asks all: each round asks 3 of them.
    settings = session_settings(rounds=2, aggregator="median", max_kept_updates=3,
                                select=select)
    state, reason, runner = await _from_seed(pool, store, settings)
    assert (state, reason) == ("finished", "")
    started = runner.recorder.of(RoundStarted)
    asked = [sorted(i for ids in r.clients.values() for i in ids) for r in started]
    assert [len(a) for a in asked] == [3, 3]
    commits = runner.recorder.of(RoundCommitted)
    assert [c.updates for c in commits] == [3, 3]
    # The median of the sampled clients' shifts, round after round.
    expected = sum(float(np.median([shifts[i][0] for i in a])) for a in asked)
    np.testing.assert_allclose(decode(store.get(runner.model_id))["w"], expected, rtol=1e-6)
    notes = [n for n in runner.recorder.of(Notice) if n.data.get("reason") == "max_kept_updates"]
    assert [(n.level, n.round, n.data["planned"], n.data["asked"]) for n in notes] == [
        ("warning", 1, 5, 3), ("warning", 2, 5, 3)]
    assert notes[0].message == (
        "round 1: 'median' keeps every update of a round in Ray's object store, at most "
        "session.max_kept_updates (3); of the 5 clients planned, 3 are asked (a sample seeded "
        "by session.seed, the round and the attempt). To ask more, raise "
        "session.max_kept_updates (memory: that many model sizes)")
    # Seeded: the same session asks the same clients again.
    again = await _pool(shifts, combiners=2)
    _, _, rerun = await _from_seed(again, MemoryStore(), settings)
    assert [sorted(i for ids in r.clients.values() for i in ids)
            for r in rerun.recorder.of(RoundStarted)] == asked


async def test_a_strategy_that_needs_more_updates_than_min_clients_waits_for_and_asks_them():
    # Krum with f=1 needs 2f + 3 = 5 updates; session.min_clients is 2 and 2 clients are on.
    pool = await _pool({"a": (1.0, 10), "b": (2.0, 10)})
    store = MemoryStore()
    settings = session_settings(rounds=1, aggregator="krum", min_clients=2,
                                clients_per_round=2)
    recorder = Recorder()
    session = asyncio.ensure_future(run_session(pool, store, settings,
                                                Start(store.put(encode(SEED))),
                                                recorder=recorder))
    try:
        await async_wait_until(
            lambda: any(n.message == "waiting for clients: 2 of 5 connected"
                        for n in recorder.of(Notice)),
            "the session to wait for krum's 5 clients", describe=lambda: recorder.events)
        assert not recorder.of(RoundStarted)
        for name, value in (("c", 3.0), ("d", 4.0), ("e", 5.0)):
            pool.add(name, shift_by(value))
        state, reason, runner = await session
    finally:
        await pool.close()
    assert (state, reason) == ("finished", "")
    (started,) = runner.recorder.of(RoundStarted)
    assert sum(started.asked.values()) == 5  # clients_per_round 2 < 5: raised, like min_clients
    assert runner.recorder.of(RoundCommitted)[0].updates == 5
    assert any(n.message == "'krum' needs at least 5 updates per round: rounds wait for and "
                            "ask at least 5 clients (session.min_clients is 2)"
               for n in runner.recorder.of(Notice))


async def test_a_round_with_fewer_updates_than_the_strategy_needs_fails_naming_it():
    pool = SimPool(1)
    for name, value in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)):
        pool.add(name, shift_by(value))
    pool.add("mute", shift_by(5.0), delay=30.0)  # answers after the round's deadline
    store = MemoryStore()
    settings = session_settings(rounds=1, aggregator="krum", round_timeout_s=1.0,
                                round_attempts=1)
    state, reason, runner = await _from_seed(pool, store, settings)
    assert state == "failed"
    assert "only 4 update(s) arrived, 'krum' needs 5 per round (session.min_clients is 2)" \
        in reason


async def test_claim_keeps_its_buffer_full_call_referenced_until_it_is_done():
    from fedray.actors.controller.callbacks import Callbacks
    from fedray.actors.controller.session_runner import SessionRunner
    from fedray.strategies import make_strategy

    pool = SimPool(2)
    runner = SessionRunner(federation="sim", session_id="s", settings=session_settings(),
                           strategy=make_strategy("fedavg"), pool=pool, store=MemoryStore(),
                           callbacks=Callbacks([]))
    runner.claims.open(1, 1, 2)
    tasks = runner.session._tasks
    assert runner.claim(1, 1, "a") == 1 and not tasks
    assert runner.claim(1, 1, "b") == 2 and len(tasks) == 1  # the K-th: buffer_full
    task = next(iter(tasks))
    await task
    await asyncio.sleep(0)  # one turn of the loop: the task's done-callback forgets it
    assert not tasks
    await pool.close()


def ghost_first(clients, ctx):
    """A selection policy that names a client nobody knows on a round's first attempt."""
    return ["ghost"] if ctx.attempt == 1 else [c.client_id for c in clients]


async def test_a_policy_that_picks_an_unknown_client_fails_that_attempt_only(quick_retries):
    pool = await _pool({"a": (1.0, 10), "b": (1.0, 10)})
    store = MemoryStore()
    settings = session_settings(rounds=1, select={"policy": "tests.test_session_runner:"
                                                            "ghost_first"})
    state, reason, runner = await _from_seed(pool, store, settings)
    assert state == "finished", reason
    assert [e.attempt for e in runner.recorder.of(RoundStarted)] == [2]
    assert any("not eligible or not online: ['ghost']" in n.message
               for n in runner.recorder.of(Notice))


# ------------------------------------------------------------------ asynchronous (FedBuff)


class FoldRefuses(FedBuff):
    """FedBuff whose fold fails for client ``bad`` (a strategy bug, mid-session)."""

    def start(self, share):
        class Folds(StaleWeightedDeltas):
            def fold(self, update):
                if update.meta.client_id == "bad":
                    raise ZeroDivisionError("float division by zero")
                super().fold(update)
        return Folds(share)


class NaNVersions(FedBuff):
    """FedBuff whose versions in ``bad`` (1-based calls of finish) are NaN."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad, self.calls = bad, 0

    def finish(self, global_model, reduced):
        out = super().finish(global_model, reduced)
        self.calls += 1
        return {k: np.full_like(v, np.nan) for k, v in out.items()} if self.calls in self.bad \
            else out


async def _fedbuff(pool, strategy=None, **settings):
    for i in range(4):
        pool.add(f"c{i}", slow(1.0, 0.02))
    store = MemoryStore()
    settings = session_settings(**{"rounds": 4, "aggregator": "fedbuff", "buffer_size": 2,
                                   **settings})
    return await _from_seed(pool, store, settings, strategy=strategy)


async def test_an_update_the_strategy_cannot_fold_is_dropped_and_fedbuff_goes_on():
    pool = SimPool(2)
    pool.add("bad", slow(1.0, 0.02))
    state, reason, runner = await _fedbuff(pool, FoldRefuses())
    assert state == "finished", reason
    commits = runner.recorder.of(RoundCommitted)
    assert len(commits) == 4 and all(p["client_id"] != "bad" for c in commits
                                     for p in c.contributions)
    drops = [n for n in runner.recorder.of(Notice) if n.data.get("reason") == "strategy_error"]
    assert drops and drops[0].data["client_id"] == "bad"
    assert "failed to fold it: ZeroDivisionError" in drops[0].message


async def test_a_forwarded_update_that_cannot_be_read_is_dropped_and_fedbuff_goes_on():
    state, reason, runner = await _fedbuff(FlakyResolvePool(2, failures=1))
    assert state == "finished", reason
    lost = [n for n in runner.recorder.of(Notice) if n.data.get("reason") == "lost"]
    assert len(lost) == 1 and "could not be read (RuntimeError: OwnerDiedError" in lost[0].message


async def test_a_refused_version_discards_its_buffer_and_is_built_again():
    state, reason, runner = await _fedbuff(SimPool(2), NaNVersions({2}), round_attempts=2)
    assert state == "finished", reason
    assert [(f.round, f.attempt) for f in runner.recorder.of(RoundFailed)] == [(2, 1)]
    commits = runner.recorder.of(RoundCommitted)
    assert [(c.round, c.attempt) for c in commits] == [(1, 1), (2, 2), (3, 1), (4, 1)]
    assert commits[1].parent_id == commits[0].model_id  # the previous model stayed
    assert np.isfinite(decode(runner.store.get(runner.model_id))["w"]).all()


async def test_versions_refused_round_attempts_times_in_a_row_fail_the_session():
    state, reason, runner = await _fedbuff(SimPool(1), NaNVersions({2, 3}), round_attempts=2)
    assert state == "failed"
    assert "version 2 was refused 2 time(s) in a row (session.round_attempts)" in reason
    assert "NaN or infinity" in reason
    assert [c.round for c in runner.recorder.of(RoundCommitted)] == [1]


def _trained(pool) -> set[str]:
    return {name for name, client in pool.clients.items() if client.tasks_seen}


async def _online(pool, count: int) -> None:
    async def ready():
        return sum(len(c) for c in (await pool.online()).values()) == count
    await async_wait_until(ready, f"{count} clients online")


async def test_async_participants_stay_at_the_planned_count_and_replace_those_gone():
    """20 online, clients_per_round 0.3: 6 train; one leaving is replaced by one, and a
    non-participant leaving changes nothing (each change used to add a fresh sample)."""
    pool = SimPool(2)
    for i in range(20):
        pool.add(f"c{i:02d}", slow(1.0, 0.02))
    await _online(pool, 20)
    watched: list[set[str]] = []  # the clients online in each snapshot the watch planned with
    wait_for_change = pool.wait_for_change

    async def watching(online, timeout_s: float) -> None:
        watched.append({c.client_id for clients in online.values() for c in clients})
        await wait_for_change(online, timeout_s)

    pool.wait_for_change = watching
    store, recorder = MemoryStore(), Recorder()
    settings = session_settings(rounds=100_000, aggregator="fedbuff", buffer_size=3,
                                clients_per_round=0.3, time_budget_s=3.0)
    session = asyncio.ensure_future(run_session(pool, store, settings,
                                                Start(store.put(encode(SEED))),
                                                recorder=recorder))
    try:
        await async_wait_until(lambda: len(_trained(pool)) == 6 and recorder.of(RoundCommitted),
                               "6 clients training and a commit",
                               describe=lambda: sorted(_trained(pool)))
        first = _trained(pool)
        gone, idle = sorted(first)[0], sorted(set(pool.clients) - first)[0]
        for name in (gone, idle):
            pool.remove(name)
            await async_wait_until(lambda name=name: watched and name not in watched[-1],
                                   f"the watch to plan without {name}")
        await async_wait_until(lambda: len(_trained(pool) | {gone}) >= 7,
                               f"a client to replace {gone}",
                               describe=lambda: sorted(_trained(pool)))
        # the rest of the time budget is time for more changes to add more, as they used to
        state, reason, _ = await session
        trained = _trained(pool)
    finally:
        await pool.close()
    assert state == "finished", reason
    assert len(trained | {gone}) == 7 and first - {gone} <= trained


class ConfigureFailsOnce(FedBuff):
    """FedBuff whose second configure fails (the first watch after a client joins)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def configure(self, ctx):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("selection service unavailable")
        return super().configure(ctx)


async def test_the_async_watch_outlives_a_failed_plan_and_still_adds_clients():
    pool = SimPool(1)
    for name in ("a", "b"):
        pool.add(name, slow(1.0, 0.02))
    await _online(pool, 2)
    store, recorder = MemoryStore(), Recorder()
    settings = session_settings(rounds=100_000, aggregator="fedbuff", time_budget_s=2.5)
    session = asyncio.ensure_future(run_session(pool, store, settings,
                                                Start(store.put(encode(SEED))),
                                                recorder=recorder, strategy=ConfigureFailsOnce()))
    try:
        await async_wait_until(lambda: recorder.of(RoundCommitted), "a first commit")
        pool.add("late1", slow(1.0, 0.02))
        await async_wait_until(lambda: any("selection service unavailable" in n.message
                                           for n in recorder.of(Notice)),
                               "the failed plan's notice",
                               describe=lambda: [n.message for n in recorder.of(Notice)])
        pool.add("late2", slow(1.0, 0.02))
        await async_wait_until(lambda: {"late1", "late2"} <= _trained(pool),
                               "late1 and late2 to train", describe=lambda: sorted(_trained(pool)))
        state, reason, _ = await session
    finally:
        await pool.close()
    assert state == "finished", reason
    note = next(n for n in recorder.of(Notice) if "selection service" in n.message)
    assert note.level == "warning" and "no client could be added" in note.message


async def test_metrics_whose_sum_overflows_across_combiners_are_left_out_of_the_commit():
    # Each combiner's sum is finite (1e308), their total is not: a mean of inf would be
    # stored as null, which the rounds schema refuses, and the commit record would be lost.
    from fedray.tracking import checker

    def huge(params, config, client_id, round_):
        return {k: v + 1.0 for k, v in params.items()}, 1, {"loss": 1e308, "acc": 0.5}

    pool = SimPool(2)
    pool.add("a", huge)
    pool.add("b", huge)
    store = MemoryStore()
    state, reason, runner = await _from_seed(pool, store, session_settings(rounds=1))
    assert (state, reason) == ("finished", "")
    [commit] = runner.recorder.of(RoundCommitted)
    assert commit.train_metrics == {"acc": pytest.approx(0.5)}
    checker.check_fields("rounds", {"train_metrics": commit.train_metrics})


async def test_a_halted_session_is_recorded_as_stopped_not_failed_and_stays_resumable():
    """Finding 7 of issue 14: a user's SIGTERM was recorded as "round 5 failed: only 0
    update(s) arrived" and "attempt 1 failed ... running it again"."""
    from fedray.actors.controller.callbacks import Callbacks, SessionStatus, StatusCallback
    from fedray.actors.controller.session_runner import SessionRunner
    from fedray.strategies import make_strategy
    from tests.waiting import async_wait_until

    pool = SimPool(1)
    pool.add("a", slow(1.0, 0.2))
    pool.add("b", slow(1.0, 0.2))
    store = MemoryStore()
    recorder = Recorder()
    status = SessionStatus(session_id="s-halt")
    runner = SessionRunner(federation="sim", session_id="s-halt",
                           settings=session_settings(rounds=50), strategy=make_strategy("fedavg"),
                           pool=pool, store=store,
                           callbacks=Callbacks([recorder, StatusCallback(status, lambda s: None)]))
    pool.runner = runner
    task = asyncio.ensure_future(runner.run(Start(store.put(encode(SEED)))))
    try:
        await async_wait_until(lambda: recorder.of(RoundCommitted), "a first commit")
        await async_wait_until(lambda: len(recorder.of(RoundStarted)) >= 2, "round 2 to start")
        runner.halt("stopped by SIGTERM (fedray pid 1)", task)
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await pool.close()
    stopped = [n for n in recorder.of(Notice) if n.data.get("reason") == "stopped"]
    assert len(stopped) == 1 and "stopped by SIGTERM (fedray pid 1)" in stopped[0].message
    assert "resumes" in stopped[0].message
    assert not recorder.of(RoundFailed)
    assert status.state == "running"  # not failed: `fedray run` resumes it
