"""Session and round lifecycles as explicit state machines.

Every transition is checked here and written to tracking by the controller, so a restarted
controller can tell exactly where a session stood.
"""

from __future__ import annotations

import enum

from fedray.errors import SessionError


class SessionState(enum.StrEnum):
    CREATED = "created"
    WAITING = "waiting"  # for enough clients to connect
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"  # by someone (fedray session stop): ended, not resumed

    @property
    def terminal(self) -> bool:
        return self in (SessionState.FINISHED, SessionState.FAILED, SessionState.STOPPED)


class RoundState(enum.StrEnum):
    RUNNING = "running"  # tasks out, combiners collecting
    REDUCING = "reducing"  # partials in, controller reducing and committing
    VALIDATING = "validating"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (RoundState.FINISHED, RoundState.FAILED)


_SESSION_MOVES = {
    SessionState.CREATED: {SessionState.WAITING, SessionState.RUNNING, SessionState.FAILED,
                           SessionState.STOPPED},
    SessionState.WAITING: {SessionState.RUNNING, SessionState.FAILED, SessionState.STOPPED},
    SessionState.RUNNING: {SessionState.WAITING, SessionState.FINISHED, SessionState.FAILED,
                           SessionState.STOPPED},
}
_ROUND_MOVES = {
    RoundState.RUNNING: {RoundState.REDUCING, RoundState.FAILED},
    RoundState.REDUCING: {RoundState.VALIDATING, RoundState.FINISHED, RoundState.FAILED},
    RoundState.VALIDATING: {RoundState.FINISHED, RoundState.FAILED},
}


def next_session_state(current: SessionState, new: SessionState) -> SessionState:
    if new not in _SESSION_MOVES.get(current, set()):
        raise SessionError(f"a session cannot go from {current} to {new}")
    return new


def next_round_state(current: RoundState, new: RoundState) -> RoundState:
    if new not in _ROUND_MOVES.get(current, set()):
        raise SessionError(f"a round cannot go from {current} to {new}")
    return new
