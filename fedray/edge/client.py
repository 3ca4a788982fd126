"""The edge client: dials out to the gateway and a combiner, runs tasks, reconnects.

An asyncio core, so one process can host many clients (the benchmark runs hundreds).
It never listens on a port and never imports Ray, pymongo or minio. User code (a Python
callback or a compute package) runs in a worker thread, so heartbeats keep flowing while
it trains.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.tls import ClientTls
from fedray.bridge.wire import auth_metadata, task_from_proto, to_struct
from fedray.edge.downloads import (
    DEFAULT_MAX_MODEL_MB,
    DEFAULT_MAX_PACKAGE_MB,
    MiB,
    fetch_model,
    fetch_package,
)
from fedray.edge.workers import RemotePackageWorker, Worker
from fedray.errors import AuthError, ConfigError, FedrayError, PackageError, TransportError
from fedray.messages import Task, TaskKind, attrs_problem
from fedray.packages.archive import is_sha256
from fedray.packages.run import default_cache_dir

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]
FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
MAX_HEARTBEAT_MISSES = 3
HEARTBEAT_BOUNDS_S = (0.5, 60.0)  # what a combiner's heartbeat interval is clamped to
TLS_FAILURES_BEFORE_GIVING_UP = 3  # the same TLS mistake this often in a row ends the client
MAX_FAILURE_CHARS = 300  # the one line a failed task sends to the combiner
MAX_SHARED_TRACEBACK_CHARS = 1500  # the end of the traceback, with --share-tracebacks


def check_attrs(attrs: dict[str, str]) -> dict[str, str]:
    """What a client says about itself (``site=eu``); a bad one is refused here, by name."""
    problem = attrs_problem(attrs)
    if problem:
        raise ConfigError(f"--attr {problem}")
    return dict(attrs)


@dataclass(frozen=True)
class EdgeSettings:
    gateway: str
    name: str
    token: str | None = field(default=None, repr=False)  # a bearer secret: never in logs
    heartbeat_s: float = 2.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 15.0
    cached_models: int = 2
    version: str = "fedray-0.1"
    tls: ClientTls | None = None  # None: plaintext; else verify the servers' certificates
    attrs: dict[str, str] = field(default_factory=dict)  # sent with every Join
    max_model_bytes: int = DEFAULT_MAX_MODEL_MB * MiB  # whatever a task announces
    max_package_bytes: int = DEFAULT_MAX_PACKAGE_MB * MiB
    share_tracebacks: bool = False  # send failed tasks' tracebacks (they name local files)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attrs", check_attrs(self.attrs))


class ModelCache:
    """Models by id; an entry is only ever stored after its sha256 matched the id."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, memoryview] = OrderedDict()

    def get(self, model_id: str) -> memoryview | None:
        data = self._items.get(model_id)
        if data is not None:
            self._items.move_to_end(model_id)
        return data

    def put(self, model_id: str, data: memoryview) -> None:
        self._items[model_id] = data
        while len(self._items) > self.size:
            self._items.popitem(last=False)


class EdgeRunner:
    """One client's connection loop. ``run`` returns only when ``stop`` is set."""

    def __init__(self, worker: Worker, settings: EdgeSettings,
                 say: Callable[[str], None] | None = None) -> None:
        self.worker = worker
        self.settings = settings
        self.say = say or (lambda line: print(line, flush=True))
        self.cache = ModelCache(settings.cached_models)
        self.metadata = auth_metadata(settings.token, settings.name)
        self.client_id = ""
        self.combiner = ""
        self.tasks_done = 0
        self.target = f"gateway {settings.gateway}"  # what we are talking to, for messages
        self.joined = False  # in this attempt; a failure after joining is not a TLS mistake
        self.stop = asyncio.Event()
        self._told_identity = ""
        self._events: set[asyncio.Future] = set()  # progress events on their way

    def _line(self, text: str) -> None:
        self.say(f"[{self.settings.name}] {text}")

    async def run(self) -> None:
        """Serve until ``stop``; a wrong token, or the same TLS mistake a few times in a
        row, ends it with an error (retrying would not fix either)."""
        backoff = self.settings.backoff_initial_s
        mistake, streak = None, 0
        while not self.stop.is_set():
            self.joined = False
            try:
                await self._session()
                backoff, mistake, streak = self.settings.backoff_initial_s, None, 0
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL:
                    raise AuthError(f"{self.settings.name}: {exc.details()} (check --token)") from None
                why, tls_mistake = self._why(exc.details() or "")
                if tls_mistake and not self.joined:
                    streak = streak + 1 if (self.target, why) == mistake else 1
                    mistake = (self.target, why)
                    if streak >= TLS_FAILURES_BEFORE_GIVING_UP:
                        raise TransportError(f"{self.settings.name}: {self.target}: {why} "
                                             f"({streak} times in a row; giving up)") from None
                else:
                    mistake, streak = None, 0
                self._line(f"{self.target}: {exc.code().name.lower()} ({why}); "
                           f"retrying in {backoff:.1f}s")
            if self.stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self.settings.backoff_max_s)

    def _why(self, details: str) -> tuple[str, bool]:
        """The useful end of a connection error, and whether it is a TLS mistake (with a
        hint at the option to change) that retrying cannot fix."""
        tls = self.settings.tls
        if "CERTIFICATE_VERIFY_FAILED" in details or "Hostname Verification" in details:
            return "TLS: the server's certificate is not trusted; check --ca / --tls-server-name", True
        if "WRONG_VERSION_NUMBER" in details:
            return "TLS handshake failed: the server speaks plaintext; drop --ca / --tls", True
        if "handshake" in details.lower():
            return "TLS handshake failed", True
        why = details.rsplit(": ", 1)[-1]
        if why == "Socket closed" and tls is None:
            return f"{why}; if the federation uses TLS, pass --ca", True
        if why == "Socket closed" and tls.cert is None:
            return f"{why}; if the federation asks for client certificates, pass --cert/--key", True
        return why, False

    def _channel(self, target: str) -> grpc.aio.Channel:
        tls = self.settings.tls
        if tls is None:
            return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(target, tls.credentials(),
                                       options=CHANNEL_OPTIONS + tls.options())

    async def _assign(self) -> pb.Assignment:
        async with self._channel(self.settings.gateway) as ch:
            return await pb_grpc.GatewayStub(ch).Assign(
                pb.AssignRequest(name=self.settings.name, version=self.settings.version,
                                 previous_combiner=self.combiner),
                metadata=self.metadata, timeout=15)

    async def _session(self) -> None:
        """Join one combiner and serve its tasks until the stream ends (``joined`` says
        whether it got that far)."""
        self.target = f"gateway {self.settings.gateway}"
        assignment = await self._assign()
        self.client_id, self.combiner = assignment.client_id, assignment.combiner
        self.target = f"{assignment.combiner} at {assignment.address}"
        async with self._channel(assignment.address) as ch:
            stub = pb_grpc.CombinerStub(ch)
            stream = stub.Join(pb.JoinRequest(client_id=self.client_id, name=self.settings.name,
                                              version=self.settings.version,
                                              attrs=self.settings.attrs), metadata=self.metadata)
            await stream.wait_for_connection()
            self.joined = True
            self._line(f"connected to {assignment.combiner} at {assignment.address}")
            self._tell_identity()
            beats = asyncio.ensure_future(self._heartbeats(stub, stream))
            stopper = asyncio.ensure_future(self.stop.wait())
            try:
                reader = aiter(stream)
                while True:
                    nxt = asyncio.ensure_future(anext(reader, None))
                    done, _ = await asyncio.wait({nxt, stopper, beats},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if nxt not in done:
                        nxt.cancel()
                        if beats in done and beats.exception() is not None:
                            raise beats.exception()
                        return
                    msg = nxt.result()
                    if msg is None:
                        self._line(f"{assignment.combiner} closed the task stream")
                        return
                    await self._handle(stub, task_from_proto(msg))
            finally:
                beats.cancel()
                stopper.cancel()
                stream.cancel()

    async def _heartbeats(self, stub: pb_grpc.CombinerStub, stream) -> None:
        """Beat until the combiner forgets us; a few slow or lost beats are not fatal."""
        interval = self.settings.heartbeat_s
        misses = 0
        while True:
            try:
                reply = await stub.Heartbeat(pb.HeartbeatRequest(client_id=self.client_id),
                                             metadata=self.metadata, timeout=max(interval * 3, 5))
            except grpc.aio.AioRpcError as exc:
                misses += 1
                if exc.code() in FATAL or misses >= MAX_HEARTBEAT_MISSES:
                    raise
                await asyncio.sleep(interval)
                continue
            misses = 0
            if not reply.known:
                self._line(f"{self.combiner} no longer knows this client; joining again")
                return
            interval = heartbeat_interval(reply.interval_s, interval)
            await asyncio.sleep(interval)

    def _tell_identity(self) -> None:
        """With a per-client token the server uses the token's name, whatever --name says."""
        if self.client_id and self.client_id != self.settings.name \
                and self.client_id != self._told_identity:
            self._told_identity = self.client_id
            self._line(f"connected as {self.client_id} (the name of your token); "
                       f"--name {self.settings.name} is ignored")

    async def _install_package(self, stub: pb_grpc.CombinerStub, task: Task) -> None:
        """Download the session's compute package, verify it, unpack it, and use it."""
        sha256 = task.package_sha256
        if not is_sha256(sha256):  # it names a file below: nothing else may
            raise PackageError(f"the task's package_sha256 {sha256[:80]!r} is not a sha256 "
                               "(64 lowercase hex characters)")
        self.worker.allow(sha256)
        cache = self.worker.cache_dir or default_cache_dir()
        archive = cache / "archives" / f"{sha256}.tgz"
        if not archive.is_file():
            await fetch_package(stub, self.metadata, self.client_id, sha256, task.package_size,
                                self.settings.max_package_bytes, archive)
        try:
            name = await asyncio.to_thread(self.worker.install, sha256, archive)
        except PackageError:
            archive.unlink(missing_ok=True)  # fetch it afresh next time
            raise
        self._line(f"installed compute package {name!r} (sha256 {sha256[:12]})")

    async def _fetch(self, stub: pb_grpc.CombinerStub, model_id: str, size: int = 0) -> memoryview:
        cached = self.cache.get(model_id)
        if cached is not None:
            return cached
        data = await fetch_model(stub, self.metadata, self.client_id, model_id, size,
                                 self.settings.max_model_bytes)
        if await asyncio.to_thread(_sha256, data) != model_id:
            raise TransportError(f"model {model_id[:12]} arrived corrupted (checksum mismatch)")
        self.cache.put(model_id, data)
        return data

    async def _handle(self, stub: pb_grpc.CombinerStub, task: Task) -> None:
        what = f"round {task.round} {task.kind.value}"
        started = time.perf_counter()
        try:
            if isinstance(self.worker, RemotePackageWorker) and task.package_sha256 \
                    and task.package_sha256 != self.worker.sha256:
                await self._install_package(stub, task)
            prepare = getattr(self.worker, "prepare", None)
            if prepare is not None:  # a package's python env: built once, then a no-op
                await asyncio.to_thread(prepare, self._progress(stub))
            model = await self._fetch(stub, task.model_id, task.model_size)
            if task.kind is TaskKind.TRAIN:
                data, examples, metrics = await asyncio.to_thread(self.worker.train, model, task.config)
                digest = await asyncio.to_thread(_sha256, data)
                reply = await stub.PushUpdate(self._parts(task, data, digest, examples, metrics),
                                              metadata=self.metadata)
                outcome = "update accepted" if reply.accepted else f"update REJECTED: {reply.reason}"
            else:
                examples, metrics = await asyncio.to_thread(self.worker.validate, model, task.config)
                await stub.PushValidation(pb.ValidationReport(
                    client_id=self.client_id, task_id=task.task_id, session_id=task.session_id,
                    round=task.round, model_id=task.model_id, num_examples=examples,
                    metrics=to_struct(metrics)), metadata=self.metadata)
                outcome = "validation sent"
        except grpc.aio.AioRpcError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code failed: report it, stay up
            await self._report_failure(stub, task, what, exc)
            return
        self.tasks_done += 1
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
        self._line(f"{what} on model {task.model_id[:10]}: {examples} examples, "
                   f"{time.perf_counter() - started:.2f}s{', ' + shown if shown else ''} -> {outcome}")

    def _progress(self, stub: pb_grpc.CombinerStub) -> Callable[[str], None]:
        """A line in this client's output and an info event at the combiner; callable from
        a worker thread (building a package's python env reports through it)."""
        loop = asyncio.get_running_loop()

        def say(message: str) -> None:
            self._line(message)
            loop.call_soon_threadsafe(self._send_event, stub, message)

        return say

    def _send_event(self, stub: pb_grpc.CombinerStub, message: str) -> None:
        task = asyncio.ensure_future(self._push_event(stub, message))
        self._events.add(task)
        task.add_done_callback(self._events.discard)

    async def _push_event(self, stub: pb_grpc.CombinerStub, message: str) -> None:
        try:
            await stub.PushEvent(pb.EventReport(client_id=self.client_id, level="info",
                                                message=message[:MAX_FAILURE_CHARS]),
                                 metadata=self.metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:  # progress only: the task goes on without it
            log.info("progress event not sent: %s", exc.code().name)

    async def _report_failure(self, stub: pb_grpc.CombinerStub, task: Task, what: str,
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
        await stub.PushEvent(pb.EventReport(client_id=self.client_id, level="error",
                                            message=message, task_id=task.task_id,
                                            error_class=type(exc).__name__),
                             metadata=self.metadata)

    async def _parts(self, task: Task, data: bytes, digest: str, examples: int, metrics: dict):
        yield pb.UpdatePart(header=pb.UpdateHeader(
            client_id=self.client_id, task_id=task.task_id, session_id=task.session_id,
            round=task.round, model_id=task.model_id, num_examples=examples,
            metrics=to_struct(metrics), size=len(data), sha256=digest))
        view = memoryview(data)
        for offset in range(0, len(data), CHUNK):
            yield pb.UpdatePart(chunk=pb.Chunk(data=bytes(view[offset : offset + CHUNK]),
                                               offset=offset, total_size=len(data)))


def heartbeat_interval(sent: float, current: float) -> float:
    """The combiner's interval within ``HEARTBEAT_BOUNDS_S``: a tiny one would beat in a
    busy loop, a huge one would let the combiner take us for dead. Unset (0) or not a
    number keeps ``current``."""
    if not sent or math.isnan(sent):
        return current
    low, high = HEARTBEAT_BOUNDS_S
    return min(max(sent, low), high)


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()
