"""One training session from its start to its end, as the strategy declared it.

Runs inside the controller actor's event loop, but knows nothing of Ray: combiners are a
``CombinerPool`` (Ray actors in production, in-process cores in tests), models go to a
``ModelStore``, and everything that happens is a typed event for the ``Callbacks``
(tracking, metrics, progress). ``SessionRunner`` begins the session (a new one, a resumed
one, or one continuing another's model), hands it to the loop the strategy's declaration
asks for (``SyncRounds``, or ``AsyncLoop`` for asynchronous strategies), and ends it:
finished, or failed with one reason.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict

from fedray.actors.controller.async_runner import AsyncLoop
from fedray.actors.controller.callbacks import Callbacks, SessionCreated, SessionMoved
from fedray.actors.controller.claims import BufferClaims
from fedray.actors.controller.pool import CombinerPool
from fedray.actors.controller.session import Session, Start, StopRequest
from fedray.actors.controller.sync_rounds import SyncRounds
from fedray.config import SessionConfig
from fedray.errors import FedrayError
from fedray.serialization import copy_model, decode
from fedray.states import SessionState
from fedray.storage.base import ModelStore
from fedray.strategies.base import Strategy

log = logging.getLogger(__name__)

__all__ = ["SessionRunner", "Start"]

STOP_GRACE_S = 10.0  # past the round timeout, for the commit, before a stop cuts it short


class SessionRunner:
    def __init__(self, *, federation: str, session_id: str, settings: SessionConfig,
                 strategy: Strategy, pool: CombinerPool, store: ModelStore,
                 callbacks: Callbacks, combiner_strategy: Strategy | None = None,
                 package: tuple[str, int] = ("", 0), secret: bytes | None = None) -> None:
        self.session = Session(federation=federation, session_id=session_id,
                               settings=settings, strategy=strategy, pool=pool, store=store,
                               callbacks=callbacks, combiner_strategy=combiner_strategy,
                               package=package, secret=secret)
        self.claims = BufferClaims(self.session, self._close_buffered)
        self.halted = ""  # who stopped the session, once ``halt`` was called
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def model_id(self) -> str:
        return self.session.model_id

    @property
    def strategy(self) -> Strategy:
        return self.session.strategy

    @property
    def store(self) -> ModelStore:
        return self.session.store

    def halt(self, why: str, task: asyncio.Future) -> None:
        """Stop the session ``task`` runs now, recorded as stopped (``why``: by whom) and
        not as a failure: the round in progress is cut short, nothing is committed, and
        the session stays resumable."""
        self.halted = why
        task.cancel()

    def stop(self, by: str, reason: str, task: asyncio.Future) -> None:
        """End the session for good (state ``stopped``): the round in progress finishes
        and commits, no other starts. A session with no round in progress (waiting for
        clients) stops at once; one whose round outlasts ``session.round_timeout_s`` (and
        a few seconds of commit) is cut short there."""
        s = self.session
        if s.stop is not None or task.done():
            return
        s.stop = StopRequest(by, reason)
        s.note("info", f"session {s.session_id} is stopping: {reason} (by {by}); "
               f"{'no round is running' if s.state is SessionState.WAITING else 'its current round finishes first'}",
               reason="stopping", stopped_by=by)
        if s.state is SessionState.WAITING:  # for clients: nothing under way to finish
            task.cancel()
            return
        grace = s.settings.round_timeout_s + STOP_GRACE_S
        self._watchdog = asyncio.get_running_loop().call_later(grace, task.cancel)

    def claim(self, round_: int, attempt: int, client_id: str) -> int:
        """A combiner asks to fold an update of a buffered round (``BufferClaims``)."""
        return self.claims.claim(round_, attempt, client_id)

    async def _close_buffered(self, round_: int, attempt: int) -> None:
        s = self.session
        await asyncio.gather(*(s.pool.buffer_full(name, s.session_id, round_, attempt)
                               for name in s.pool.names), return_exceptions=True)

    async def run(self, start: Start) -> tuple[str, str]:
        """Run the session to its end; (final state, reason if it failed)."""
        s = self.session
        reason = ""
        try:
            model = await self._begin(start)
            if s.asynchronous:
                await AsyncLoop(s).run(model)
            else:  # from its object-store copy: no private copy through the rounds
                model = await s.shared_model(model)
                await SyncRounds(s, self.claims).run(model)
            if s.stop is not None:
                self._stopped()
            else:
                s.move(SessionState.FINISHED, rounds_done=s.rounds_done, model_id=s.model_id)
                s.note("info", f"session {s.session_id} finished after {s.rounds_done} "
                       f"{'versions' if s.asynchronous else 'rounds'}")
        except asyncio.CancelledError:
            if s.stop is not None and not self.halted:  # stopped for good, cut short
                self._stopped()
                await s.callbacks.flush()
                return s.state.value, s.stop.reason
            # halted: the command that runs it was stopped
            s.note("warning", f"session {s.session_id} stopped after {s.rounds_done} "
                   f"{'versions' if s.asynchronous else 'rounds'}: {self.halted or 'cancelled'};"
                   " it resumes when the federation runs it again", reason="stopped",
                   stopped_by=self.halted)
            await s.callbacks.flush()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure ends the session, said once
            reason = str(exc) if isinstance(exc, FedrayError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, FedrayError):
                log.exception("session %s crashed", s.session_id)
            if not s.state.terminal:
                s.move(SessionState.FAILED, reason=reason)
            s.note("error", f"session {s.session_id} failed: {reason}")
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
        await s.callbacks.flush()
        return s.state.value, reason

    def _stopped(self) -> None:
        s = self.session
        assert s.stop is not None
        what = "versions" if s.asynchronous else "rounds"
        s.move(SessionState.STOPPED, rounds_done=s.rounds_done, model_id=s.model_id,
               reason=s.stop.reason, stopped_by=s.stop.by)
        s.note("warning", f"session {s.session_id} stopped after {s.rounds_done} {what}: "
               f"{s.stop.reason} (by {s.stop.by}); a new session can continue from its model "
               f"(session.continue_from: {s.session_id})", reason="stopped",
               stopped_by=s.stop.by)

    async def _begin(self, start: Start) -> bytes:
        s = self.session
        s.model_id, s.rounds_done, s.state_id = start.model_id, start.rounds_done, start.state_id
        if not start.resume:
            s.emit(SessionCreated(s.session_id, s.federation, asdict(s.settings),
                                  s.settings.rounds, start.model_id, s.package[0],
                                  s.package[1], start.continued_from, s.settings.aggregator,
                                  s.asynchronous, s.sign(0, start.model_id),
                                  start.submitted_by))
        else:
            s.note("warning", f"session {s.session_id} resumed after round "
                   f"{start.rounds_done} from model {start.model_id[:12]}")
        if s.min_clients > s.settings.min_clients:
            s.note("info", f"{s.settings.aggregator!r} needs at least {s.min_clients} updates "
                   f"per round: rounds wait for and ask at least {s.min_clients} clients "
                   f"(session.min_clients is {s.settings.min_clients})",
                   min_clients=s.min_clients)
        if start.state_id:
            state = await asyncio.to_thread(s.store.get, start.state_id)
            s.strategy.load_state_dict(copy_model(decode(state)))
        model = await asyncio.to_thread(s.store.get, start.model_id)
        if not start.resume:
            s.record_model(start.model_id, None, 0, model)
        await s.callbacks.flush()
        s.emit(SessionMoved(s.session_id, s.state.value,
                            {"rounds_done": start.rounds_done, "model_id": start.model_id}))
        await s.pool.start_session(s.session_id, s.combiner_strategy)
        return model
