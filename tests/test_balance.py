"""Even load: the pure policy (``fedray.actors.balance``), the gateway's counting, the
combiner's choice of who moves, and the rebalancer's bounds, all without Ray or gRPC."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest

from fedray.actors.balance import (
    ClientView,
    CombinerLoad,
    Move,
    Pending,
    expected_loads,
    movable_ids,
    plan_moves,
    spread,
)
from fedray.actors.combiner.core import PLANNING_HOLD_S, CombinerCore
from fedray.actors.controller.gateway import GatewayServicer
from fedray.actors.controller.rebalancer import Rebalancer
from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.config import CombinersConfig
from fedray.messages import RoundSpec, TaskKind
from fedray.serialization import encode
from fedray.strategies.fedavg import FedAvg
from tests.waiting import async_wait_until


@pytest.mark.parametrize(("counts", "movable", "budget", "want"), [
    ({"a": 10, "b": 10}, {"a": 10, "b": 10}, 50, ()),  # even already
    ({"a": 11, "b": 10}, {"a": 11, "b": 10}, 50, ()),  # within one: as even as it gets
    ({"a": 20, "b": 0}, {"a": 20, "b": 0}, 50, (Move("a", "b", 10),)),
    ({"a": 21, "b": 0}, {"a": 21, "b": 0}, 50, (Move("a", "b", 10),)),  # 11/10
    ({"a": 20, "b": 0}, {"a": 20, "b": 0}, 3, (Move("a", "b", 3),)),  # the budget bounds it
    ({"a": 20, "b": 0}, {"a": 4, "b": 0}, 50, (Move("a", "b", 4),)),  # only the movable
    ({"a": 20, "b": 0}, {"a": 0, "b": 0}, 50, ()),  # every client busy: nobody moves
    ({"a": 15, "b": 15, "c": 0}, {"a": 15, "b": 15, "c": 0}, 50,
     (Move("a", "c", 5), Move("b", "c", 5))),
    ({"a": 10, "b": 0}, {"a": 10, "b": 0}, 0, ()),
])
def test_moves_bring_the_spread_within_one_and_never_past_the_budget(counts, movable,
                                                                     budget, want):
    assert plan_moves(counts, movable, capacity=100, budget=budget) == want


def test_a_plan_never_moves_a_client_back_and_a_wider_tolerance_moves_less():
    after = {"a": 20, "b": 0}
    for move in plan_moves(after, after, capacity=100, budget=100):
        after = {**after, move.source: after[move.source] - move.count,
                 move.target: after[move.target] + move.count}
    assert after == {"a": 10, "b": 10}
    assert plan_moves(after, after, capacity=100, budget=100) == ()  # stable: no ping-pong
    assert plan_moves({"a": 13, "b": 7}, {"a": 13, "b": 7}, capacity=100, budget=100,
                      tolerance=3) == (Move("a", "b", 2),)  # 11/9: within 3


def test_a_full_combiner_takes_no_moved_client():
    assert plan_moves({"a": 20, "b": 5}, {"a": 20, "b": 5}, capacity=5, budget=10) == ()


@pytest.mark.parametrize(("loads", "pending", "want"), [
    # joined before its combiner answered: counted by the combiner, not again
    ({"a": CombinerLoad(1, "", joined=frozenset({"x"})), "b": CombinerLoad(0, "")},
     {"x": Pending("a", 9.0)}, {"a": 1, "b": 0}),
    # assigned, not joined yet: counted on top
    ({"a": CombinerLoad(0, ""), "b": CombinerLoad(0, "")},
     {"x": Pending("a", 9.0), "y": Pending("b", 9.0), "z": Pending("b", 9.0)},
     {"a": 1, "b": 2}),
    # an assignment too old to still come, or to a combiner that does not answer: nothing
    ({"a": CombinerLoad(0, "")}, {"x": Pending("a", 1.0), "y": Pending("b", 9.0)}, {"a": 0}),
])
def test_expected_loads_count_each_assigned_client_once(loads, pending, want):
    assert expected_loads(loads, pending, now=10.0, window_s=5.0) == want


def test_movers_are_idle_settled_clients_the_youngest_first():
    views = [ClientView("old", 0.0, False), ClientView("busy", 1.0, True),
             ClientView("young", 5.0, False), ClientView("new", 9.5, False)]
    assert movable_ids(views, now=10.0, settle_s=2.0) == ["young", "old"]
    assert spread({"a": 3, "b": 1}) == 2 and spread({}) == 0


class Pool:
    """Two combiners as the gateway and rebalancer see them (what ``balance`` answers)."""

    names = ["c0", "c1"]

    def __init__(self, loads: dict[str, CombinerLoad]) -> None:
        self.answer, self.released = loads, []

    async def balance(self, recent_s, settle_s):
        return self.answer

    async def release(self, combiner, count, settle_s):
        ids = [f"{combiner}-m{i}" for i in range(count)]
        self.released.append((combiner, count))
        return ids


def _assign(gateway, name, previous=""):
    return gateway.Assign(pb.AssignRequest(name=name, previous_combiner=previous), None)


async def test_clients_that_start_together_spread_within_one_across_refreshed_loads():
    """The gateway counted the last 5 s of assignments on top of loads that already held
    some of them: a combiner whose clients joined faster looked fuller than it was."""
    pool = Pool({"c0": CombinerLoad(0, "a0"), "c1": CombinerLoad(0, "a1")})
    gateway = GatewayServicer(pool, max_clients=1000)
    first = [(await _assign(gateway, f"n{i}")).combiner for i in range(30)]
    assert Counter(first) == {"c0": 15, "c1": 15}
    # c0's clients all joined, c1's not yet; the loads are asked again
    joined = frozenset(f"n{i}" for i, c in enumerate(first) if c == "c0")
    pool.answer = {"c0": CombinerLoad(15, "a0", joined=joined), "c1": CombinerLoad(0, "a1")}
    gateway.LOADS_S = 0.0
    more = [(await _assign(gateway, f"m{i}")).combiner for i in range(11)]
    assert sorted(Counter(first + more).values()) == [20, 21]


async def test_a_moved_client_is_sent_where_the_move_planned_it():
    pool = Pool({"c0": CombinerLoad(20, "a0", movable=20), "c1": CombinerLoad(0, "a1")})
    gateway = GatewayServicer(pool, max_clients=1000)
    rebalancer = Rebalancer(pool, gateway, CombinersConfig(rebalance_max_moves_per_s=4))
    rebalancer._tokens = 4.0
    assert await rebalancer.tick() == 4  # the budget: 4 a second
    assert pool.released == [("c0", 4)]
    assert await rebalancer.tick() == 0  # spent: the next second's moves come next second
    # a moved client asks again naming c0 as its previous combiner: it goes to c1, and so
    # does c0-m1 even if c1 looks fuller than c0 by then
    assert (await _assign(gateway, "c0-m0", previous="c0")).combiner == "c1"
    pool.answer = {"c0": CombinerLoad(0, "a0"), "c1": CombinerLoad(40, "a1")}
    gateway.LOADS_S = 0.0
    assert (await _assign(gateway, "c0-m1")).combiner == "c1"
    assert (await _assign(gateway, "someone")).combiner == "c0"  # no reservation: least loaded


async def test_no_rebalancing_when_it_is_off_or_within_tolerance():
    pool = Pool({"c0": CombinerLoad(11, "a0", movable=11), "c1": CombinerLoad(10, "a1")})
    rebalancer = Rebalancer(pool, GatewayServicer(pool, 100), CombinersConfig())
    rebalancer._tokens = 20.0
    assert await rebalancer.tick() == 0 and pool.released == []
    off = Rebalancer(pool, GatewayServicer(pool, 100),
                     CombinersConfig(rebalance_max_moves_per_s=0))
    await asyncio.wait_for(off.run(), 1)  # returns at once: it never ticks


def _core() -> CombinerCore:
    core = CombinerCore("c0", CombinersConfig(heartbeat_interval_s=0.05, offline_after_s=0.2))
    core.start_session("s", FedAvg())
    return core


async def test_a_combiner_releases_only_idle_settled_clients_and_never_while_planning():
    core = _core()
    links = {c: core.connect(c, c) for c in ("a", "b", "c", "d")}
    for link in links.values():
        link.joined_at -= 60  # long settled
    model = np.frombuffer(encode({"w": np.zeros(2, np.float32)}), np.uint8)
    core.online_info()  # a round is planned over this snapshot
    assert core.balance_info(5.0, 1.0)["movable"] == 0
    assert core.release(4, settle_s=1.0) == []  # held while its tasks may be on their way
    run = asyncio.ensure_future(core.run_round(
        RoundSpec(session_id="s", round=1, kind=TaskKind.TRAIN, clients=("a", "b"), config={},
                  timeout_s=30), model))
    await async_wait_until(lambda: core.share is not None, "the share to open")  # a, b: tasks
    assert core.balance_info(5.0, 1.0)["movable"] == 2  # the planned round's share is open
    released = core.release(4, settle_s=1.0)
    assert sorted(released) == ["c", "d"]  # a and b train on
    assert all(links[c].moved for c in released) and not links["a"].moved
    assert core.share is not None and not core.share.closed.is_set()
    fresh = core.connect("e", "e")
    assert core.release(4, settle_s=1.0) == []  # e just came: it stays put
    assert fresh.moved == ""
    fresh.joined_at -= 60
    core.online_info()  # the next plan: held again, until PLANNING_HOLD_S passed
    assert core.release(4, settle_s=1.0) == []
    core.snapshot_at -= PLANNING_HOLD_S
    assert core.release(4, settle_s=1.0) == ["e"]
    run.cancel()
