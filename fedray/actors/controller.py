"""The controller Ray actor: owns sessions, reduces across combiners, hosts the gateway.

A named, detached actor in the federation's namespace. The gateway (client discovery) is a
grpc.aio server in the actor's own event loop; sessions run as asyncio tasks beside it.
`fedray run` follows progress through ``watch``, which returns as soon as the status
changes instead of being polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import asdict
from typing import Any

import grpc
import numpy as np
import ray

from fedray.actors.auth import make_gate
from fedray.actors.combiner import advertised_host
from fedray.actors.grpc_server import caller_id, start_server
from fedray.actors.metrics import FederationMetrics
from fedray.actors.observers import TrackingObserver
from fedray.actors.session_runner import SessionRunner, SessionStatus
from fedray.config import FederationConfig
from fedray.errors import SessionError
from fedray.messages import RoundResult, RoundSpec
from fedray.policy import ResumePoint, pick_combiner, resume_point
from fedray.proto import fedray_v1_pb2 as pb
from fedray.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.storage import open_model_store
from fedray.tls import ServerTls
from fedray.tracking.store import TrackingStore

log = logging.getLogger(__name__)

UNFINISHED = ["created", "waiting", "running"]


class RayCombinerPool:
    """The controller's view of its combiners, through Ray actor handles looked up by name."""

    def __init__(self, names: list[str], namespace: str) -> None:
        self.names = names
        self.namespace = namespace

    def handle(self, name: str):
        return ray.get_actor(name, namespace=self.namespace)

    async def _ask(self, name: str, method: str, *args: Any) -> Any:
        return await getattr(self.handle(name), method).remote(*args)

    async def online(self) -> dict[str, list[str]]:
        answers = await asyncio.gather(*(self._ask(n, "online_clients") for n in self.names),
                                       return_exceptions=True)
        return {n: a for n, a in zip(self.names, answers, strict=True) if isinstance(a, list)}

    async def loads(self) -> dict[str, tuple[int, str]]:
        answers = await asyncio.gather(*(self._ask(n, "info") for n in self.names),
                                       return_exceptions=True)
        return {n: (a["load"], a["address"]) for n, a in zip(self.names, answers, strict=True)
                if isinstance(a, dict)}

    async def wait_for_change(self, online: dict[str, list[str]], timeout_s: float) -> None:
        """Return as soon as any combiner's number of online clients changes."""
        waits = [asyncio.ensure_future(self._ask(n, "wait_clients_changed", len(online.get(n, [])),
                                                 timeout_s)) for n in self.names]
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if any(task.exception() is not None for task in done):
            await asyncio.sleep(0.5)  # a combiner is restarting: ask again shortly, not in a spin

    def put_model(self, data: bytes) -> Any:
        # One copy in the object store per round; every combiner gets the same ref.
        return ray.put(np.frombuffer(data, dtype=np.uint8))

    async def run_round(self, combiner: str, spec: RoundSpec, model_ref: Any) -> RoundResult:
        return await self.handle(combiner).run_round.remote(spec, model_ref)


class GatewayServicer(pb_grpc.GatewayServicer):
    """Client discovery. Assignments from the last few seconds count towards a combiner's
    load, so a burst of clients starting together is spread instead of piling onto the
    combiner that was least loaded a moment ago."""

    RECENT_S = 5.0

    def __init__(self, pool: RayCombinerPool, max_clients: int) -> None:
        self.pool = pool
        self.max_clients = max_clients
        self.recent: dict[str, list[float]] = {}

    async def Assign(self, request: pb.AssignRequest, context) -> pb.Assignment:
        client_id = await caller_id(context, request.name, request.name)
        if not client_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a client needs a name")
        loads = await self.pool.loads()
        now = time.monotonic()
        for name in loads:
            self.recent[name] = [t for t in self.recent.get(name, []) if now - t < self.RECENT_S]
        choice = pick_combiner({n: c + len(self.recent[n]) for n, (c, _) in loads.items()},
                               self.max_clients, avoid=request.previous_combiner)
        if choice is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no combiner accepts clients now")
        self.recent[choice].append(now)
        return pb.Assignment(client_id=client_id, combiner=choice, address=loads[choice][1])


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Controller:
    def __init__(self, config: FederationConfig, combiner_names: list[str], token: str | None,
                 tracking_uri: str | None, tls: ServerTls | None = None) -> None:
        self.config = config
        self.tls = tls
        self.pool = RayCombinerPool(combiner_names, config.namespace)
        self.observer = TrackingObserver(tracking_uri, config.tracking.database, source="controller",
                                         metrics=FederationMetrics(config.federation, "controller"))
        self.store = open_model_store(config.storage.uri, config.resolved_data_dir())
        self.sessions: dict[str, asyncio.Task[SessionStatus]] = {}
        self.status: SessionStatus | None = None
        self._version = 0
        self._changed = asyncio.Condition()
        self.tracking_uri = tracking_uri
        self._ready = asyncio.ensure_future(self._serve(token))
        # Restarted by Ray after a crash: pick the interrupted session up where it stopped.
        self._resumed = (asyncio.ensure_future(self._resume_after_restart())
                         if ray.get_runtime_context().was_current_actor_reconstructed else None)

    async def _serve(self, token: str | None) -> dict[str, Any]:
        c = self.config.controller

        def register(server):
            servicer = GatewayServicer(self.pool, self.config.combiners.max_clients)
            pb_grpc.add_GatewayServicer_to_server(servicer, server)

        gate = make_gate(token, self.tracking_uri, self.config.tracking.database,
                         self.config.combiners.max_rpcs_per_s, self.observer.event)
        self._server, bound = await start_server(register, c.host, c.port, gate, self.tls)
        self._gate = gate
        return {"address": f"{advertised_host(c.host, self.config.combiners.advertise)}:{bound}",
                "port": bound}

    async def ready(self) -> dict[str, Any]:
        return await self._ready

    async def _notify(self, status: SessionStatus) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _on_change(self, status: SessionStatus) -> None:
        self.status = status
        asyncio.ensure_future(self._notify(status))

    def _unfinished_session(self) -> tuple[dict[str, Any], ResumePoint] | None:
        """The federation's latest session that did not end, and where to resume it."""
        if not self.tracking_uri:
            return None
        store = TrackingStore.from_uri(self.tracking_uri, self.config.tracking.database)
        try:
            docs = store.find("sessions", {"federation": self.config.federation,
                                           "status": {"$in": UNFINISHED}},
                              sort=[("created_at", -1)], limit=1)
            if not docs:
                return None
            rounds = store.find("rounds", {"session_id": docs[0]["session_id"]})
            return docs[0], resume_point(docs[0], rounds)
        finally:
            store.close()

    async def _resume_after_restart(self) -> None:
        await self._ready
        self.observer.event("warning", "controller was restarted by Ray; looking for a session "
                            "to resume")
        found = await asyncio.to_thread(self._unfinished_session)
        if found is not None:
            doc, point = found
            self._launch(doc["session_id"], point.model_id, doc.get("package_sha256") or "", point)

    def _launch(self, session_id: str, model_id: str, package_sha256: str,
                resume: ResumePoint | None) -> None:
        runner = SessionRunner(self.config.federation, session_id, self.config.session, self.pool,
                               self.store, self.observer, self._on_change, package_sha256)
        self.status = runner.status
        self.sessions[session_id] = asyncio.ensure_future(runner.run(model_id, resume))

    async def start_session(self, seed_model_id: str, package_sha256: str = "",
                            resume: bool = False) -> dict[str, Any]:
        """Start a session (or, with ``resume``, continue the federation's unfinished one)."""
        if self._resumed is not None:
            await self._resumed
        for session_id, task in self.sessions.items():
            if task.done():
                continue
            if self.status is not None and self.status.session_id == session_id \
                    and self.status.state in ("finished", "failed"):
                await task  # it has ended and is only flushing its last tracking writes
            else:
                raise SessionError(f"session {session_id} is still running; wait for it to end")
        found = await asyncio.to_thread(self._unfinished_session) if resume else None
        if found is not None:
            doc, point = found
            self._launch(doc["session_id"], point.model_id, package_sha256, point)
            return {"session_id": doc["session_id"], "resumed_after": point.rounds_done}
        session_id = uuid.uuid4().hex[:16]
        self._launch(session_id, seed_model_id, package_sha256, None)
        return {"session_id": session_id, "resumed_after": None}

    async def watch(self, version: int, timeout_s: float = 5.0) -> tuple[int, dict[str, Any] | None]:
        """Return (version, status) once the status is newer than ``version``, or on timeout."""
        if self._resumed is not None:
            await self._resumed
        async with self._changed:
            if self._version <= version:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout_s)
            return self._version, asdict(self.status) if self.status else None

    async def stop(self) -> None:
        await self._server.stop(grace=1.0)
        await self._gate.close()
        await asyncio.to_thread(self.observer.close)
