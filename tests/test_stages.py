"""The contract's declared stages: what a declaration may say, and rounds that run stages
of a strategy's own (in-process combiners, tests/simfed.py, which run the strategy's
client half as the edge does)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from examples.custom_stage.power_of_choice import PowerOfChoice
from fedray.actors.controller.callbacks import RoundFailed, RoundStarted
from fedray.errors import ConfigError
from fedray.messages import TaskKind
from fedray.serialization import decode
from fedray.strategies import (
    TRAIN,
    VALIDATE,
    Asynchronous,
    ClientInfo,
    CloseRule,
    Declaration,
    Reply,
    RoundContext,
    RoundPlan,
    RoundState,
    Stage,
    When,
    make_strategy,
)
from fedray.strategies.fedavg import FedAvg
from tests.simfed import MemoryStore, SimPool, session_settings
from tests.stage_strategies import AUDIT, SURVEY, AuditAvg, SurveyAvg
from tests.test_session_runner import SEED, _from_seed, shift_by

# ------------------------------------------------------------------ declarations (pure)


def test_the_default_declaration_is_train_then_validate_on_the_global_layout():
    declared = FedAvg().declare()
    assert [s.name for s in declared.stages] == ["train", "validate"]
    assert declared.train.close is CloseRule.FIRST_K and declared.train.when is When.ROUND
    assert declared.after_commit == (VALIDATE,) and VALIDATE.close is CloseRule.ALL
    assert not declared.keeps_updates and declared.asynchronous is None
    assert declared.layout.expected({"w": ("F32", (2, 3))}) == {"w": ("F32", (2, 3))}


@pytest.mark.parametrize(("stages", "why"), [
    ((VALIDATE,), "exactly one train stage"),
    ((TRAIN, TRAIN), "unique"),
    ((VALIDATE, TRAIN), "after every stage before it"),
    ((SURVEY, TRAIN), "answered by a client half"),
])
def test_a_declaration_that_cannot_run_is_refused(stages, why):
    with pytest.raises(ValueError, match=why):
        Declaration(stages=stages)


@pytest.mark.parametrize("min_updates", [0, -1, 2.5, True])
def test_min_updates_is_a_whole_number_of_at_least_one(min_updates):
    with pytest.raises(ValueError, match="min_updates must be a whole number >= 1"):
        Declaration(min_updates=min_updates)
    assert Declaration().min_updates == 1 and Declaration(min_updates=7).min_updates == 7


def test_an_asynchronous_strategy_has_no_stage_before_train():
    with pytest.raises(ValueError, match="asynchronous"):
        Declaration(stages=(Stage(TaskKind.VALIDATE, name="probe"), TRAIN),
                    asynchronous=Asynchronous(3))
    assert make_strategy("fedbuff").declare().asynchronous == Asynchronous(10)


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"kind": TaskKind.TRAIN, "when": When.COMMITTED}, "before the commit"),
    ({"kind": TaskKind.STAGE, "name": "Bad Name"}, "lowercase"),
    ({"kind": TaskKind.STAGE, "name": "x", "deadline_s": 0}, "deadline_s"),
    ({"kind": TaskKind.STAGE, "name": "x", "max_reply_bytes": 2 << 20}, "max_reply_bytes"),
])
def test_a_stage_that_cannot_run_is_refused(kwargs, why):
    with pytest.raises(ValueError, match=why):
        Stage(**kwargs)


def test_a_strategy_whose_declaration_does_not_hold_is_a_config_error():
    with pytest.raises(ConfigError, match="declares what cannot run"):
        make_strategy("tests.test_stages:BrokenDeclaration")


class BrokenDeclaration(FedAvg):
    def declare(self) -> Declaration:
        return Declaration(stages=(TRAIN, TRAIN))


def _state(replies: dict[str, dict[str, Reply]] | None = None) -> RoundState:
    online = tuple(ClientInfo(c, "c0") for c in "abcd")
    ctx = RoundContext("s", 1, 1, online, session_settings(clients_per_round=2), seed=7)
    return RoundState(ctx, RoundPlan(clients={"c0": ("a", "b", "c")}, config={"lr": 1}),
                      replies or {})


def test_later_stages_ask_only_the_clients_that_answered_the_earlier_ones():
    state = _state({"survey": {"a": Reply("a"), "c": Reply("c")}})
    plan = FedAvg().plan_stage(TRAIN, state)
    assert plan.clients == {"c0": ("a", "c")} and plan.config == {"lr": 1}
    validate = FedAvg().plan_stage(VALIDATE, state)
    assert validate.clients == {"c0": ("a", "b", "c", "d")} and not validate.config


def test_a_stage_after_train_asks_only_the_clients_whose_updates_were_folded():
    state = _state({"survey": {c: Reply(c) for c in "abc"}})
    assert state.trained is None and state.trained_ids is None
    trained = state.with_trained({"c0": ("c", "a")})
    assert trained.trained == {"c0": ("c", "a")} and trained.trained_ids == {"a", "c"}
    after = FedAvg().plan_stage(Stage(TaskKind.STAGE, name="audit"), trained)
    assert after.clients == {"c0": ("a", "c")}
    assert FedAvg().plan_stage(Stage(TaskKind.STAGE, name="audit"), state.with_trained({})
                               ).clients == {"c0": ()}


def test_power_of_choice_probes_d_candidates_and_trains_the_m_worst_fitted():
    strategy = PowerOfChoice(candidates=2.0)
    state = _state()
    plan = strategy.configure(state.ctx)
    assert plan.asked == 4  # d = 2 x m, m = clients_per_round = 2
    losses = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7}
    probed = {c: Reply(c, 10, {"loss": v}) for c, v in losses.items() if c != "d"}
    state = RoundState(state.ctx, plan, {"probe": probed})
    train = strategy.plan_stage(TRAIN, state)
    assert train.clients == {"c0": ("b", "c")}  # d did not answer the probe


# ------------------------------------------------------------------ rounds with stages


def validates_with_loss(losses: dict[str, float]):
    def validate(params, client_id):
        return 10, {"loss": losses[client_id]}
    return validate


async def test_a_round_runs_its_probe_stage_then_trains_only_the_worst_fitted():
    losses = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7, "e": 0.3, "f": 0.2}
    pool = SimPool(2)
    for i, name in enumerate(losses):
        pool.add(name, shift_by(float(i)), validate=validates_with_loss(losses))
    store = MemoryStore()
    settings = session_settings(rounds=1, clients_per_round=2, min_clients=2,
                                aggregator="examples.custom_stage.power_of_choice:PowerOfChoice",
                                aggregator_kwargs={"candidates": 3.0})
    clients = dict(pool.clients)  # the pool forgets them when it closes
    state, reason, session = await _from_seed(pool, store, settings)
    assert (state, reason) == ("finished", "")
    seen = {name: client.tasks_seen for name, client in clients.items()}
    trained = {n for n, tasks in seen.items() if ("train", 1) in tasks}
    assert trained == {"b", "d"}  # every client was a candidate (d = 6): the two worst
    assert all(tasks[0] == ("probe", 1) for tasks in seen.values())
    shifts = {name: float(i) for i, name in enumerate(losses)}
    final = decode(store.get(session.model_id))
    np.testing.assert_allclose(final["w"], (shifts["b"] + shifts["d"]) / 2, rtol=1e-6)


async def test_a_stage_of_the_strategys_own_is_answered_by_its_client_half():
    pool = SimPool(2)
    for name, value in {"a": 1.0, "b": 3.0, "c": 5.0}.items():
        pool.add(name, shift_by(value))
    store = MemoryStore()
    strategy = SurveyAvg()
    settings = session_settings(rounds=2, min_clients=3, aggregator="tests.stage_strategies:SurveyAvg")
    state, reason, session = await _from_seed(pool, store, settings, strategy=strategy)
    assert (state, reason) == ("finished", "")
    # every client echoed its own nonce, got no model for the survey, and the half saw
    # the survey before the train task of each round
    assert [sorted(r) for r in strategy.surveyed] == [["a", "b", "c"]] * 2
    assert all(not answer["model"] for r in strategy.surveyed for answer in r.values())
    assert strategy.surveyed[1]["a"]["seen"] == ["survey", "train", "survey"]
    # the half added 1 to every update: two rounds of mean(1, 3, 5) + 1
    final = decode(store.get(session.model_id))
    np.testing.assert_allclose(final["w"], 2 * (3.0 + 1.0), rtol=1e-6)


async def test_a_stage_after_train_sees_whose_updates_each_combiner_folded():
    def refuses(params, config, client_id, round_):
        raise RuntimeError("no data today")

    pool = SimPool(2)
    pool.add("a", shift_by(1.0), combiner="combiner-0")
    pool.add("b", shift_by(3.0), combiner="combiner-1")
    pool.add("c", refuses, combiner="combiner-1")
    pool.add("d", shift_by(5.0), combiner="combiner-0")
    store = MemoryStore()
    strategy = AuditAvg()
    settings = session_settings(rounds=1, min_clients=3,
                                aggregator="tests.stage_strategies:AuditAvg")
    clients = dict(pool.clients)
    state, reason, session = await _from_seed(pool, store, settings, strategy=strategy)
    assert (state, reason) == ("finished", "")
    planned, reduced = strategy.seen
    assert {k: sorted(v) for k, v in planned.trained.items()} == {
        "combiner-0": ["a", "d"], "combiner-1": ["b"]}
    # the audit asked only the clients that trained, and they got the same view
    assert sorted(reduced.replies[AUDIT.name]) == ["a", "b", "d"]
    assert json.loads(reduced.replies[AUDIT.name]["b"].payload) == {
        "combiner-0": ["a", "d"], "combiner-1": ["b"]}
    assert ("audit", 1) not in clients["c"].tasks_seen
    np.testing.assert_allclose(decode(store.get(session.model_id))["w"], 3.0, rtol=1e-6)


async def test_a_stage_with_too_few_replies_fails_the_attempt_and_commits_nothing():
    pool = SimPool(1)
    for name in "ab":
        pool.add(name, shift_by(1.0))
    store = MemoryStore()
    settings = session_settings(rounds=1, min_clients=2, round_attempts=1,
                                round_config={"refuse_survey": True},
                                aggregator="tests.stage_strategies:SurveyAvg")
    clients = dict(pool.clients)
    state, reason, session = await _from_seed(pool, store, settings)
    assert state == "failed"
    assert "stage survey: only 0 client(s) answered, 2 needed" in reason
    assert [e.attempt for e in session.recorder.of(RoundStarted)] == [1]
    failed = session.recorder.of(RoundFailed)[0].failures
    assert failed == {c: "RuntimeError: this client does not take surveys" for c in "ab"}
    assert all(("train", 1) not in c.tasks_seen for c in clients.values())
    assert session.model_id == store.put(store.get(session.model_id))  # still the seed's
    assert np.all(decode(store.get(session.model_id))["w"] == SEED["w"])


# ------------------------------------------------------------------ a combiner's stage share


async def test_a_combiner_collects_stage_replies_over_grpc_and_refuses_oversized_ones(bridge):
    """Real gRPC into a real combiner core: each client's task carries its own payload,
    a reply is kept for the controller, one over the stage's max_reply_bytes is refused
    and settles that client, and a reply for another stage is refused as stale."""
    from fedray.bridge.proto import fedray_v1_pb2 as pb
    from tests.bridge import METADATA

    bridge.core.start_session("s1", SurveyAvg())
    tasks = await bridge.open_round(["a", "b", "c"], kind=TaskKind.STAGE, stage="survey",
                                    payloads={"a": b"pa", "b": b"pb"})
    assert {c: (t.kind, t.stage, t.payload) for c, t in tasks.items()} == {
        "a": (pb.TASK_KIND_STAGE, "survey", b"pa"), "b": (pb.TASK_KIND_STAGE, "survey", b"pb"),
        "c": (pb.TASK_KIND_STAGE, "survey", b"")}
    assert tasks["a"].client_half == "tests.stage_strategies:SurveyHalf"

    def reply(client: str, payload: bytes, stage: str = "survey") -> pb.StageReply:
        t = tasks[client]
        return pb.StageReply(client_id=client, task_id=t.task_id, session_id=t.session_id,
                             round=t.round, stage=stage, payload=payload)

    await bridge.stub.PushStageReply(reply("a", b"from a"), metadata=METADATA)
    await bridge.stub.PushStageReply(reply("b", b"x" * 257), metadata=METADATA)  # over 256
    await bridge.stub.PushStageReply(reply("c", b"from c", stage="other"), metadata=METADATA)
    share = bridge.core.share
    assert share.replies == {"a": b"from a"} and share.rejected == {"too_large": 1}
    assert share.settled == {"a", "b"} and not share.closed.is_set()  # c still owes one
    await bridge.stub.PushStageReply(reply("c", b"from c"), metadata=METADATA)
    result = await bridge.round
    assert result.replies == {"a": b"from a", "c": b"from c"}
    assert (result.stage, result.close_reason) == ("survey", "all_answered")


# ------------------------------------------------------------------ the default norm bound


async def test_one_update_at_float32s_largest_values_cannot_make_the_session_unusable():
    """Finding 3 of issue 14: float32 values at float32's maximum with num_examples 1e6
    passed every check, the round committed, and every later honest update was refused
    as non_finite. The default session.max_update_norm_ratio refuses it as ``norm``."""
    huge = np.finfo(np.float32).max

    def attacker(params, config, client_id, round_):
        return {k: np.full_like(v, huge) for k, v in params.items()}, 1_000_000, {}

    pool = SimPool(1)
    pool.add("honest-1", shift_by(1.0))
    pool.add("honest-2", shift_by(3.0))
    bad = pool.add("mallory", attacker)
    clients = dict(pool.clients)
    store = MemoryStore()
    state, reason, session = await _from_seed(pool, store, session_settings(rounds=3))
    assert (state, reason) == ("finished", "")
    final = decode(store.get(session.model_id))
    np.testing.assert_allclose(final["w"], 3 * (1.0 + 3.0) / 2, rtol=1e-6)  # honest only
    assert [r[1] for r in bad.replies] == [False] * 3
    assert all("over session.max_update_norm_ratio 100" in r[2] for r in bad.replies)
    honest = [r for name in ("honest-1", "honest-2") for r in clients[name].replies]
    assert len(honest) == 6 and all(ok for _, ok, _ in honest)


async def test_the_norm_bound_can_be_switched_off_and_the_absolute_one_still_applies():
    pool = SimPool(1)
    pool.add("a", shift_by(1000.0))  # moves w (12 values) by 1000 each: ||d|| ~ 3464
    pool.add("b", shift_by(1000.0))
    store = MemoryStore()
    state, _, _ = await _from_seed(pool, store, session_settings(
        rounds=1, max_update_norm_ratio=None))
    assert state == "finished"  # without the ratio, a large move is the strategy's business
    pool = SimPool(1)
    late = pool.add("a", shift_by(1.0))
    pool.add("b", shift_by(1.0))
    state, reason, _ = await _from_seed(pool, store, session_settings(
        rounds=1, round_attempts=1, max_update_norm=0.5, max_update_norm_ratio=None))
    assert state == "failed" and "over session.max_update_norm (0.5)" in late.replies[0][2]
