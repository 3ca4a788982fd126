"""Round policies: pure decisions over frozen snapshots; the actors carry them out.

Nothing here does I/O or knows about Ray or gRPC, so every rule is unit-tested directly.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class CloseReason(enum.StrEnum):
    WAITING = "waiting"
    ALL_ANSWERED = "all_answered"  # every selected client answered or is gone
    DEADLINE = "deadline"


@dataclass(frozen=True, slots=True)
class RoundSnapshot:
    """What a combiner knows about its share of a round at one instant."""

    selected: int
    updates: int  # accepted and folded
    settled: int  # answered in any way: accepted, rejected, failed or gone offline
    now: float
    deadline: float


def closing_decision(s: RoundSnapshot) -> CloseReason:
    if s.settled >= s.selected:
        return CloseReason.ALL_ANSWERED
    if s.now >= s.deadline:
        return CloseReason.DEADLINE
    return CloseReason.WAITING


def clients_wanted(clients_per_round: float, online: int, min_clients: int) -> int:
    """How many clients to ask this round: a fraction of those online, or a fixed count."""
    if clients_per_round <= 1.0:
        wanted = math.ceil(clients_per_round * online)
    else:
        wanted = int(clients_per_round)
    return min(online, max(wanted, min_clients))


def select_clients(online: Mapping[str, Sequence[str]], wanted: int,
                   seed: int) -> dict[str, list[str]]:
    """Pick ``wanted`` clients uniformly across combiners; deterministic for a seed."""
    pool = sorted((client, combiner) for combiner, clients in online.items() for client in clients)
    chosen = random.Random(seed).sample(pool, min(wanted, len(pool)))
    plan: dict[str, list[str]] = {combiner: [] for combiner in online}
    for client, combiner in sorted(chosen):
        plan[combiner].append(client)
    return plan


@dataclass(frozen=True, slots=True)
class RoundVerdict:
    ok: bool
    reason: str = ""


def round_verdict(updates: int, min_clients: int, lost_combiners: Sequence[str]) -> RoundVerdict:
    """Whether a round's reduced updates are enough to commit a new model."""
    if updates >= min_clients:
        return RoundVerdict(True)
    lost = f"; combiners lost: {', '.join(lost_combiners)}" if lost_combiners else ""
    return RoundVerdict(False, f"only {updates} update(s) arrived, session.min_clients is "
                               f"{min_clients}{lost}")


def pick_combiner(loads: Mapping[str, int], capacity: int, avoid: str = "") -> str | None:
    """Gateway balancing: the least-loaded combiner with room, avoiding the one named."""
    candidates = [(load, name) for name, load in loads.items() if load < capacity]
    preferred = [c for c in candidates if c[1] != avoid] or candidates
    return min(preferred)[1] if preferred else None


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where an interrupted session continues: after ``rounds_done``, from ``model_id``."""

    rounds_done: int
    model_id: str
    aggregator_state_id: str = ""  # server-side optimizer state saved with that round


def resume_point(session: Mapping[str, object],
                 rounds: Sequence[Mapping[str, object]]) -> ResumePoint:
    """The last committed round decides; a round is committed once its document says so."""
    committed = [r for r in rounds if r.get("status") == "finished" and r.get("model_id")]
    if committed:
        last = max(committed, key=lambda r: int(r["round"]))  # type: ignore[arg-type]
        return ResumePoint(int(last["round"]), str(last["model_id"]),  # type: ignore[arg-type]
                           str(last.get("aggregator_state_id") or ""))
    return ResumePoint(0, str(session.get("seed_model_id") or session.get("model_id") or ""))
