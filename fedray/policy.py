"""Runtime policies: pure decisions over frozen snapshots; the actors carry them out.

Whether a round may commit, which combiner a client joins, where a session resumes.
(A round's own decisions, who is asked and when a share closes, are the strategy's:
``fedray.strategies`` and ``fedray.selection``.) Nothing here does I/O or knows about
Ray or gRPC, so every rule is unit-tested directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedray.states import RoundState
from fedray.tracking.schema import ROUNDS, SESSIONS


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
    """The last committed round decides; a round is committed once its document says so
    (``sessions`` and ``rounds`` documents, fedray.tracking.schema)."""
    committed = [r for r in rounds
                 if r.get(ROUNDS.status) == RoundState.FINISHED and r.get(ROUNDS.model_id)]
    if committed:
        last = max(committed, key=lambda r: int(r[ROUNDS.round]))  # type: ignore[arg-type]
        return ResumePoint(int(last[ROUNDS.round]),  # type: ignore[arg-type]
                           str(last[ROUNDS.model_id]),
                           str(last.get(ROUNDS.aggregator_state_id) or ""))
    return ResumePoint(0, str(session.get(SESSIONS.seed_model_id)
                              or session.get(SESSIONS.model_id) or ""))
