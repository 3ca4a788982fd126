"""Runtime policies: pure decisions over frozen snapshots; the actors carry them out.

Whether a round may commit, how many clients a round that keeps its updates may ask, and
which combiner a client joins. (Where a session resumes
is read off its tracking documents: ``fedray.tracking.resume``.)
(A round's own decisions, who is asked and when a share closes, are the strategy's:
``fedray.strategies`` and ``fedray.strategies.selection``.) Nothing here does I/O or knows about
Ray or gRPC, so every rule is unit-tested directly.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedray.strategies.snapshots import RoundPlan


@dataclass(frozen=True, slots=True)
class RoundVerdict:
    ok: bool
    reason: str = ""


def round_verdict(updates: int, min_clients: int, lost_combiners: Sequence[str],
                  rule: str = "") -> RoundVerdict:
    """Whether a round's reduced updates are enough to commit a new model; ``rule`` says
    where ``min_clients`` comes from (by default: the setting)."""
    if updates >= min_clients:
        return RoundVerdict(True)
    lost = f"; combiners lost: {', '.join(lost_combiners)}" if lost_combiners else ""
    rule = rule or f"session.min_clients is {min_clients}"
    return RoundVerdict(False, f"only {updates} update(s) arrived, {rule}{lost}")


def kept_within(plan: RoundPlan, most: int, seed: int) -> RoundPlan:
    """A round whose updates are all kept (in the object store) keeps at most ``most``:
    ``plan`` itself if it does (``min(asked, buffer)``), else the same plan asking
    ``most`` of its clients, sampled uniformly and reproducibly from ``seed``."""
    kept = min(plan.asked, plan.buffer) if plan.buffer else plan.asked
    if kept <= most:
        return plan
    asked = sorted(i for ids in plan.clients.values() for i in ids)
    return plan.only(set(random.Random(f"kept:{seed}").sample(asked, most)))


def pick_combiner(loads: Mapping[str, int], capacity: int, avoid: str = "") -> str | None:
    """Gateway balancing: the least-loaded combiner with room, avoiding the one named."""
    candidates = [(load, name) for name, load in loads.items() if load < capacity]
    preferred = [c for c in candidates if c[1] != avoid] or candidates
    return min(preferred)[1] if preferred else None
