"""How an edge client runs one task: the user's code, the strategy's client half, replies.

A task arrives on the client's task stream. For train and validate, the session's compute
package is installed and its python env built (once); the model is fetched by id
(chunked, checked against its sha256, cached); the strategy's client half (if any) sees
the task and its model first (``receive``: it may rebuild the model); the user's code runs in a worker thread (heartbeats keep flowing), the
update goes through the client half's ``encode_update`` and up in 1 MiB chunks. A stage
the strategy declared is answered by its client half's ``run_stage``. A task that fails
is reported to the combiner as one line (the traceback stays in this client's output
unless it shares tracebacks), and the client stays up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.wire import to_struct
from fedray.edge.coding import UpdateCoding
from fedray.edge.downloads import fetch_model, fetch_package
from fedray.edge.halves import ClientHalves
from fedray.edge.workers import RemotePackageWorker, Worker
from fedray.errors import FedrayError, PackageError, TransportError
from fedray.messages import Task, TaskKind
from fedray.packages.archive import is_sha256
from fedray.packages.run import default_cache_dir
from fedray.serialization import Buffer, decode, encode
from fedray.strategies.client_half import ClientHalf

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
MAX_FAILURE_CHARS = 300  # the one line a failed task sends to the combiner
MAX_SHARED_TRACEBACK_CHARS = 1500  # the end of the traceback, with --share-tracebacks


@dataclass(frozen=True)
class Link:
    """This client's session with one combiner: where a task's answers go, as whom."""

    stub: pb_grpc.CombinerStub
    auth: Callable[[], tuple[tuple[str, str], ...]]  # each call's metadata (signed anew)
    client_id: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.auth()


class ModelCache:
    """Models by id; an entry is only ever stored after its sha256 matched the id.

    Bounded by count and by bytes (the newest entry always stays): before a whole model
    is downloaded, older entries go until it fits (``make_room``), so that a client holds
    one copy of a large model between rounds, not two (issue 16: memory). A codec delta
    is rebuilt on its cached parent, which stays until the rebuilt model is stored.
    """

    def __init__(self, size: int, max_bytes: int) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, memoryview] = OrderedDict()

    def get(self, model_id: str) -> memoryview | None:
        data = self._items.get(model_id)
        if data is not None:
            self._items.move_to_end(model_id)
        return data

    def put(self, model_id: str, data: memoryview) -> None:
        self._items[model_id] = data
        self._items.move_to_end(model_id)
        while len(self._items) > 1 and (len(self._items) > self.size
                                        or self.nbytes > self.max_bytes):
            self._items.popitem(last=False)

    def make_room(self, incoming: int) -> None:
        """Drop the oldest entries until ``incoming`` more bytes fit."""
        while self._items and (len(self._items) >= self.size
                               or self.nbytes + incoming > self.max_bytes):
            self._items.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


class TaskRunner:
    """Runs this client's tasks; ``done`` counts the ones that ran to their end."""

    def __init__(self, worker: Worker, settings, line: Callable[[str], None],
                 say: Callable[[str], None]) -> None:
        self.worker = worker
        self.settings = settings  # EdgeSettings
        self._line = line  # a line of this client's output, with its name
        self.say = say  # a raw line (a traceback)
        self.cache = ModelCache(settings.cached_models, settings.cache_max_bytes)
        self.halves = ClientHalves(settings.client_halves)
        self.coding = UpdateCoding()  # session.codec's memory (topk's error feedback)
        self.done = 0
        self._events: set[asyncio.Future] = set()  # progress events on their way

    async def _install_package(self, link: Link, task: Task) -> None:
        """Download the session's compute package, verify it, unpack it, and use it."""
        sha256 = task.package_sha256
        if not is_sha256(sha256):  # it names a file below: nothing else may
            raise PackageError(f"the task's package_sha256 {sha256[:80]!r} is not a sha256 "
                               "(64 lowercase hex characters)")
        self.worker.allow(sha256)
        cache = self.worker.cache_dir or default_cache_dir()
        archive = cache / "archives" / f"{sha256}.tgz"
        if not archive.is_file():
            await fetch_package(link.stub, link.metadata, link.client_id, sha256, task.package_size,
                                self.settings.max_package_bytes, archive)
        try:
            name = await asyncio.to_thread(self.worker.install, sha256, archive)
        except PackageError:
            archive.unlink(missing_ok=True)  # fetch it afresh next time
            raise
        self._line(f"installed compute package {name!r} (sha256 {sha256[:12]})")

    async def _fetch(self, link: Link, model_id: str, size: int = 0,
                     task: Task | None = None) -> memoryview:
        cached = self.cache.get(model_id)
        if cached is not None:
            return cached
        if task is not None and task.delta_from and self.cache.get(task.delta_from) is not None:
            rebuilt = await self._fetch_delta(link, task)
            if rebuilt is not None:
                return rebuilt
        self.cache.make_room(size)
        data = await fetch_model(link.stub, link.metadata, link.client_id, model_id, size,
                                 self.settings.max_model_bytes, checked=True)
        self.cache.put(model_id, data)
        return data

    async def _fetch_delta(self, link: Link, task: Task) -> memoryview | None:
        """The task's model rebuilt from the cached parent and the codec delta the combiner
        serves (session.codec's downlink); None (fetch it whole) when that does not work."""
        parent = self.cache.get(task.delta_from)
        assert parent is not None
        try:
            delta = await fetch_model(link.stub, link.metadata, link.client_id, task.model_id,
                                      task.delta_size, self.settings.max_model_bytes,
                                      delta_from=task.delta_from)
            data = memoryview(await asyncio.to_thread(self.coding.rebuild, task, parent, delta))
        except (FedrayError, ValueError) as exc:
            log.info("model %s not rebuilt from its delta (%s); fetching it whole",
                     task.model_id[:12], exc)
            return None
        if await asyncio.to_thread(_sha256, data) != task.model_id:
            log.info("model %s rebuilt from its delta does not match its id; fetching it "
                     "whole", task.model_id[:12])
            return None
        self.cache.put(task.model_id, data.toreadonly())
        return self.cache.get(task.model_id)

    async def handle(self, link: Link, task: Task) -> None:
        what = f"round {task.round} {task.stage or task.kind.value}"
        started = time.perf_counter()
        examples, metrics = 0, {}
        try:
            half = self.halves.for_task(task)
            if task.kind is not TaskKind.STAGE:
                await self._ready_worker(link, task)
            model = sent = await self._fetch(link, task.model_id, task.model_size, task) \
                if task.model_id else None
            if half is not None:  # what the user's code gets: the model sent, or the half's
                model = await asyncio.to_thread(received, half, task, model)
            if task.kind is TaskKind.TRAIN:
                examples, metrics, outcome = await self._train(link, task, model, half, sent)
            elif task.kind is TaskKind.VALIDATE:
                examples, metrics = await asyncio.to_thread(self.worker.validate, model, task.config)
                await link.stub.PushValidation(pb.ValidationReport(
                    client_id=link.client_id, task_id=task.task_id, session_id=task.session_id,
                    round=task.round, model_id=task.model_id, num_examples=examples,
                    metrics=to_struct(metrics)), metadata=link.metadata)
                outcome = "validation sent"
            else:
                outcome = await self._stage(link, task, model, half)
        except grpc.aio.AioRpcError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code failed: report it, stay up
            await self._report_failure(link, task, what, exc)
            return
        self.done += 1
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
        on = f" on model {task.model_id[:10]}" if task.model_id else ""
        counted = f": {examples} examples" if task.kind is not TaskKind.STAGE else ":"
        self._line(f"{what}{on}{counted}, {time.perf_counter() - started:.2f}s"
                   f"{', ' + shown if shown else ''} -> {outcome}")

    async def _ready_worker(self, link: Link, task: Task) -> None:
        """The session's compute package installed, and its python env built (once)."""
        if isinstance(self.worker, RemotePackageWorker) and task.package_sha256 \
                and task.package_sha256 != self.worker.sha256:
            await self._install_package(link, task)
        prepare = getattr(self.worker, "prepare", None)
        if prepare is not None:  # a package's python env: built once, then a no-op
            await asyncio.to_thread(prepare, self._progress(link))

    async def _train(self, link: Link, task: Task, model: memoryview | None,
                     half: ClientHalf | None, sent: Buffer | None = None,
                     ) -> tuple[int, dict, str]:
        if model is None:
            raise TransportError(f"train task {task.task_id[:12]} names no model")
        data, examples, metrics = await asyncio.to_thread(self.worker.train, model, task.config)
        if half is not None:  # encode, clip, add noise, mask: what the strategy declared
            data = await asyncio.to_thread(encode_update, half, task, data, model, examples)
        if task.codec not in ("", "none"):  # its delta from the round's model, as the codec writes it
            data = await asyncio.to_thread(self.coding.encode, task, data,
                                           sent if sent is not None else model)
        digest = await asyncio.to_thread(_sha256, data)
        reply = await link.stub.PushUpdate(self._parts(link, task, data, digest, examples, metrics),
                                      metadata=link.metadata)
        outcome = "update accepted" if reply.accepted else f"update REJECTED: {reply.reason}"
        return examples, metrics, outcome

    async def _stage(self, link: Link, task: Task, model: memoryview | None,
                     half: ClientHalf | None) -> str:
        """A stage the strategy declared: its client half answers, in a worker thread."""
        if half is None:
            raise FedrayError(f"stage {task.stage!r} is answered by the strategy's client "
                              "half, and the task names none")
        payload = await asyncio.to_thread(
            half.run_stage, task, decode(model) if model is not None else None)
        if not isinstance(payload, bytes | bytearray):
            raise FedrayError(f"{task.client_half}.run_stage must return bytes, got "
                              f"{type(payload).__name__}")
        await link.stub.PushStageReply(pb.StageReply(
            client_id=link.client_id, task_id=task.task_id, session_id=task.session_id,
            round=task.round, stage=task.stage, payload=bytes(payload)), metadata=link.metadata)
        return f"reply sent ({len(payload)} bytes)"

    async def refuse(self, link: Link, msg: pb.Task, exc: Exception) -> None:
        """A task this client cannot even read: said here and to the combiner, not run."""
        self._line(f"task {msg.task_id[:12]} REFUSED: {exc}")
        await link.stub.PushEvent(pb.EventReport(client_id=link.client_id, level="error",
                                            message=str(exc)[:MAX_FAILURE_CHARS],
                                            task_id=msg.task_id,
                                            error_class=type(exc).__name__),
                             metadata=link.metadata)

    def _progress(self, link: Link) -> Callable[[str], None]:
        """A line in this client's output and an info event at the combiner; callable from
        a worker thread (building a package's python env reports through it)."""
        loop = asyncio.get_running_loop()

        def say(message: str) -> None:
            self._line(message)
            loop.call_soon_threadsafe(self._send_event, link, message)

        return say

    def _send_event(self, link: Link, message: str) -> None:
        task = asyncio.ensure_future(self._push_event(link, message))
        self._events.add(task)
        task.add_done_callback(self._events.discard)

    async def _push_event(self, link: Link, message: str) -> None:
        try:
            await link.stub.PushEvent(pb.EventReport(client_id=link.client_id, level="info",
                                                message=message[:MAX_FAILURE_CHARS]),
                                 metadata=link.metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:  # progress only: the task goes on without it
            log.info("progress event not sent: %s", exc.code().name)

    async def _report_failure(self, link: Link, task: Task, what: str,
                              exc: Exception) -> None:
        """Everything goes to this client's own output; the combiner gets the error's class
        and first line only, as its traceback names this machine's files (unless the client
        shares tracebacks)."""
        text = str(exc).strip()
        first = (text.splitlines() or [""])[0][:MAX_FAILURE_CHARS]
        detail = text if isinstance(exc, FedrayError) \
            else "".join(traceback.format_exception(exc)).rstrip()
        self._line(f"{what} FAILED: {type(exc).__name__}: {first}")
        if detail.strip() != first:
            self.say(detail)
        message = first
        if self.settings.share_tracebacks:
            message = f"{first}\n{detail[-MAX_SHARED_TRACEBACK_CHARS:]}"
        await link.stub.PushEvent(pb.EventReport(client_id=link.client_id, level="error",
                                            message=message, task_id=task.task_id,
                                            error_class=type(exc).__name__),
                             metadata=link.metadata)

    async def _parts(self, link: Link, task: Task, data: bytes, digest: str, examples: int,
                     metrics: dict):
        yield pb.UpdatePart(header=pb.UpdateHeader(
            client_id=link.client_id, task_id=task.task_id, session_id=task.session_id,
            round=task.round, model_id=task.model_id, num_examples=examples,
            metrics=to_struct(metrics), size=len(data), sha256=digest))
        view = memoryview(data)
        for offset in range(0, len(data), CHUNK):
            yield pb.UpdatePart(chunk=pb.Chunk(data=bytes(view[offset : offset + CHUNK]),
                                               offset=offset, total_size=len(data)))


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def received(half: ClientHalf, task: Task, model: Buffer | None) -> Buffer | None:
    """The task's model through the client half (``ClientHalf.receive``): the same bytes
    when it returns the model it was given, else its model, encoded."""
    params = decode(model) if model is not None else None
    new = half.receive(task, params)
    if new is params:
        return model
    if not isinstance(new, Mapping):
        raise FedrayError(f"{task.client_half}.receive must return a mapping of names to "
                          f"arrays (or the model it got), got {type(new).__name__}")
    return encode({str(k): np.asarray(v) for k, v in new.items()})


def encode_update(half: ClientHalf, task: Task, data: bytes, model: Buffer,
                  examples: int = 0) -> bytes:
    """The trained update through the client half (``ClientHalf.encode_trained``, by
    default its ``encode_update``), ``examples`` what the user's train reported."""
    new = half.encode_trained(task, decode(data), decode(model), int(examples))
    if not isinstance(new, Mapping):
        raise FedrayError(f"{task.client_half}.encode_update must return a mapping of "
                          f"names to arrays, got {type(new).__name__}")
    return encode({str(k): np.asarray(v) for k, v in new.items()})
