"""Where an interrupted session continues, read off its tracking documents.

A pure decision over the ``sessions`` and ``rounds`` documents (fedray.tracking.schema):
the controller resumes a session Ray restarted it in the middle of, and ``continue_from``
and ``fedray models`` start from a session's last committed model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedray.states import RoundState
from fedray.tracking.schema import ROUNDS, SESSIONS


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
