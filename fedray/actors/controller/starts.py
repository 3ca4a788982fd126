"""Where a session starts, read off tracking: the unfinished session to resume, or the
session a new one continues from (``session.continue_from``).

The controller asks these in a thread (they are blocking tracking reads); what they
decide is ``tracking.resume``'s (signed commits only).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fedray.actors.controller.session_runner import Start
from fedray.errors import SessionError
from fedray.states import SessionState
from fedray.tracking.resume import resume_point
from fedray.tracking.schema import ROUNDS, SESSIONS
from fedray.tracking.store import TrackingStore

UNFINISHED = [state.value for state in SessionState if not state.terminal]
LATEST = "latest"  # session.continue_from: the last session that committed a round

Warn = Callable[..., None]  # observer.event


def unfinished_session(store: TrackingStore, federation: str, secret: bytes,
                       event: Warn) -> tuple[dict[str, Any], Start] | None:
    """The federation's latest session that did not end, and where to resume it."""
    try:
        docs = store.find("sessions", {SESSIONS.federation: federation,
                                       SESSIONS.status: {"$in": UNFINISHED}},
                          sort=[(SESSIONS.created_at, -1)], limit=1)
        if not docs:
            return None
        session_id = docs[0][SESSIONS.session_id]
        point = resume_point(docs[0], store.find("rounds", {ROUNDS.session_id: session_id}),
                             secret)
    finally:
        store.close()
    if point.unverified:
        event("warning", f"session {session_id}: {point.unverified} committed "
              "round(s) in tracking do not verify under this federation's key "
              "(altered, or not committed by it); a resume passes them over",
              session_id=session_id, reason="unverified_commit")
    if not point.trusted:
        event("warning", f"session {session_id} is not resumed: nothing it "
              "committed, nor its seed, verifies under this federation's key; "
              "a new session starts instead", session_id=session_id,
              reason="unverified_resume")
        return None
    return docs[0], Start(point.model_id, point.rounds_done, point.aggregator_state_id,
                          resume=True)


def continued(store: TrackingStore, federation: str, secret: bytes, session_id: str) -> Start:
    """A new session's start from another session's last committed model and state."""
    try:
        if session_id == LATEST:  # the federation's last session that committed a round
            found = store.find("sessions", {SESSIONS.federation: federation,
                                            SESSIONS.rounds_done: {"$gt": 0}},
                               sort=[(SESSIONS.created_at, -1)], limit=1)
            if not found:
                raise SessionError("session.continue_from latest: no session of this "
                                   "federation has committed a round yet")
        else:
            found = store.find(
                "sessions", {SESSIONS.session_id: {"$regex": "^" + re.escape(session_id)}},
                limit=3)
        if len(found) != 1:
            what = "no session" if not found else "more than one session"
            raise SessionError(f"session.continue_from {session_id!r}: {what} matches")
        doc = found[0]
        point = resume_point(doc, store.find("rounds",
                                             {ROUNDS.session_id: doc[SESSIONS.session_id]}),
                             secret)
    finally:
        store.close()
    if not point.rounds_done:
        signed = " this federation signed" if point.unverified else ""
        raise SessionError(f"session.continue_from {session_id!r}: that session committed "
                           f"no round{signed} yet")
    return Start(point.model_id, 0, point.aggregator_state_id,
                 continued_from=doc[SESSIONS.session_id])
