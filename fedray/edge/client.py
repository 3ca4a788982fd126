"""The edge client: dials out to the gateway and a combiner, runs tasks, reconnects.

An asyncio core, so one process can host many clients (the benchmark runs hundreds).
It never listens on a port and never imports Ray, pymongo or minio. This module is the
connection: the gateway's assignment, the task stream, heartbeats, and reconnecting with
backoff (a wrong token or a repeated TLS mistake ends it, with a hint). What a task runs
is ``fedray.edge.tasks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from fedray.bridge.addresses import is_loopback_target
from fedray.bridge.identity import CallSigner
from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.tls import ClientTls
from fedray.bridge.wire import REJOIN_HEADER, auth_metadata, task_from_proto
from fedray.edge.diagnosis import (
    DOWN,
    MISTAKE,
    SPEAKS_PLAINTEXT,
    UNTRUSTED,
    WRONG_SERVICE,
    diagnose,
)
from fedray.edge.downloads import (
    DEFAULT_MAX_MODEL_MB,
    DEFAULT_MAX_PACKAGE_MB,
    MiB,
)
from fedray.edge.tasks import Link, TaskRunner
from fedray.edge.workers import Worker
from fedray.errors import (
    AuthError,
    ConfigError,
    TransportError,
    UnknownTaskKind,
)
from fedray.messages import attrs_problem

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    # Each client its own connection: gRPC would otherwise share one between every channel
    # of a process to the same server (its global subchannel pool), and a combiner admits
    # at most combiners.max_clients_per_connection ids per connection (a swarm of clients
    # in one process stopped at 256 per combiner).
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]
FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# A token the servers have not read yet (created a moment ago) is refused until their next
# read, within a second of the refusal (the gateway's, then a combiner's): a refusal is
# tried again every AUTH_RETRY_S for AUTH_PATIENCE_S before the client gives up.
AUTH_RETRY_S, AUTH_PATIENCE_S = 0.5, 3.0
MAX_HEARTBEAT_MISSES = 3
HEARTBEAT_BOUNDS_S = (0.5, 60.0)  # what a combiner's heartbeat interval is clamped to
TLS_FAILURES_BEFORE_GIVING_UP = 3  # the same setting mistake this often in a row ends it
QUIET_REMINDER_S = 600.0  # while the federation is down, a line this often
# What a client says when its combiner sends it back to the gateway, by the rejoin reason.
MOVED_BECAUSE = {"drain": "left the tier (drained) and moved this client",
                 "": "moved this client to even the load"}
# A client its combiner moved (to even the load) asks the gateway again after this many
# times backoff_initial_s, drawn uniformly: moved clients never come back in step.
MOVED_PAUSE = (0.5, 2.0)


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
    # ...and at most this many bytes of them (the newest always stays): a model over half
    # of it is held once between rounds (the old copy goes before the new one comes).
    cache_max_bytes: int = 64 * MiB
    version: str = "fedray-0.1"
    tls: ClientTls | None = None  # None: plaintext; else verify the servers' certificates
    attrs: dict[str, str] = field(default_factory=dict)  # sent with every Join
    max_model_bytes: int = DEFAULT_MAX_MODEL_MB * MiB  # whatever a task announces
    max_package_bytes: int = DEFAULT_MAX_PACKAGE_MB * MiB
    share_tracebacks: bool = False  # send failed tasks' tracebacks (they name local files)
    client_halves: tuple[str, ...] = ()  # modules whose client halves may run (fedray.* may)
    signer: CallSigner | None = field(default=None, repr=False)  # a key pair's signed calls
    ca_from_credentials: bool = False  # TLS came with the credentials: an untrusted server
    # is another federation's, and a loopback one that speaks plaintext is dialed so (a
    # federation bound to loopback serves no TLS)
    insecure: bool = False  # may send credentials over plaintext off loopback

    def __post_init__(self) -> None:
        object.__setattr__(self, "attrs", check_attrs(self.attrs))


class EdgeRunner:
    """One client's connection loop. ``run`` returns only when ``stop`` is set."""

    def __init__(self, worker: Worker, settings: EdgeSettings,
                 say: Callable[[str], None] | None = None) -> None:
        self.worker = worker
        self.settings = settings
        self.say = say or (lambda line: print(line, flush=True))
        self._static = auth_metadata(None if settings.signer else settings.token, settings.name)
        self._plaintext = False  # a loopback server turned out to speak plaintext
        self.client_id = ""
        self.combiner = ""
        self.target = f"gateway {settings.gateway}"  # what we are talking to, for messages
        self.joined = False  # in this attempt; a failure after joining is not a TLS mistake
        self.moved = False  # the last stream ended because its combiner sent us elsewhere
        self.was_connected = False  # ever joined a combiner
        self.stop = asyncio.Event()
        self._told_identity = ""
        self.tasks = TaskRunner(worker, settings, self._line, self.say)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of a call made now: the token, or headers signed for this window."""
        signer = self.settings.signer
        return self._static + (signer.metadata() if signer is not None else ())

    @property
    def tasks_done(self) -> int:
        return self.tasks.done

    def _line(self, text: str) -> None:
        self.say(f"[{self.settings.name}] {text}")

    async def run(self) -> None:
        """Serve until ``stop``. A refused credential, a server that is not a gateway, or
        the same setting mistake a few times in a row ends it with an error (retrying
        would not fix them); a federation that is down is waited for, quietly."""
        backoff = self.settings.backoff_initial_s
        mistake, streak, refused_since, down_since = None, 0, None, None
        while not self.stop.is_set():
            self.joined = False
            try:
                await self._session()
                backoff, mistake, streak, refused_since, down_since = (
                    self.settings.backoff_initial_s, None, 0, None, None)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL:
                    now = time.monotonic()
                    refused_since = refused_since or now
                    if exc.code() is not grpc.StatusCode.UNAUTHENTICATED \
                            or not self._may_be_new(exc.details() or "") \
                            or now - refused_since + AUTH_RETRY_S > AUTH_PATIENCE_S:
                        raise AuthError(f"{self.settings.name}: {exc.details()} "
                                        f"({self._credential_hint()})") from None
                    if now == refused_since:
                        self._line(f"{self.target}: refused ({exc.details()}); trying again "
                                   f"for {AUTH_PATIENCE_S:g}s (a new credential is read "
                                   "within a second)")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), AUTH_RETRY_S)
                    continue
                tls = self.settings.tls
                found = diagnose(exc.code().name, exc.details() or "", self._address(),
                                 tls is not None and not self._plaintext,
                                 tls is not None and tls.cert is not None)
                if found.why.startswith(SPEAKS_PLAINTEXT) and not self._plaintext \
                        and self.settings.ca_from_credentials \
                        and is_loopback_target(self._address()):
                    self._plaintext = True
                    self._line(f"{self.target} serves plaintext on loopback; dialing it "
                               "without TLS")
                    continue
                if found.why.startswith(UNTRUSTED) and self.settings.ca_from_credentials:
                    raise TransportError(
                        f"{self.settings.name}: {self.target}: TLS: the server's certificate "
                        "is not signed by the CA in --credentials: they are another "
                        "federation's, or --gateway is not theirs") from None
                if found.action == WRONG_SERVICE:
                    raise TransportError(f"{self.settings.name}: {found.why}") from None
                if found.action == MISTAKE and not self.joined:
                    streak = streak + 1 if (self.target, found.why) == mistake else 1
                    mistake = (self.target, found.why)
                    if streak >= TLS_FAILURES_BEFORE_GIVING_UP:
                        raise TransportError(f"{self.settings.name}: {self.target}: "
                                             f"{found.why} ({streak} times in a row; "
                                             "giving up)") from None
                else:
                    mistake, streak = None, 0
                if found.action == DOWN:
                    down_since = self._waiting(found.why, down_since)
                else:
                    down_since = None
                    self._line(f"{self.target}: {exc.code().name.lower()} ({found.why}); "
                               f"retrying in {backoff:.1f}s")
            if self.stop.is_set():
                break
            pause = self.settings.backoff_initial_s * random.uniform(*MOVED_PAUSE) \
                if self.moved else backoff * random.uniform(0.8, 1.2)
            self.moved = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), pause)
            backoff = min(backoff * 2, self.settings.backoff_max_s)

    def _address(self) -> str:
        return self.target.rsplit(" ", 1)[-1]

    def _waiting(self, why: str, since: float | None) -> float:
        """Say once that the federation is down (and again every ``QUIET_REMINDER_S``);
        a client that was connected says its session ended."""
        now = time.monotonic()
        if since is None:
            self._line(f"the federation is down (its session ended?); waiting for it at "
                       f"{self._address()}, quietly" if self.tasks_done or self.was_connected
                       else f"{why}; waiting for it, quietly")
            return now
        if now - since >= QUIET_REMINDER_S:
            self._line(f"still waiting for the federation at {self._address()}")
            return now
        return since

    def _may_be_new(self, details: str) -> bool:
        """Whether a refusal may be of a credential the servers have not read yet (made a
        moment ago): worth trying again for a few seconds. A refusal that names its reason
        (revoked, expired, another federation's, nothing sent) never fixes itself."""
        if self.settings.signer is not None:
            return "not registered" in details
        return self.settings.token is not None

    def _credential_hint(self) -> str:
        """What to check after a refusal: the token this client sent, or that it sent none."""
        if self.settings.signer is not None:
            return "the federation refused these --credentials; fedray client list shows " \
                   "the keys it knows"
        if self.settings.token is None:
            return "no credential was sent: pass --credentials FILE (from fedray client " \
                   "add) or set $FEDRAY_TOKEN"
        return "check $FEDRAY_TOKEN: it is not a token of this federation, or it was revoked"

    def _channel(self, target: str) -> grpc.aio.Channel:
        tls = self.settings.tls
        if tls is not None and self._plaintext and is_loopback_target(target):
            tls = None
        if tls is None:
            check_plaintext(target, self.settings)
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
            self.joined = self.was_connected = True
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
                        why = str(dict(await stream.trailing_metadata() or ())
                                  .get(REJOIN_HEADER) or "")
                        self.moved = bool(why)
                        self._line(f"{assignment.combiner} {MOVED_BECAUSE.get(why, MOVED_BECAUSE[''])}"
                                   "; asking the gateway again" if self.moved else
                                   f"{assignment.combiner} closed the task stream")
                        return
                    link = Link(stub, lambda: self.metadata, self.client_id)
                    try:
                        task = task_from_proto(msg)
                    except UnknownTaskKind as exc:  # refused, never run as something else
                        await self.tasks.refuse(link, msg, exc)
                        continue
                    await self.tasks.handle(link, task)
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



def check_plaintext(target: str, settings: EdgeSettings) -> None:
    """Refuse to send a credential over plaintext off loopback, unless ``--insecure``."""
    if (settings.token or settings.signer) and not settings.insecure \
            and not is_loopback_target(target):
        what = "signed calls" if settings.signer else "the token"
        raise ConfigError(f"refusing to send {what} to {target} over plaintext (anyone on "
                          "the path could read it): pass --ca (the federation's CA: "
                          "<data_dir>/tls/ca.pem) or --credentials from fedray client add, or "
                          "--insecure if the network is yours")


def heartbeat_interval(sent: float, current: float) -> float:
    """The combiner's interval within ``HEARTBEAT_BOUNDS_S``: a tiny one would beat in a
    busy loop, a huge one would let the combiner take us for dead. Unset (0) or not a
    number keeps ``current``."""
    if not sent or math.isnan(sent):
        return current
    low, high = HEARTBEAT_BOUNDS_S
    return min(max(sent, low), high)


