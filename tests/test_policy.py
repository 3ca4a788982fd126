"""Round policies: closing, selection, verdicts and gateway balancing, without Ray."""

import pytest

from fedray.actors.controller.policy import pick_combiner, round_verdict
from fedray.strategies.selection import clients_wanted
from fedray.strategies.snapshots import CloseReason, ShareSnapshot, default_closing


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


def test_gateway_picks_least_loaded_with_room_and_avoids_the_previous_one():
    assert pick_combiner({"a": 3, "b": 1}, capacity=10) == "b"
    assert pick_combiner({"a": 3, "b": 1}, capacity=10, avoid="b") == "a"
    assert pick_combiner({"a": 10, "b": 10}, capacity=10) is None
    assert pick_combiner({"a": 1}, capacity=10, avoid="a") == "a"
