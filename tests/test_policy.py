"""Round policies: closing, selection, verdicts and gateway balancing, without Ray."""

import pytest

from fedray.actors.controller.policy import kept_within, pick_combiner, round_verdict
from fedray.strategies.selection import clients_wanted
from fedray.strategies.snapshots import CloseReason, RoundPlan, ShareSnapshot, default_closing


@pytest.mark.parametrize(("selected", "accepted", "settled", "buffer", "now", "expected"), [
    (3, 3, 3, 0, 0.0, CloseReason.ALL_ANSWERED),
    (3, 2, 2, 0, 0.0, CloseReason.WAITING),
    (3, 2, 2, 0, 10.0, CloseReason.DEADLINE),
    (0, 0, 0, 0, 0.0, CloseReason.ALL_ANSWERED),
    (5, 3, 4, 3, 0.0, CloseReason.BUFFER_FULL),
    (5, 2, 4, 3, 0.0, CloseReason.WAITING),  # 2 accepted, 2 rejected: the buffer waits
    (5, 2, 5, 3, 0.0, CloseReason.ALL_ANSWERED),
])
def test_closing_decision(selected, accepted, settled, buffer, now, expected):
    snap = ShareSnapshot(selected=selected, accepted=accepted, settled=settled, buffer=buffer,
                         now=now, deadline=5.0)
    assert default_closing(snap) is expected


@pytest.mark.parametrize(("per_round", "online", "minimum", "expected"), [
    (1.0, 10, 2, 10), (0.5, 10, 2, 5), (0.1, 10, 2, 2), (3, 10, 2, 3), (20, 10, 2, 10),
    (0.5, 1, 2, 1),
])
def test_clients_wanted(per_round, online, minimum, expected):
    assert clients_wanted(per_round, online, minimum) == expected


def test_verdict_names_the_shortfall_and_lost_combiners():
    assert round_verdict(2, 2, []).ok
    verdict = round_verdict(1, 2, ["combiner-1"])
    assert not verdict.ok and "min_clients is 2" in verdict.reason and "combiner-1" in verdict.reason


def test_verdict_says_where_the_bound_comes_from_when_told():
    verdict = round_verdict(3, 5, [], "'krum' needs 5 per round (session.min_clients is 2)")
    assert verdict.reason == ("only 3 update(s) arrived, 'krum' needs 5 per round "
                              "(session.min_clients is 2)")


def _plan(a: int, b: int, buffer: int = 0) -> RoundPlan:
    ids = [f"c{i:02d}" for i in range(a + b)]
    return RoundPlan(clients={"combiner-0": tuple(ids[:a]), "combiner-1": tuple(ids[a:])},
                     config={"lr": 0.1}, buffer=buffer,
                     payloads={i: i.encode() for i in ids})


@pytest.mark.parametrize(("a", "b", "buffer", "most", "asked"), [
    (3, 2, 0, 5, 5),    # within the bound: the plan itself
    (3, 2, 0, 9, 5),
    (6, 4, 0, 4, 4),    # 10 planned, 4 kept at most: 4 asked
    (6, 4, 0, 1, 1),
    (6, 4, 3, 4, 10),   # the buffer keeps only the first 3: within the bound, nobody dropped
    (6, 4, 8, 4, 4),    # a buffer above the bound: sampled like no buffer
])
def test_a_round_that_keeps_its_updates_asks_at_most_the_bound(a, b, buffer, most, asked):
    plan = _plan(a, b, buffer)
    bounded = kept_within(plan, most, seed=7)
    assert bounded.asked == asked
    if asked == plan.asked:
        assert bounded is plan
        return
    kept = {i for ids in bounded.clients.values() for i in ids}
    planned = {i for ids in plan.clients.values() for i in ids}
    assert kept < planned
    for combiner, ids in bounded.clients.items():  # each stays at its combiner, in order
        assert set(ids) <= set(plan.clients[combiner])
        assert list(ids) == [i for i in plan.clients[combiner] if i in kept]
    assert set(bounded.payloads) == kept and (bounded.config, bounded.buffer) == (
        plan.config, plan.buffer)


def test_the_sample_under_the_bound_is_seeded_and_spread():
    plan = _plan(30, 30)

    def sample(seed: int) -> frozenset[str]:
        return frozenset(i for ids in kept_within(plan, 10, seed).clients.values() for i in ids)

    assert sample(1) == sample(1)
    samples = {sample(seed) for seed in range(20)}
    assert len(samples) == 20  # another round (or attempt) asks others
    assert not frozenset.intersection(*samples)  # nobody is asked every time
    assert len(frozenset.union(*samples)) > 45  # and nearly everyone gets a turn


def test_gateway_picks_least_loaded_with_room_and_avoids_the_previous_one():
    assert pick_combiner({"a": 3, "b": 1}, capacity=10) == "b"
    assert pick_combiner({"a": 3, "b": 1}, capacity=10, avoid="b") == "a"
    assert pick_combiner({"a": 10, "b": 10}, capacity=10) is None
    assert pick_combiner({"a": 1}, capacity=10, avoid="a") == "a"
