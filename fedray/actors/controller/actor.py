"""The controller Ray actor: owns sessions, reduces across combiners, hosts the gateway.

A named, detached actor in the federation's namespace. The gateway (client discovery) is a
grpc.aio server in the actor's own event loop; sessions run as asyncio tasks beside it.
`fedray run` follows progress through ``watch``, which returns as soon as the status
changes instead of being polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from typing import Any

import ray

from fedray.actors.controller import starts
from fedray.actors.controller.callbacks import (
    Callbacks,
    ReleaseAfterRounds,
    SessionStatus,
    StatusCallback,
    TrackingCallback,
)
from fedray.actors.controller.gateway import GatewayServicer
from fedray.actors.controller.queue import SessionQueue, SessionRequest
from fedray.actors.controller.ray_pool import RayCombinerPool
from fedray.actors.controller.rebalancer import Rebalancer
from fedray.actors.controller.scaler import Scaler, paused_by, round_over
from fedray.actors.controller.session_runner import SessionRunner, Start
from fedray.actors.controller.starts import LATEST
from fedray.actors.controller.tier import CombinerTier, known_combiners
from fedray.actors.hosting import advertised_host, node_of, quiet
from fedray.actors.memory import tune_allocator
from fedray.actors.metrics import FederationMetrics, TierMetrics
from fedray.actors.observers import TrackingObserver
from fedray.bridge.auth import BridgeKeys, make_gate
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.server import ServerLimits, start_server
from fedray.bridge.tls import ServerTls
from fedray.config import FederationConfig, SessionConfig, recorded_settings
from fedray.errors import SessionError
from fedray.states import SessionState
from fedray.storage import open_model_store
from fedray.strategies import make_strategy
from fedray.tracking.schema import SESSIONS
from fedray.tracking.store import TrackingStore
from fedray.tracking.tokens import tracking_token_loader

log = logging.getLogger(__name__)

ENDED_KEPT = 32  # queued sessions that never ran, remembered for fedray session list
MOVES_LAND_S = 3.0  # a round's planning waits at most this long for moved clients to rejoin


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Controller:
    def __init__(self, config: FederationConfig, combiner_names: list[str],
                 token: BridgeKeys | str | None, tracking_uri: str | None,
                 tls: ServerTls | None = None) -> None:
        tune_allocator()
        self.config = config
        # Signs every commit, and checks what a resume would train from (tracking.resume).
        self.secret = BridgeKeys.of(token).token_secret
        self.tls = tls
        if ray.get_runtime_context().was_current_actor_reconstructed:  # and the tier changed
            combiner_names = known_combiners(config.namespace) or combiner_names
        self.pool = RayCombinerPool(combiner_names, config.namespace)
        self.observer = TrackingObserver(tracking_uri, config.tracking.database, source="controller",
                                         metrics=FederationMetrics(config.federation, "controller"),
                                         events_ttl_s=config.tracking.events_ttl_s, indexes=True)
        self.store = open_model_store(config.storage.uri, config.resolved_data_dir())
        self.sessions: dict[str, asyncio.Task[tuple[str, str]]] = {}
        self.runners: dict[str, SessionRunner] = {}
        self.status: SessionStatus | None = None
        self._version = 0
        self._changed = asyncio.Condition()
        self.tracking_uri = tracking_uri
        self.queue = SessionQueue()
        self.ended: dict[str, dict[str, Any]] = {}  # queued sessions that never ran
        self._drain: asyncio.Task[None] | None = None
        self.gateway = GatewayServicer(self.pool, config.combiners.max_clients, self.observer.event,
                                       settle_s=config.combiners.rebalance_settle_s)
        self._rebalancer = asyncio.ensure_future(  # even load: clients move, a few a second
            Rebalancer(self.pool, self.gateway, config.combiners, self.observer.event).run())
        self.pool.before_online = lambda: self.gateway.landed(MOVES_LAND_S)
        s = config.session
        self.tier = CombinerTier(  # the elastic tier: combiners added and drained at run time
            self.pool, self.gateway, config, token, tracking_uri, tls, self.observer.event,
            lambda: round_over(lambda: self.status, self._changed,
                               s.round_timeout_s * s.round_attempts + 30.0))
        self.scaler = Scaler(self.tier, config.combiners, lambda: paused_by(self.status),
                             TierMetrics(config.federation))
        self._scaling = asyncio.ensure_future(self.scaler.run())
        self._ready = asyncio.ensure_future(self._serve(token))
        # Restarted by Ray after a crash: pick the interrupted session up where it stopped.
        self._resumed = (asyncio.ensure_future(self._resume_after_restart())
                         if ray.get_runtime_context().was_current_actor_reconstructed else None)

    async def _serve(self, token: BridgeKeys | str | None) -> dict[str, Any]:
        c, combiners = self.config.controller, self.config.combiners
        gate = make_gate(token, tracking_token_loader(self.tracking_uri,
                                                     self.config.tracking.database),
                         combiners.max_rpcs_per_s, self.observer.event,
                         max_ids_per_peer=combiners.max_clients_per_connection)
        # The gateway answers every client of every combiner: its bounds are theirs summed.
        limits = ServerLimits.for_settings(
            combiners, clients=max(combiners.count, combiners.max or 0) * combiners.max_clients)
        self._server, bound = await start_server(
            lambda server: pb_grpc.add_GatewayServicer_to_server(self.gateway, server),
            c.host, c.port, gate, self.tls, limits)
        self._gate = gate
        return {"address": f"{advertised_host(c.host, self.config.combiners.advertise)}:{bound}",
                "port": bound, **node_of()}

    @quiet
    async def ready(self) -> dict[str, Any]:
        return await self._ready

    async def _notify(self, status: SessionStatus) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _on_change(self, status: SessionStatus) -> None:
        self.status = status
        asyncio.ensure_future(self._notify(status))

    def _tracking(self) -> TrackingStore:
        return TrackingStore.from_uri(self.tracking_uri, self.config.tracking.database)

    def _unfinished_session(self) -> tuple[dict[str, Any], Start] | None:
        """The federation's latest session that did not end, and where to resume it."""
        if not self.tracking_uri:
            return None
        return starts.unfinished_session(self._tracking(), self.config.federation,
                                         self.secret, self.observer.event)

    def _continued(self, session_id: str) -> Start:
        """A new session's start from another session's last committed model and state."""
        if not self.tracking_uri:
            raise SessionError("session.continue_from needs tracking to find that session")
        return starts.continued(self._tracking(), self.config.federation, self.secret,
                                session_id)

    async def _resume_after_restart(self) -> None:
        await self._ready
        self.observer.event("warning", "controller was restarted by Ray; looking for a session "
                            "to resume")
        found = await asyncio.to_thread(self._unfinished_session)
        if found is not None:
            doc, start = found
            self._launch(doc[SESSIONS.session_id], start, doc.get(SESSIONS.package_sha256) or "",
                         int(doc.get(SESSIONS.package_size) or 0),
                         recorded_settings(doc.get(SESSIONS.config), self.config.session))

    def _launch(self, session_id: str, start: Start, package_sha256: str,
                package_size: int = 0, settings: SessionConfig | None = None) -> None:
        s = settings or self.config.session
        status = SessionStatus(session_id=session_id, rounds_planned=s.rounds,
                               strategy=s.aggregator)
        self.status = status
        tracking = TrackingCallback(self.observer)
        runner = SessionRunner(
            federation=self.config.federation, session_id=session_id, settings=s,
            strategy=make_strategy(s.aggregator, s.strategy_options), pool=self.pool,
            store=self.store, callbacks=Callbacks([tracking, StatusCallback(status, self._on_change),
                                                   ReleaseAfterRounds()], flush=tracking.flush),
            combiner_strategy=make_strategy(s.aggregator, s.strategy_options),
            package=(package_sha256, package_size), secret=self.secret)
        self.runners = {session_id: runner}
        self.sessions = {sid: task for sid, task in self.sessions.items() if not task.done()}
        self.sessions[session_id] = asyncio.ensure_future(runner.run(start))

    def _running(self) -> str | None:
        """The session whose task has not ended, if any."""
        return next((sid for sid, task in self.sessions.items() if not task.done()), None)

    async def _settle(self) -> None:
        """Wait for a session that has ended and only flushes its last tracking writes;
        SessionError if one is still running."""
        for session_id, task in self.sessions.items():
            if task.done():
                continue
            if self.status is not None and self.status.session_id == session_id \
                    and SessionState(self.status.state).terminal:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            else:
                raise SessionError(f"session {session_id} is still running; wait for it to end")

    async def start_session(self, seed_model_id: str, package_sha256: str = "",
                            resume: bool = False, package_size: int = 0,
                            resume_only: bool = False) -> dict[str, Any]:
        """Start a session (or, with ``resume``, continue the federation's unfinished one;
        with ``resume_only`` too, start nothing when there is none)."""
        if self._resumed is not None:
            await self._resumed
        if len(self.queue):
            raise SessionError(f"{len(self.queue)} session(s) are queued; submit this one too")
        await self._settle()
        found = await asyncio.to_thread(self._unfinished_session) if resume else None
        if found is not None:
            doc, start = found
            self._launch(doc[SESSIONS.session_id], start, package_sha256, package_size,
                         recorded_settings(doc.get(SESSIONS.config), self.config.session))
            return {"session_id": doc[SESSIONS.session_id], "resumed_after": start.rounds_done}
        if resume_only:
            return {"session_id": None, "resumed_after": None}
        session_id = uuid.uuid4().hex[:16]
        continued = self.config.session.continue_from
        start = await asyncio.to_thread(self._continued, continued) if continued \
            else Start(seed_model_id)
        self._launch(session_id, start, package_sha256, package_size)
        return {"session_id": session_id, "resumed_after": None,
                "continued_from": start.continued_from or None}

    async def submit_session(self, request: SessionRequest) -> dict[str, Any]:
        """Queue ``request``; it runs once every session before it has ended."""
        if self._resumed is not None:
            await self._resumed
        ahead = [*self.queue_ids(), *(sid for sid in [self._running()] if sid)]
        source = request.settings.continue_from
        if source and not (ahead and source == LATEST) \
                and not any(sid.startswith(source) for sid in ahead):
            await asyncio.to_thread(self._continued, source)  # said now, not at its turn
        position = self.queue.push(request)
        running = self._running()
        self.observer.event("info", f"session {request.session_id} submitted"
                            + (f" by {request.submitted_by}" if request.submitted_by else "")
                            + (f"; it runs after {running}"
                               + (f" and {position - 1} more" if position > 1 else "")
                               if running else ""),
                            session_id=request.session_id, submitted_by=request.submitted_by)
        if self._drain is None or self._drain.done():
            self._drain = asyncio.ensure_future(self._run_queue())
        return {"session_id": request.session_id, "position": position,
                "after": running}

    async def _run_queue(self) -> None:
        """Run queued sessions one at a time, each as soon as the one before has ended."""
        while True:
            running = self._running()
            if running is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.shield(self.sessions[running])
                continue
            request = self.queue.pop()
            if request is None:
                return
            try:
                await self._settle()
                start = await asyncio.to_thread(self._continued, request.settings.continue_from) \
                    if request.settings.continue_from else Start(request.seed_model_id)
                start = dataclasses.replace(start, submitted_by=request.submitted_by)
            except Exception as exc:  # noqa: BLE001 - this request fails, the queue goes on
                reason = str(exc) if isinstance(exc, SessionError) else \
                    f"{type(exc).__name__}: {exc}"
                self.ended[request.session_id] = {**request.summary(0), "state": "failed",
                                                  "reason": reason}
                self.observer.event("error", f"session {request.session_id} could not start: "
                                    f"{reason}", session_id=request.session_id)
                continue
            self._launch(request.session_id, start, request.package_sha256,
                         request.package_size, request.settings)

    async def stop_session(self, session_id: str, by: str, reason: str = "") -> dict[str, Any]:
        """Stop a queued or running session (any unique prefix of its id): a queued one
        never runs; a running one finishes its current round and ends ``stopped``."""
        reason = reason or "stopped on request"
        matches = [sid for sid in [*self.queue_ids(), *self.sessions] if sid.startswith(session_id)]
        matches = list(dict.fromkeys(matches))
        if len(matches) != 1:
            what = "no queued or running session" if not matches else "more than one session"
            raise SessionError(f"{what} matches {session_id!r}; fedray session list shows them")
        sid = matches[0]
        request = self.queue.remove(sid)
        if request is not None:
            self.ended[sid] = {**request.summary(0), "state": "stopped", "reason": reason,
                               "stopped_by": by}
            self.observer.event("info", f"session {sid} removed from the queue: {reason} "
                                f"(by {by})", session_id=sid, stopped_by=by)
            return {"session_id": sid, "state": "stopped", "was": "queued"}
        task, runner = self.sessions[sid], self.runners.get(sid)
        if task.done() or runner is None:
            return {"session_id": sid, "state": self._state_of(sid), "was": "ended"}
        runner.stop(by, reason, task)
        return {"session_id": sid, "state": "stopping", "was": "running"}

    def queue_ids(self) -> list[str]:
        return [q["session_id"] for q in self.queue.listing()]

    def _state_of(self, session_id: str) -> str:
        if self.status is not None and self.status.session_id == session_id:
            return self.status.state
        return "ended"

    @quiet
    async def session_list(self) -> dict[str, Any]:
        """The running session's status (without its round records) and the queue."""
        current = None
        if self.status is not None:
            current = {k: v for k, v in self.status.snapshot(self.status.history_total).items()
                       if k != "history"}
            current["running"] = self._running() == self.status.session_id
        return {"current": current, "queued": self.queue.listing(),
                "ended": list(self.ended.values())[-ENDED_KEPT:]}

    @quiet
    async def tier_status(self) -> dict[str, Any]:
        """The elastic tier: size, bounds, draining combiners and the last change."""
        return self.scaler.describe()

    @quiet
    async def claim_update(self, session_id: str, round_: int, attempt: int,
                           client_id: str) -> int:
        """A combiner's request to fold an update of a buffered round (see SessionRunner)."""
        runner = self.runners.get(session_id)
        return runner.claim(round_, attempt, client_id) if runner is not None else 0

    @quiet
    async def watch(self, version: int, timeout_s: float = 5.0,
                    after: int | None = None) -> tuple[int, dict[str, Any] | None]:
        """Return (version, status) once the status is newer than ``version``, or on timeout.

        The status carries the round records after the first ``after`` (the watcher has
        those already; see ``SessionStatus.snapshot``), so a call costs the same in round
        500 as in round 5.
        """
        if self._resumed is not None:
            await self._resumed
        async with self._changed:
            if self._version <= version:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout_s)
            return self._version, self.status.snapshot(after) if self.status else None

    async def halt(self, why: str) -> list[str]:
        """Stop every running session, each recorded as stopped by ``why`` (the driver says
        so before it stops the combiners, whose leaving would otherwise fail the round)."""
        halted = []
        dropped = []
        while (request := self.queue.pop()) is not None:
            dropped.append(request.session_id)
        if dropped:
            self.observer.event("warning", f"{len(dropped)} queued session(s) will not run: "
                                f"{why} ({', '.join(dropped)}); submit them again",
                                dropped=dropped)
        for session_id, task in self.sessions.items():
            runner = self.runners.get(session_id)
            if task.done() or runner is None:
                continue
            runner.halt(why, task)
            with contextlib.suppress(asyncio.CancelledError):
                await task
            halted.append(session_id)
        return halted

    async def stop(self) -> None:
        self._rebalancer.cancel()
        self._scaling.cancel()
        await self.tier.stop()
        await self._server.stop(grace=1.0)
        await self._gate.close()
        await asyncio.to_thread(self.observer.close)
