"""The combiner's logic: client registry, task dispatch, model serving, round shares.

Pure asyncio; it does not import grpc or Ray. The gRPC servicer turns RPCs into calls on
``CombinerCore`` and the Ray actor wraps it, so tests can drive it in-process. One event
loop serves every client: each connected client is a queue of tasks, not a thread.

The strategy arrives once per session (``start_session``); a round's ``RoundSpec`` only
carries what changes. A share is either one synchronous round (``run_round``) or the
stream of an asynchronous session (``start_async`` ... ``stop_async``): clients keep
training on the newest version, every accepted update is kept by handle (in Ray's object
store when this runs in an actor) and taken by the controller with ``take_updates``.
Update intake (slots, checks, fold) is ``fedray.actors.combiner.intake``. Observability plugs in
through a ``CombinerListener`` whose failures never stop a round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedray.actors.combiner.async_share import AsyncServing
from fedray.actors.combiner.intake import Limits, ModelVersion, Share, TaskEntry, UpdateIntake
from fedray.config import CombinersConfig
from fedray.errors import UnknownSession, UpdateRejected
from fedray.messages import (
    MAX_ATTRS,
    RoundResult,
    RoundSpec,
    Task,
    TaskKind,
    UpdateHeader,
    ValidationReport,
)
from fedray.serialization import decode, model_id, read_layout
from fedray.strategies.base import (
    Buffer,
    ClientInfo,
    CloseReason,
    ShareSnapshot,
    ShareStart,
    Strategy,
)

log = logging.getLogger(__name__)

KEPT_MODELS = 2  # the round's model and the one before, for clients that are a bit late
KEPT_SESSIONS = 4  # strategies of recent sessions (a restarted controller may resume one)
CLIENT_STATUSES = {"online", "training", "validating"}  # what a heartbeat may report


class CombinerListener(Protocol):
    def event(self, level: str, message: str, **data: Any) -> None: ...
    def client_status(self, client_id: str, name: str, status: str, online: int,
                      attrs: Mapping[str, str] | None = None,
                      version: str | None = None) -> None: ...
    def round_closed(self, result: RoundResult) -> None: ...


class NullListener:
    def event(self, level: str, message: str, **data: Any) -> None:
        log.log(logging.getLevelName(level.upper()), message)

    def client_status(self, client_id: str, name: str, status: str, online: int,
                      attrs: Mapping[str, str] | None = None,
                      version: str | None = None) -> None:
        pass

    def round_closed(self, result: RoundResult) -> None:
        pass


@dataclass(eq=False)
class ClientLink:
    client_id: str
    name: str
    attrs: dict[str, str] = field(default_factory=dict)
    queue: asyncio.Queue[Task | None] = field(default_factory=asyncio.Queue)
    last_seen: float = field(default_factory=time.monotonic)
    status: str = "online"


# (session id, round, attempt, client id) -> the round's accepted count with this update,
# or 0 when its first K are in already: the controller's answer in a buffered round.
Claimer = Callable[[str, int, int, str], Awaitable[int]]


def _copy_keeper(raw: Buffer) -> Any:
    return np.array(raw, dtype=np.uint8, copy=True)  # outside Ray: a private copy


class CombinerCore(AsyncServing):
    def __init__(self, name: str, settings: CombinersConfig,
                 listener: CombinerListener | None = None,
                 keeper: Callable[[Buffer], Any] = _copy_keeper,
                 claimer: Claimer | None = None) -> None:
        self.name = name
        self.settings = settings
        self.listener = listener or NullListener()
        self.keeper = keeper  # where kept updates go: ray.put inside the actor
        self.claimer = claimer  # the controller's count of a buffered round (None: local)
        self.clients: dict[str, ClientLink] = {}
        self.models: OrderedDict[str, np.ndarray] = OrderedDict()
        self.strategies: OrderedDict[str, Strategy] = OrderedDict()
        self.share: Share | None = None
        self._last: tuple[tuple, asyncio.Future[RoundResult]] | None = None  # idempotent retry
        self.bytes_out = 0
        self.stopping = False
        self._clients_changed = asyncio.Event()
        self.intake = UpdateIntake(settings.max_inflight_uploads,
                                   int(settings.max_update_mb * 1024 * 1024),
                                   settings.upload_idle_s, self._share_for, self._settle,
                                   self.listener, self._claim)

    # ----------------------------------------------------------------- clients

    def online_clients(self) -> list[str]:
        return sorted(cid for cid, link in self.clients.items() if link.status != "offline")

    def online_info(self) -> list[ClientInfo]:
        return [ClientInfo(cid, self.name, link.name, dict(link.attrs))
                for cid, link in sorted(self.clients.items()) if link.status != "offline"]

    def accepts_clients(self) -> bool:
        return len(self.online_clients()) < self.settings.max_clients

    def connect(self, client_id: str, name: str, attrs: Mapping[str, str] | None = None,
                version: str = "") -> ClientLink:
        """Register a client (a reconnect replaces its old stream); it is online from now.
        ``attrs`` and ``version`` are what it says about itself (tracked with it)."""
        old = self.clients.get(client_id)
        if old is not None:
            old.queue.put_nowait(None)
        link = ClientLink(client_id=client_id, name=name,
                          attrs=dict(list((attrs or {}).items())[:MAX_ATTRS]))
        self.clients[client_id] = link
        self.listener.client_status(client_id, name, "online", len(self.online_clients()),
                                    link.attrs, version)
        self._membership_changed()
        self.listener.event("info", f"client {name} joined combiner {self.name}", client_id=client_id)
        share = self.share
        if share is not None and share.asynchronous and client_id in self._participants:
            self._drop_tasks(share, client_id)  # the old stream's task died with it
            self._dispatch_async(share, client_id)
        return link

    async def tasks(self, link: ClientLink) -> AsyncIterator[Task]:
        """The task stream of one connected client; it goes offline when this ends."""
        try:
            while True:
                task = await link.queue.get()
                if task is None:
                    return
                yield task
        finally:
            if self.clients.get(link.client_id) is link and link.status != "offline":
                self._client_gone(link, "its task stream closed")

    def heartbeat(self, client_id: str, status: str = "") -> bool:
        link = self.clients.get(client_id)
        if link is None or link.status == "offline":
            return False
        link.last_seen = time.monotonic()
        if status in CLIENT_STATUSES and status != link.status:  # "offline" is ours to say
            link.status = status
            self.listener.client_status(client_id, link.name, status, len(self.online_clients()))
        return True

    def sweep(self) -> None:
        """Mark clients offline whose heartbeats stopped; called about once a second."""
        limit = time.monotonic() - self.settings.offline_after_s
        for link in list(self.clients.values()):
            if link.status != "offline" and link.last_seen < limit:
                link.queue.put_nowait(None)
                self._client_gone(link, f"no heartbeat for {self.settings.offline_after_s:g}s")

    def disconnect_all(self) -> None:
        """Close every task stream (the combiner stops): clients leaving now is expected."""
        self.stopping = True
        for link in self.clients.values():
            link.queue.put_nowait(None)

    def _membership_changed(self) -> None:
        self._clients_changed.set()
        self._clients_changed = asyncio.Event()  # waiters keep the one that just fired

    async def wait_clients_changed(self, known: int, timeout_s: float) -> list[str]:
        """Online clients, once their number differs from ``known`` (or at ``timeout_s``)."""
        if len(self.online_clients()) == known:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._clients_changed.wait(), timeout_s)
        return self.online_clients()

    def _client_gone(self, link: ClientLink, why: str) -> None:
        link.status = "offline"
        if self.clients.get(link.client_id) is link:  # forget it: ids cannot pile up
            del self.clients[link.client_id]
        self.listener.client_status(link.client_id, link.name, "offline", len(self.online_clients()))
        self._membership_changed()
        share = self.share
        busy = share is not None and not share.closed.is_set() \
            and any(e.client_id == link.client_id for e in share.tasks.values()) \
            and link.client_id not in share.settled
        # Leaving while a task waits on it matters; leaving between sessions, or because
        # this combiner is stopping, is how every session ends.
        level = "warning" if busy and not self.stopping else "info"
        self.listener.event(level, f"client {link.name} is offline: {why}", client_id=link.client_id)
        if busy:
            assert share is not None
            share.failed += 1
            share.gone.add(link.client_id)
            self._settle(share, link.client_id, False)

    # ----------------------------------------------------------------- models

    def model_chunks(self, wanted: str) -> Iterator[tuple[memoryview, int, int]]:
        """The model ``wanted`` as (chunk, offset, total) slices of the one serialized copy."""
        data = self.models.get(wanted)
        if data is None:
            raise KeyError(wanted)
        view = memoryview(data).cast("B")
        step = self.settings.chunk_kib * 1024
        total = len(view)
        for offset in range(0, max(total, 1), step):
            chunk = view[offset : offset + step]
            self.bytes_out += len(chunk)
            yield chunk, offset, total

    def _keep_model(self, data: np.ndarray, version: int, known_id: str = "",
                    keep: int = KEPT_MODELS) -> ModelVersion:
        mid = known_id or model_id(data)  # the controller hashed it once already
        self.models[mid] = data
        self.models.move_to_end(mid)
        while len(self.models) > keep:
            self.models.popitem(last=False)
        layout = read_layout(data)
        return ModelVersion(version, mid, layout, decode(data, layout), int(data.nbytes))

    # ----------------------------------------------------------------- sessions

    def start_session(self, session_id: str, strategy: Strategy) -> None:
        """The session's strategy, given once; every later round of it uses this one."""
        self.strategies[session_id] = strategy
        self.strategies.move_to_end(session_id)
        while len(self.strategies) > KEPT_SESSIONS:
            self.strategies.popitem(last=False)

    def _strategy(self, session_id: str) -> Strategy:
        strategy = self.strategies.get(session_id)
        if strategy is None:
            raise UnknownSession(f"combiner {self.name} has no strategy for session "
                                 f"{session_id}")
        return strategy

    def _open(self, share: Share) -> None:
        previous, self.share = self.share, share
        if previous is not None and not previous.closed.is_set():
            self._close(previous, "superseded")

    def _share_for(self, session_id: str, kind: TaskKind) -> Share:
        if self.share is None:
            raise UpdateRejected("stale", f"no round of session {session_id[:16]} is open")
        return self.share

    # ----------------------------------------------------------------- synchronous rounds

    async def run_round(self, spec: RoundSpec, model: np.ndarray) -> RoundResult:
        """Run this combiner's share of a round; calling twice for one round is harmless."""
        if self._last is None or self._last[0] != spec.key:
            strategy = self._strategy(spec.session_id)  # before anything starts
            # Only the latest round's result is kept (for a retried call): a session of
            # any length holds one partial here, not one per round.
            self._last = (spec.key, asyncio.ensure_future(self._run_round(spec, model, strategy)))
        return await asyncio.shield(self._last[1])

    async def _run_round(self, spec: RoundSpec, model: np.ndarray,
                         strategy: Strategy) -> RoundResult:
        self._stop_async_share("a round started")
        version = self._keep_model(model, spec.version, spec.model_id)
        accumulator = None
        if spec.kind is TaskKind.TRAIN:
            accumulator = strategy.start(ShareStart(spec=version.layout.spec(), base=version.base,
                                                    params=dict(spec.params), keep=self.keeper))
        tasks = {uuid.uuid4().hex: TaskEntry(client, spec.version) for client in spec.clients}
        share = Share(session_id=spec.session_id, round=spec.round, kind=spec.kind,
                      strategy=strategy, accumulator=accumulator,
                      limits=Limits(spec.max_examples, spec.max_update_norm),
                      versions={spec.version: version}, current=spec.version,
                      deadline=time.monotonic() + spec.timeout_s, tasks=tasks,
                      buffer=spec.buffer, attempt=spec.attempt)
        self._open(share)
        bytes_out_before = self.bytes_out
        deadline_unix = time.time() + spec.timeout_s
        for task_id, entry in tasks.items():
            link = self.clients.get(entry.client_id)
            if link is None or link.status == "offline":
                share.failed += 1
                share.failures[entry.client_id] = "offline when the round started"
                share.settled.add(entry.client_id)
                continue
            link.queue.put_nowait(self._task(task_id, spec.kind, spec.session_id, spec.round,
                                             version, spec.config, deadline_unix,
                                             spec.package_sha256, spec.package_size))
        self._check_close(share)
        timer = asyncio.get_running_loop().call_later(spec.timeout_s, self._check_close, share)
        try:
            await share.closed.wait()
        finally:
            timer.cancel()
        async with share.fold_lock:  # folds that were already accepted finish first
            partial = accumulator.partial() if accumulator else None
        result = RoundResult(
            combiner=self.name, session_id=spec.session_id, round=spec.round, asked=len(tasks),
            updates=share.accepted, rejected=sum(share.rejected.values()), failed=share.failed,
            close_reason=share.close_reason, seconds=time.monotonic() - share.started,
            bytes_in=share.bytes_in, bytes_out=self.bytes_out - bytes_out_before,
            aggregation_s=share.aggregation_s, partial=partial, validations=share.validations,
            rejections=dict(share.rejected), metrics=share.metrics,
            failures=dict(share.failures), attempt=spec.attempt)
        self.listener.round_closed(result)
        return result

    @staticmethod
    def _task(task_id: str, kind: TaskKind, session_id: str, round_: int, version: ModelVersion,
              config: dict[str, Any], deadline_unix: float, package_sha256: str,
              package_size: int) -> Task:
        return Task(task_id=task_id, kind=kind, session_id=session_id, round=round_,
                    model_id=version.model_id, model_size=version.size, config=config,
                    deadline_unix=deadline_unix, package_sha256=package_sha256,
                    package_size=package_size)

    def _settle(self, share: Share, client_id: str, accepted: bool) -> None:
        if share.asynchronous:
            self._drop_tasks(share, client_id)
            if not share.closed.is_set():
                self._dispatch_async(share, client_id)
            return
        share.settled.add(client_id)
        self._check_close(share)

    def _check_close(self, share: Share) -> None:
        if share.closed.is_set() or share.asynchronous:
            return
        snapshot = ShareSnapshot(selected=len(share.tasks), accepted=share.accepted,
                                 settled=len(share.settled), buffer=share.buffer,
                                 now=time.monotonic(), deadline=share.deadline,
                                 round_accepted=share.round_accepted)
        try:
            decision = share.strategy.should_close(snapshot)
        except Exception:  # noqa: BLE001 - a broken strategy cannot keep a round open
            log.exception("strategy %s failed in should_close", type(share.strategy).__name__)
            decision = CloseReason.DEADLINE if snapshot.now >= snapshot.deadline \
                else CloseReason.WAITING
        if decision is not CloseReason.WAITING:
            self._close(share, CloseReason(decision).value)

    def _close(self, share: Share, reason: str) -> None:
        share.close_reason = reason
        share.closed.set()

    async def _claim(self, share: Share, client_id: str) -> bool:
        """A slot among a buffered round's first K updates, counted across combiners."""
        if self.claimer is None:  # a combiner on its own counts for itself
            granted = share.accepted < share.buffer
            share.round_accepted = share.accepted + int(granted)
            return granted
        try:
            total = await self.claimer(share.session_id, share.round, share.attempt, client_id)
        except Exception as exc:  # noqa: BLE001 - no controller to ask: the round reruns
            log.warning("cannot claim a buffer slot for round %s: %s", share.round, exc)
            return False
        share.round_accepted = max(share.round_accepted, total)
        return total > 0

    def buffer_full(self, session_id: str, round_: int, attempt: int) -> None:
        """The controller says a buffered round has its first K updates: close the share."""
        share = self.share
        if share is not None and not share.asynchronous and share.session_id == session_id \
                and share.round == round_ and share.attempt == attempt:
            share.round_accepted = max(share.round_accepted, share.buffer)
            self._check_close(share)

    # ----------------------------------------------------------------- intake

    async def push_update(self, header: UpdateHeader,
                          chunks: AsyncIterator[tuple[bytes, int]]) -> tuple[bool, str]:
        """Receive, check and fold one update (``fedray.actors.combiner.intake``)."""
        return await self.intake.push(header, chunks)

    def push_validation(self, report: ValidationReport) -> tuple[bool, str]:
        try:
            share = self._share_for(report.session_id, TaskKind.VALIDATE)
            share.admit(report.client_id, report.task_id, report.session_id, report.round,
                        report.model_id, TaskKind.VALIDATE)
            if report.num_examples > share.limits.max_examples:  # it weighs the round's means
                raise UpdateRejected("too_many_examples", f"num_examples {report.num_examples}"
                                     f" is over session.max_examples_per_update "
                                     f"({share.limits.max_examples})")
        except UpdateRejected as exc:
            return False, str(exc)
        if report.client_id in share.gone:  # marked offline, but answered: once, not again
            share.gone.discard(report.client_id)
            share.failed -= 1
        share.validations.append(report)
        share.accepted += 1
        self._settle(share, report.client_id, True)
        return True, "accepted"

    def task_failed(self, client_id: str, task_id: str, message: str,
                    error_class: str = "") -> None:
        """A client reported that it could not run a task; stop waiting for it."""
        share = self.share
        entry = share.tasks.get(task_id) if share is not None else None
        if share is None or entry is None or entry.client_id != client_id \
                or client_id in share.settled:
            return
        why = f"{error_class}: {message}" if error_class else message
        share.failed += 1
        share.failures[client_id] = why[:500]
        self.listener.event("error", f"client {client_id} failed task {task_id[:12]}: {why}",
                            client_id=client_id, session_id=share.session_id,
                            round=share.round, error_class=error_class)
        self._settle(share, client_id, False)
