"""Even load across combiners: pure decisions over a frozen snapshot of their loads.

Two questions, both answered here without I/O (the gateway and the rebalancer act):

- ``expected_loads``: how many clients each combiner will have once the clients the
  gateway just assigned have joined. A combiner's own count is exact for who joined
  before it answered; an assignment counts on top only while its client has not shown up
  there (so a burst of clients starting together is neither double-counted nor missed).
- ``plan_moves``: which combiners hand how many clients to which, so that the spread
  (most loaded minus least loaded) comes back within ``tolerance``, at most ``budget``
  moves at a time, only clients the combiner says may move (not holding a running task,
  not just arrived). Each move strictly narrows the spread, so plans never oscillate.

Which clients move is the combiner's to pick among its movable ones (``movable_ids``),
over its own frozen view of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CombinerLoad:
    """One combiner's answer: who is online, and how many of them may move now."""

    clients: int
    address: str
    movable: int = 0
    joined: frozenset[str] = frozenset()  # ids that joined within the gateway's window


@dataclass(frozen=True, slots=True)
class Pending:
    """An assignment the gateway made (or a move it expects) that may not show yet."""

    combiner: str
    at: float  # monotonic seconds


@dataclass(frozen=True, slots=True)
class Move:
    source: str
    target: str
    count: int


@dataclass(frozen=True, slots=True)
class ClientView:
    """What a combiner knows of one client when it picks who moves."""

    client_id: str
    joined_at: float  # monotonic seconds
    busy: bool  # holds a task of the open share that has not been answered


def expected_loads(loads: Mapping[str, CombinerLoad], pending: Mapping[str, Pending],
                   now: float, window_s: float) -> dict[str, int]:
    """Each live combiner's clients plus the recent assignments to it that have not
    joined it yet (an assignment older than ``window_s`` never will)."""
    counts = {name: load.clients for name, load in loads.items()}
    for client_id, p in pending.items():
        load = loads.get(p.combiner)
        if load is not None and now - p.at < window_s and client_id not in load.joined:
            counts[p.combiner] += 1
    return counts


def spread(counts: Mapping[str, int]) -> int:
    return max(counts.values()) - min(counts.values()) if counts else 0


def plan_moves(counts: Mapping[str, int], movable: Mapping[str, int], capacity: int,
               budget: int, tolerance: int = 1) -> tuple[Move, ...]:
    """Moves (most loaded to least loaded, one client at a time) until the spread is
    within ``tolerance`` (at least 1: a spread of 1 is as even as whole clients get), the
    ``budget`` is spent, or no donor has a movable client left. A target must have room
    under ``capacity``; a donor keeps at least what the target then has."""
    tolerance = max(1, tolerance)
    load, left = dict(counts), {n: min(movable.get(n, 0), c) for n, c in counts.items()}
    moved: dict[tuple[str, str], int] = {}
    for _ in range(max(0, budget)):
        targets = [n for n in load if load[n] < capacity]
        donors = [n for n in load if left[n] > 0]
        if not targets or not donors:
            break
        target = min(targets, key=lambda n: (load[n], n))
        source = max(donors, key=lambda n: (load[n], n))
        if load[source] - load[target] <= tolerance or source == target:
            break
        load[source] -= 1
        left[source] -= 1
        load[target] += 1
        moved[(source, target)] = moved.get((source, target), 0) + 1
    return tuple(Move(s, t, c) for (s, t), c in sorted(moved.items()))


def movable_ids(clients: Sequence[ClientView], now: float, settle_s: float) -> list[str]:
    """The clients that may move, the most recently joined first (the least settled:
    their caches and connections are the youngest). Busy ones and ones that joined within
    ``settle_s`` (a client just moved here, or just back) never move."""
    free = [c for c in clients if not c.busy and now - c.joined_at >= settle_s]
    return [c.client_id for c in sorted(free, key=lambda c: (-c.joined_at, c.client_id))]
