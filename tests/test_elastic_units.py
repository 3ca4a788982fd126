"""The elastic tier without Ray: where an added combiner goes (``placement.choose_node``),
how a combiner drains (``CombinerCore.drain``), what the scaler does with the policy's
decisions, when a drain may remove its combiner (``round_over``), and the status line."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from rich.console import Console

from fedray.actors.combiner.core import DRAINED, PLANNING_HOLD_S, CombinerCore
from fedray.actors.controller.callbacks import SessionStatus
from fedray.actors.controller.scaler import Scaler, paused_by, round_over, rules_of
from fedray.actors.controller.tier import TierChange, actor_resources
from fedray.actors.placement import NodeView, choose_node
from fedray.actors.scaling import Action
from fedray.config import CombinersConfig
from fedray.deploy.status import render
from fedray.errors import TierError
from fedray.messages import RoundSpec, TaskKind
from fedray.serialization import encode
from fedray.strategies.fedavg import FedAvg
from tests.waiting import async_wait_until

NODES = (NodeView("a", "10.0.0.1", {"memory": 8e9, "fedray_combiner": 2}),
         NodeView("b", "10.0.0.2", {"memory": 8e9, "fedray_combiner": 1}),
         NodeView("c", "10.0.0.3", {"memory": 8e9}))


@pytest.mark.parametrize(("running", "mode", "need", "want"), [
    ({}, "spread", {}, "a"),  # ties go to the lowest id
    ({"a": 1}, "spread", {}, "b"),  # the node with the fewest combiners
    ({"a": 1, "b": 1}, "spread", {}, "c"),
    ({"a": 1, "b": 1, "c": 1}, "spread", {}, "a"),  # round again
    ({"a": 1}, "pack", {}, "a"),  # the node with the most that still has room
    ({"a": 1}, "spread", {"fedray_combiner": 1}, "b"),  # only nodes that offer it
    ({"a": 1, "b": 1}, "spread", {"fedray_combiner": 1}, "a"),  # a holds two
    ({"a": 2, "b": 1}, "spread", {"fedray_combiner": 1}, None),  # no room anywhere
])
def test_an_added_combiner_goes_where_the_placement_says(running, mode, need, want):
    assert choose_node(NODES, running, mode, need) == want


def test_a_placement_that_is_not_known_is_refused():
    with pytest.raises(ValueError, match="spread, pack"):
        choose_node(NODES, {}, "random", {})


def test_combiner_resources_become_ray_actor_options():
    assert actor_resources({}) == {}
    assert actor_resources({"CPU": 1, "memory": 2e9, "fedray_combiner": 1}) == \
        {"num_cpus": 1, "memory": 2e9, "resources": {"fedray_combiner": 1}}


async def test_a_drained_combiner_finishes_its_share_then_sends_every_client_away():
    core = CombinerCore("c0", CombinersConfig(heartbeat_interval_s=0.05, offline_after_s=5))
    core.start_session("s", FedAvg())
    links = {c: core.connect(c, c) for c in ("a", "b", "c")}
    model = np.frombuffer(encode({"w": np.zeros(2, np.float32)}), np.uint8)
    core.online_info()  # a round is planned over this snapshot
    run = asyncio.ensure_future(core.run_round(
        RoundSpec(session_id="s", round=1, kind=TaskKind.TRAIN, clients=("a", "b"), config={},
                  timeout_s=30), model))
    await async_wait_until(lambda: core.share is not None, "the share to open")
    drain = asyncio.ensure_future(core.drain())
    await async_wait_until(lambda: core.draining, "the drain to begin")
    assert not core.accepts_clients()  # no new client joins a draining combiner
    await asyncio.sleep(0)  # one turn of the loop: the share is still open, nobody moved
    assert not drain.done() and not any(link.moved for link in links.values())
    for client in ("a", "b"):  # the round's clients leave: the share closes
        core.registry.gone(links[client], "test")
    result = await asyncio.wait_for(run, 10)
    assert result.failed == 2
    assert await asyncio.wait_for(drain, 10) == ["c"]  # sent away only after the share
    assert links["c"].moved == DRAINED


async def test_a_drain_waits_out_a_planning_snapshot_whose_round_never_came():
    core = CombinerCore("c0", CombinersConfig())
    link = core.connect("a", "a")
    core.online_info()
    core.snapshot_at -= PLANNING_HOLD_S - 0.2  # the hold ends in 0.2 s
    assert await asyncio.wait_for(core.drain(), 5) == ["a"] and link.moved == DRAINED


class FakePool:
    def __init__(self, loads: dict[str, int]) -> None:
        self.loads = loads
        self.names = list(loads)

    async def call(self, name: str, method: str):
        assert method == "info"
        return {"load": self.loads[name]}


class FakeTier:
    """What the scaler drives: a pool, the draining set, add and drain."""

    def __init__(self, loads: dict[str, int], fail: bool = False) -> None:
        self.pool = FakePool(loads)
        self.draining: dict[str, object] = {}
        self.adding = 0
        self.fail = fail
        self.on_change = lambda change: None
        self.added: list[str] = []

    @property
    def size(self) -> int:
        return len(self.pool.names)

    async def add(self, reason: str) -> TierChange:
        if self.fail:
            raise TierError("no room")
        name = f"combiner-{len(self.pool.loads)}"
        self.pool.loads[name] = 0
        self.pool.names.append(name)
        self.added.append(name)
        change = TierChange("add", name, self.size, reason, 0.0)
        self.on_change(change)
        return change

    def drain(self, name: str, reason: str) -> None:
        self.pool.names.remove(name)
        self.draining[name] = None
        self.on_change(TierChange("drain", name, self.size, reason, 0.0))


def _settings(**kw) -> CombinersConfig:
    return CombinersConfig(**{"count": 1, "min": 1, "max": 3, "clients_per_combiner": 20,
                              "scale_cooldown_s": 30.0, **kw})


async def test_the_scaler_adds_then_cools_down_then_drains_the_least_loaded():
    tier = FakeTier({"combiner-0": 50})
    scaler = Scaler(tier, _settings(), paused=lambda: "")
    decision = await scaler.tick()
    assert decision.action is Action.ADD and tier.added == ["combiner-1", "combiner-2"]
    assert scaler.describe()["size"] == 3
    assert scaler.describe()["last_change"]["combiner"] == "combiner-2"
    tier.pool.loads.update({"combiner-0": 2, "combiner-1": 3, "combiner-2": 1})
    assert (await scaler.tick()).action is Action.HOLD  # the cooldown after the adds
    scaler.last_change_at -= 30
    decision = await scaler.tick()
    assert decision.action is Action.DRAIN and decision.drain == ("combiner-2", "combiner-0")
    assert sorted(tier.draining) == ["combiner-0", "combiner-2"]
    assert scaler.describe()["draining"] == ["combiner-0", "combiner-2"]


async def test_the_scaler_holds_while_paused_or_adding_and_survives_a_failed_add():
    tier = FakeTier({"combiner-0": 50})
    assert await Scaler(tier, _settings(), paused=lambda: "async").tick() is None
    tier.adding = 1
    assert await Scaler(tier, _settings(), paused=lambda: "").tick() is None
    failing = FakeTier({"combiner-0": 50}, fail=True)
    assert (await Scaler(failing, _settings(), paused=lambda: "").tick()).action is Action.ADD
    assert failing.size == 1  # said as an event by the tier; the next tick tries again


def test_a_fixed_count_is_min_equals_max():
    rules = rules_of(CombinersConfig(count=2))
    assert (rules.min, rules.max) == (2, 2)


def test_only_an_asynchronous_session_pauses_the_tier():
    assert paused_by(None) == ""
    assert paused_by(SessionStatus("s", state="running", mode="sync")) == ""
    assert paused_by(SessionStatus("s", state="running", mode="async"))
    assert paused_by(SessionStatus("s", state="finished", mode="async")) == ""


async def test_round_over_returns_when_the_round_in_flight_ends():
    status = SessionStatus("s", state="running", round=3, round_state="running")
    changed = asyncio.Condition()
    waiter = asyncio.ensure_future(round_over(lambda: status, changed, 10.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    status.round_state = "finished"
    async with changed:
        changed.notify_all()
    await asyncio.wait_for(waiter, 5)
    status.round_state = ""  # no round in flight: at once
    await asyncio.wait_for(round_over(lambda: status, changed, 10.0), 1)


def test_status_shows_the_tier_and_its_last_change():
    out = io.StringIO()
    render({"federation": "f", "namespace": "fedray-f", "ray_address": "x", "gateway": "g:1",
            "combiners": [], "session": None,
            "tier": {"size": 2, "min": 1, "max": 3, "clients_per_combiner": 20,
                     "draining": ["combiner-2"], "adding": 0, "decision": "",
                     "last_change": {"action": "drain", "combiner": "combiner-2", "size": 2,
                                     "reason": "10 clients fit 1 x 10", "at": 0.0,
                                     "node_ip": "", "moved": 0}}},
           Console(file=out, width=200))
    text = out.getvalue()
    assert "tier     2 combiner(s) (min 1, max 3, 20 clients each); draining combiner-2" in text
    assert "drain combiner-2" in text and "10 clients fit 1 x 10" in text
