"""Where an interrupted session continues, read off its tracking documents.

A pure decision over the ``sessions`` and ``rounds`` documents (fedray.tracking.schema):
the controller resumes a session Ray restarted it in the middle of, and ``continue_from``
and ``fedray models`` start from a session's last committed model.

Tracking is not trusted to say what to train from: whoever can write it (the embedded
server has no authentication) could point a resumed session at a model of their own. So
the controller signs what it commits (``commit_mac``: HMAC-SHA256 under the federation's
token secret over the session, the round, the model and the state it committed, and
``seed_mac`` over a new session's seed), and given the secret ``resume_point`` counts
only what verifies: the last signed commit, else the signed seed, else nothing
(``ResumePoint.trusted`` is False, and the controller does not resume).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedray.states import RoundState
from fedray.tracking.schema import ROUNDS, SESSIONS


def commit_mac(secret: bytes, session_id: str, round_: int, model_id: str,
               state_id: str = "") -> str:
    """What binds a committed round's model and strategy state to its session and round."""
    text = f"fedray-commit\0{session_id}\0{round_}\0{model_id}\0{state_id}"
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def _signed(secret: bytes | None, mac: object, expected: str) -> bool:
    return secret is None or (isinstance(mac, str) and hmac.compare_digest(mac, expected))


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where an interrupted session continues: after ``rounds_done``, from ``model_id``."""

    rounds_done: int
    model_id: str
    aggregator_state_id: str = ""  # server-side optimizer state saved with that round
    trusted: bool = True  # False: nothing there verifies under the secret given
    unverified: int = 0  # committed rounds passed over because they did not verify


def resume_point(session: Mapping[str, object], rounds: Sequence[Mapping[str, object]],
                 secret: bytes | None = None) -> ResumePoint:
    """The last committed round decides; a round is committed once its document says so
    (``sessions`` and ``rounds`` documents, fedray.tracking.schema). With ``secret``,
    only a round (or a seed) whose signature verifies counts (see the module)."""
    session_id = str(session.get(SESSIONS.session_id) or "")
    committed = [r for r in rounds
                 if r.get(ROUNDS.status) == RoundState.FINISHED and r.get(ROUNDS.model_id)]
    signed = [r for r in committed if secret is None or _signed(
        secret, r.get(ROUNDS.commit_mac),
        commit_mac(secret, session_id, int(r[ROUNDS.round]),  # type: ignore[arg-type]
                   str(r[ROUNDS.model_id]), str(r.get(ROUNDS.aggregator_state_id) or "")))]
    unverified = len(committed) - len(signed)
    if signed:
        last = max(signed, key=lambda r: int(r[ROUNDS.round]))  # type: ignore[arg-type]
        return ResumePoint(int(last[ROUNDS.round]),  # type: ignore[arg-type]
                           str(last[ROUNDS.model_id]),
                           str(last.get(ROUNDS.aggregator_state_id) or ""),
                           unverified=unverified)
    seed = str(session.get(SESSIONS.seed_model_id) or session.get(SESSIONS.model_id) or "")
    trusted = secret is None or _signed(secret, session.get(SESSIONS.seed_mac),
                                        commit_mac(secret, session_id, 0, seed))
    return ResumePoint(0, seed, trusted=trusted, unverified=unverified)
