"""The combiner's logic: client registry, task dispatch, model serving, update intake.

Pure asyncio; it does not import grpc or Ray. The gRPC servicer turns RPCs into calls on
``CombinerCore`` and the Ray actor wraps it, so tests can drive it in-process. One event
loop serves every client: each connected client is a queue of tasks, not a thread.
Observability plugs in through a ``CombinerListener`` whose failures never stop a round.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedray.aggregators import make_aggregator
from fedray.aggregators.base import Accumulator
from fedray.config import CombinersConfig
from fedray.errors import UpdateRejected
from fedray.messages import (
    RoundResult,
    RoundSpec,
    Task,
    TaskKind,
    UpdateHeader,
    ValidationReport,
)
from fedray.policy import CloseReason, RoundSnapshot, closing_decision
from fedray.serialization import Layout, model_id, read_layout
from fedray.updates import check_update

log = logging.getLogger(__name__)

HEADER_SLACK = 1 << 20  # an update's header may differ a little from the global model's
KEPT_MODELS = 2  # the round's model and the one before, for clients that are a bit late
CLIENT_STATUSES = {"online", "training", "validating"}  # what a heartbeat may report


class CombinerListener(Protocol):
    def event(self, level: str, message: str, **data: Any) -> None: ...
    def client_status(self, client_id: str, name: str, status: str, online: int) -> None: ...
    def round_closed(self, result: RoundResult) -> None: ...


class NullListener:
    def event(self, level: str, message: str, **data: Any) -> None:
        log.log(logging.getLevelName(level.upper()), message)

    def client_status(self, client_id: str, name: str, status: str, online: int) -> None:
        pass

    def round_closed(self, result: RoundResult) -> None:
        pass


@dataclass(eq=False)
class ClientLink:
    client_id: str
    name: str
    queue: asyncio.Queue[Task | None] = field(default_factory=asyncio.Queue)
    last_seen: float = field(default_factory=time.monotonic)
    status: str = "online"


@dataclass(eq=False)
class RoundRun:
    spec: RoundSpec
    model_id: str
    layout: Layout
    model_size: int
    deadline: float  # monotonic
    tasks: dict[str, str]  # task id -> client id
    accumulator: Accumulator | None
    started: float = field(default_factory=time.monotonic)
    settled: set[str] = field(default_factory=set)  # client ids
    gone: set[str] = field(default_factory=set)  # settled because they went offline
    uploading: set[str] = field(default_factory=set)  # one upload per client at a time
    updates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    bytes_in: int = 0
    aggregation_s: float = 0.0
    validations: list[ValidationReport] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""
    fold_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def snapshot(self) -> RoundSnapshot:
        return RoundSnapshot(selected=len(self.tasks), updates=self.updates,
                             settled=len(self.settled), now=time.monotonic(), deadline=self.deadline)


class CombinerCore:
    def __init__(self, name: str, settings: CombinersConfig,
                 listener: CombinerListener | None = None) -> None:
        self.name = name
        self.settings = settings
        self.listener = listener or NullListener()
        self.clients: dict[str, ClientLink] = {}
        self.models: OrderedDict[str, np.ndarray] = OrderedDict()
        self.run: RoundRun | None = None
        self._rounds: dict[tuple, asyncio.Future[RoundResult]] = {}
        self._uploads = asyncio.Semaphore(settings.max_inflight_uploads)
        self.bytes_out = 0
        self._clients_changed = asyncio.Event()
        self.max_update_bytes = int(settings.max_update_mb * 1024 * 1024)

    # ----------------------------------------------------------------- clients

    def online_clients(self) -> list[str]:
        return sorted(cid for cid, link in self.clients.items() if link.status != "offline")

    def accepts_clients(self) -> bool:
        return len(self.online_clients()) < self.settings.max_clients

    def connect(self, client_id: str, name: str) -> ClientLink:
        """Register a client (a reconnect replaces its old stream); it is online from now."""
        old = self.clients.get(client_id)
        if old is not None:
            old.queue.put_nowait(None)
        link = ClientLink(client_id=client_id, name=name)
        self.clients[client_id] = link
        self.listener.client_status(client_id, name, "online", len(self.online_clients()))
        self._membership_changed()
        self.listener.event("info", f"client {name} joined combiner {self.name}", client_id=client_id)
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
        self.listener.event("warning", f"client {link.name} is offline: {why}", client_id=link.client_id)
        run = self.run
        if run and not run.closed.is_set() and link.client_id in run.tasks.values() \
                and link.client_id not in run.settled:
            run.failed += 1
            run.gone.add(link.client_id)
            self._settle(run, link.client_id)

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

    def _keep_model(self, data: np.ndarray, known_id: str = "") -> str:
        mid = known_id or model_id(data)  # the controller hashed it once already
        self.models[mid] = data
        self.models.move_to_end(mid)
        while len(self.models) > KEPT_MODELS:
            self.models.popitem(last=False)
        return mid

    # ----------------------------------------------------------------- rounds

    async def run_round(self, spec: RoundSpec, model: np.ndarray) -> RoundResult:
        """Run this combiner's share of a round; calling twice for one round is harmless."""
        existing = self._rounds.get(spec.key)
        if existing is None:
            existing = asyncio.ensure_future(self._run_round(spec, model))
            self._rounds = {k: v for k, v in self._rounds.items() if k[0] == spec.session_id}
            self._rounds[spec.key] = existing
        return await asyncio.shield(existing)

    async def _run_round(self, spec: RoundSpec, model: np.ndarray) -> RoundResult:
        mid = self._keep_model(model, spec.model_id)
        layout = read_layout(model)
        deadline = time.monotonic() + spec.timeout_s
        tasks = {uuid.uuid4().hex: client for client in spec.clients}
        accumulator = None
        if spec.kind is TaskKind.TRAIN:
            accumulator = make_aggregator(spec.aggregator, spec.aggregator_kwargs).start(layout.spec())
        run = RoundRun(spec=spec, model_id=mid, layout=layout, model_size=model.nbytes,
                       deadline=deadline, tasks=tasks, accumulator=accumulator)
        previous, self.run = self.run, run
        if previous is not None and not previous.closed.is_set():
            self._close(previous, "superseded")
        bytes_out_before = self.bytes_out
        deadline_unix = time.time() + spec.timeout_s
        for task_id, client_id in tasks.items():
            link = self.clients.get(client_id)
            if link is None or link.status == "offline":
                run.failed += 1
                run.settled.add(client_id)
                continue
            link.queue.put_nowait(Task(task_id=task_id, kind=spec.kind, session_id=spec.session_id,
                                       round=spec.round, model_id=mid, model_size=model.nbytes,
                                       config=spec.config, deadline_unix=deadline_unix,
                                       package_sha256=spec.package_sha256))
        self._check_close(run)
        timer = asyncio.get_running_loop().call_later(spec.timeout_s, self._check_close, run)
        try:
            await run.closed.wait()
        finally:
            timer.cancel()
        async with run.fold_lock:  # folds that were already accepted finish first
            partial = accumulator.partial() if accumulator else None
        result = RoundResult(
            combiner=self.name, session_id=spec.session_id, round=spec.round, asked=len(tasks),
            updates=run.updates, rejected=sum(run.rejected.values()), failed=run.failed,
            close_reason=run.close_reason, seconds=time.monotonic() - run.started,
            bytes_in=run.bytes_in, bytes_out=self.bytes_out - bytes_out_before,
            aggregation_s=run.aggregation_s, partial=partial, validations=run.validations,
            rejections=dict(run.rejected))
        self.listener.round_closed(result)
        return result

    def _settle(self, run: RoundRun, client_id: str) -> None:
        run.settled.add(client_id)
        self._check_close(run)

    def _check_close(self, run: RoundRun) -> None:
        if run.closed.is_set():
            return
        decision = closing_decision(run.snapshot())
        if decision is not CloseReason.WAITING:
            self._close(run, decision.value)

    def _close(self, run: RoundRun, reason: str) -> None:
        run.close_reason = reason
        run.closed.set()

    # ----------------------------------------------------------------- intake

    def _task_for(self, run: RoundRun | None, client_id: str, task_id: str, session_id: str,
                  round_: int, mid: str, kind: TaskKind) -> RoundRun:
        """The open round a report belongs to, or UpdateRejected saying why not."""
        if run is None or run.spec.session_id != session_id or run.spec.round != round_ \
                or run.spec.kind is not kind:
            raise UpdateRejected("stale", f"no open {kind.value} round {round_} of session {session_id}")
        if run.tasks.get(task_id) != client_id:
            raise UpdateRejected("unknown_task", f"task {task_id} was not given to {client_id}")
        if client_id in run.settled and client_id not in run.gone:
            raise UpdateRejected("duplicate", f"{client_id} already answered task {task_id}")
        if mid != run.model_id:
            raise UpdateRejected("wrong_model", f"trained from {mid[:12]}, round uses {run.model_id[:12]}")
        if run.closed.is_set():
            raise UpdateRejected("round_closed", f"round {round_} closed ({run.close_reason})")
        return run

    async def push_update(self, header: UpdateHeader,
                          chunks: AsyncIterator[tuple[bytes, int]]) -> tuple[bool, str]:
        """Receive, check and fold one update; returns (accepted, reason).

        Once every byte has arrived, the rest runs shielded from cancellation: a client
        that hangs up during the check cannot leave a folded update uncounted.
        """
        run = self.run
        try:
            run = self._task_for(run, header.client_id, header.task_id, header.session_id,
                                 header.round, header.model_id, TaskKind.TRAIN)
            limit = min(self.max_update_bytes, run.model_size + HEADER_SLACK)
            if header.size > limit:
                raise UpdateRejected("too_large", f"{header.size} bytes, the limit is {limit}")
            if header.num_examples <= 0:
                raise UpdateRejected("no_examples", "num_examples must be positive")
            if header.client_id in run.uploading:  # else one client could take every slot
                raise UpdateRejected("duplicate", "an upload for this task is already running")
            run.uploading.add(header.client_id)
            try:
                async with self._uploads:
                    data = await self._receive_while_open(run, header, chunks)
                    run.bytes_in += len(data)
                    return await asyncio.shield(self._accept(run, data, header))
            finally:
                run.uploading.discard(header.client_id)
        except UpdateRejected as exc:
            self._reject(run, header, exc)
            return False, str(exc)

    async def _accept(self, run: RoundRun, data: np.ndarray, header: UpdateHeader) -> tuple[bool, str]:
        """Check, fold and count a fully received update, all under the round's fold lock."""
        try:
            async with run.fold_lock:
                # Asked again now: while this update waited, its round may have closed (its
                # partial is taken) or a concurrent copy of it may have been folded.
                self._task_for(run, header.client_id, header.task_id, header.session_id,
                               header.round, header.model_id, TaskKind.TRAIN)
                started = time.perf_counter()
                await asyncio.to_thread(self._check_and_fold, run, data, header)
                run.aggregation_s += time.perf_counter() - started
                if header.client_id in run.gone:  # marked offline while uploading, but it delivered
                    run.gone.discard(header.client_id)
                    run.failed -= 1
                run.updates += 1
                self._settle(run, header.client_id)
        except UpdateRejected as exc:
            self._reject(run, header, exc)
            return False, str(exc)
        self.listener.event("info", f"update from {header.client_id} accepted for round {header.round}",
                            client_id=header.client_id, session_id=header.session_id,
                            round=header.round, num_examples=header.num_examples)
        return True, "accepted"

    def _check_and_fold(self, run: RoundRun, data: np.ndarray, header: UpdateHeader) -> None:
        """Runs in a worker thread: hashing and folding never stall the event loop."""
        if header.sha256 and hashlib.sha256(data).hexdigest() != header.sha256:
            raise UpdateRejected("checksum", "payload does not match the header's sha256")
        update = check_update(data, run.layout, self.max_update_bytes)
        assert run.accumulator is not None
        run.accumulator.fold(update, float(header.num_examples), header.metrics)

    async def _receive_while_open(self, run: RoundRun, header: UpdateHeader,
                                  chunks: AsyncIterator[tuple[bytes, int]]) -> np.ndarray:
        """``_receive``, given up when the round closes: an upload that stalls cannot keep
        its buffer and its upload slot past the round it was for."""
        receive = asyncio.ensure_future(self._receive(header, chunks))
        closed = asyncio.ensure_future(run.closed.wait())
        try:
            await asyncio.wait({receive, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            receive.cancel()  # no-op once it finished
        if receive.done() and not receive.cancelled():
            return receive.result()
        raise UpdateRejected("round_closed", f"round {header.round} closed ({run.close_reason}) "
                             "before the upload ended")

    async def _receive(self, header: UpdateHeader, chunks: AsyncIterator[tuple[bytes, int]]) -> np.ndarray:
        data = np.empty(header.size, dtype=np.uint8)  # not zero-filled: every byte is written
        received = 0
        async for chunk, offset in chunks:
            if offset != received:
                raise UpdateRejected("out_of_order", f"chunk at {offset}, expected {received}")
            end = received + len(chunk)
            if end > header.size:
                raise UpdateRejected("too_large", f"more than the announced {header.size} bytes")
            data[received:end] = np.frombuffer(chunk, dtype=np.uint8)
            received = end
        if received != header.size:
            raise UpdateRejected("truncated", f"{received} of {header.size} bytes arrived")
        return data

    def _reject(self, run: RoundRun | None, header: UpdateHeader, exc: UpdateRejected) -> None:
        self.listener.event("warning", f"update from {header.client_id} rejected: {exc}",
                            client_id=header.client_id, session_id=header.session_id,
                            round=header.round, reason=exc.reason)
        if run is None or run is not self.run or run.tasks.get(header.task_id) != header.client_id:
            return  # stale or foreign: nothing of the open round changes
        if exc.reason in {"duplicate", "round_closed"}:
            return
        run.rejected[exc.reason] = run.rejected.get(exc.reason, 0) + 1
        self._settle(run, header.client_id)

    def push_validation(self, report: ValidationReport) -> tuple[bool, str]:
        try:
            run = self._task_for(self.run, report.client_id, report.task_id, report.session_id,
                                 report.round, report.model_id, TaskKind.VALIDATE)
        except UpdateRejected as exc:
            return False, str(exc)
        run.validations.append(report)
        run.updates += 1
        self._settle(run, report.client_id)
        return True, "accepted"

    def task_failed(self, client_id: str, task_id: str, message: str) -> None:
        """A client reported that it could not run a task; stop waiting for it."""
        run = self.run
        if run is None or run.tasks.get(task_id) != client_id or client_id in run.settled:
            return
        run.failed += 1
        self.listener.event("error", f"client {client_id} failed task {task_id}: {message}",
                            client_id=client_id, session_id=run.spec.session_id, round=run.spec.round)
        self._settle(run, client_id)
