"""Starting a grpc.aio server inside an actor's event loop, with authentication and TLS.

Every RPC passes ``Gatekeeper`` first, in two steps, so nobody without a valid token
costs the server more than a dictionary lookup:

1. In ``intercept_service``, which gRPC calls with the metadata before any message is
   read, the server's ``AuthGate`` checks the token (a dictionary lookup: it never
   waits). A missing, wrong, expired or revoked credential gets a handler that reads no message at all
   (a request-streaming one that never iterates its requests) and ends the call with
   UNAUTHENTICATED, or RESOURCE_EXHAUSTED once its host has failed too often, whatever
   the method: even UNIMPLEMENTED is only said to a caller with a valid token.
2. For an admitted call, the request deserializer first checks the message's size
   against the method's limit (``ServerLimits.message_limit``: 64 KiB for control RPCs),
   so protobuf never parses an oversized message; then the gate applies the caller's
   rate limit (it needs the peer, which only the call's context has). The call then runs
   with its ``Caller`` in a context variable, and servicers take client ids from
   ``caller_id`` rather than from what a message claims.

``ServerLimits`` also sets gRPC's own bounds: concurrent RPCs per server, streams per
connection, connections per server, and the age and idle time of a connection. With
``ServerTls`` the port only speaks TLS (and asks for client certificates under mutual
TLS); without it, plaintext.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from fedray.bridge.auth import CALLER, AuthGate, Caller, Refused, current_caller
from fedray.bridge.tls import ServerTls
from fedray.config import CombinersConfig
from fedray.errors import ListenError

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's receive limit: an update part (a chunk + header)
CONTROL_MESSAGE_BYTES = 64 * 1024  # every other request: ids, names, metrics, events
LARGE_MESSAGES = frozenset({"/fedray.v1.Combiner/PushUpdate"})
CONNECTION_AGE_GRACE_S = 600.0  # after a connection's age: time for its calls to finish
STREAMS_PER_CLIENT = 4  # a task stream, a heartbeat, a download or upload, one spare
RPC_SLACK = 256  # concurrent RPCs and connections beyond what the clients account for

KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


@dataclass(frozen=True)
class ServerLimits:
    """What one gRPC server (gateway or combiner) admits; ``for_settings`` sizes them for
    a combiner's ``max_clients``. An edge client holds one long-lived task stream, so
    ``max_connection_age_s`` is generous: when it passes, the client's stream ends after
    the grace period and the client reconnects (through the gateway) by itself."""

    max_concurrent_rpcs: int = 2 * 10_000 + RPC_SLACK
    max_streams_per_connection: int = STREAMS_PER_CLIENT * 256 + 16
    max_connections: int = 10_000 + RPC_SLACK
    max_connection_age_s: float = 3600.0
    max_connection_age_grace_s: float = CONNECTION_AGE_GRACE_S
    max_connection_idle_s: float = 300.0
    control_message_bytes: int = CONTROL_MESSAGE_BYTES

    @classmethod
    def for_settings(cls, settings: CombinersConfig, clients: int | None = None) -> ServerLimits:
        """Limits for a server whose callers are up to ``clients`` (default: one combiner's
        ``max_clients``; the gateway serves ``count * max_clients``) edge clients."""
        clients = settings.max_clients if clients is None else clients
        return cls(max_concurrent_rpcs=2 * clients + RPC_SLACK,
                   max_streams_per_connection=STREAMS_PER_CLIENT
                   * settings.max_clients_per_connection + 16,
                   max_connections=clients + RPC_SLACK,
                   max_connection_age_s=settings.max_connection_age_s,
                   max_connection_idle_s=settings.max_connection_idle_s)

    def message_limit(self, method: str) -> int:
        return MAX_MESSAGE_BYTES if method in LARGE_MESSAGES else self.control_message_bytes

    def options(self) -> list[tuple[str, int]]:
        return [*KEEPALIVE_OPTIONS,
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_concurrent_streams", self.max_streams_per_connection),
                ("grpc.max_allowed_incoming_connections", self.max_connections),
                ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace_s * 1000)),
                ("grpc.max_connection_idle_ms", int(self.max_connection_idle_s * 1000))]


class Oversized:
    """What the deserializer hands over instead of parsing a message over its limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit


class Gatekeeper(grpc.aio.ServerInterceptor):
    def __init__(self, gate: AuthGate, limits: ServerLimits) -> None:
        self.gate = gate
        self.limits = limits

    async def intercept_service(self, continuation, details):
        metadata = dict(details.invocation_metadata or ())
        try:
            caller = self.gate.identify(metadata)  # a dictionary lookup: no wait, no slot held
        except Refused as exc:  # UNIMPLEMENTED would tell a scanner what this port serves
            return _refusal(await continuation(details), self.gate, exc, details.method)
        handler = await continuation(details)
        if handler is None:  # an unknown method, asked with a valid token
            return None
        return _guarded(handler, self.gate, caller, metadata, details.method,
                        self.limits.message_limit(details.method))


def _refusal(handler: grpc.RpcMethodHandler | None, gate: AuthGate, refused: Refused,
             method: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call without reading a single request message (for an
    unknown method too: the caller learns nothing but that it is refused). The per-host
    failure limit comes first (``AuthGate.refused``)."""

    async def refuse(context) -> None:
        exc = gate.refused(refused, method, context.peer())
        await context.abort(grpc.StatusCode[exc.code], exc.message)

    if handler is None or handler.response_streaming:
        async def stream_behavior(request_iterator, context):
            await refuse(context)
            yield  # pragma: no cover - abort raises

        return grpc.stream_stream_rpc_method_handler(
            stream_behavior,
            response_serializer=handler.response_serializer if handler is not None else None)

    async def behavior(request_iterator, context):
        await refuse(context)

    return grpc.stream_unary_rpc_method_handler(
        behavior, response_serializer=handler.response_serializer)


def _guarded(handler: grpc.RpcMethodHandler, gate: AuthGate, caller: Caller,
             metadata: dict, method: str, limit: int) -> grpc.RpcMethodHandler:
    """``handler`` behind the caller's rate limit and the method's message limit."""
    kind = (handler.request_streaming, handler.response_streaming)
    deserializer = handler.request_deserializer
    if not handler.request_streaming and deserializer is not None:
        parse = deserializer

        def deserializer(data: bytes):
            return Oversized(len(data), limit) if len(data) > limit else parse(data)

    async def admit(request, context) -> Caller:
        """The caller within its limits, holding a call-in-flight slot (``gate.in_flight``)."""
        try:
            admitted = gate.limit(caller, metadata, method, context.peer())
        except Refused as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        if isinstance(request, Oversized):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"a {method.rsplit('/', 1)[-1]} request is at most "
                                f"{request.limit} bytes, got {request.size}")
        full = gate.in_flight.enter(admitted.slots)
        if full is not None:
            cap = dict(admitted.slots)[full]
            gate.report("warning", f"refused {method} from {context.peer()}: {cap} calls of "
                        "that client are running", reason="calls_in_flight", method=method,
                        peer=context.peer())
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"at most {cap} calls of one client may run at once")
        CALLER.set(admitted)  # each RPC runs in its own task, so this stays with this call
        return admitted

    if handler.response_streaming:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def behavior(request, context):
            admitted = await admit(request, context)
            try:
                async for item in inner(request, context):
                    yield item
            finally:
                gate.in_flight.leave(admitted.slots)
    else:
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def behavior(request, context):
            admitted = await admit(request, context)
            try:
                return await inner(request, context)
            finally:
                gate.in_flight.leave(admitted.slots)

    return _FACTORIES[kind](behavior, request_deserializer=deserializer,
                            response_serializer=handler.response_serializer)


async def caller_id(context, claimed: str, claimed_name: str = "") -> str:
    """The client id an RPC acts for: its token's name, else the id it claims (refused
    with PERMISSION_DENIED when that id or name belongs to a client with its own token)."""
    try:
        return current_caller().client_id(claimed, claimed_name)
    except Refused as exc:
        await context.abort(grpc.StatusCode[exc.code], exc.message)
        raise  # pragma: no cover - abort raises


async def start_server(register: Callable[[grpc.aio.Server], None], host: str, port: int,
                       gate: AuthGate, tls: ServerTls | None = None,
                       limits: ServerLimits | None = None) -> tuple[grpc.aio.Server, int]:
    """Bind ``host:port`` (0 = any free port) and return the server and its real port.

    The port is ours alone: without ``SO_REUSEPORT`` (gRPC's default on Linux) a second
    federation on the same port fails here, with a ``ListenError``, instead of sharing it.
    """
    limits = limits or ServerLimits()
    await gate.start()
    server = grpc.aio.server(interceptors=[Gatekeeper(gate, limits)],
                             options=[*limits.options(), ("grpc.so_reuseport", 0)],
                             maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    register(server)
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, tls.credentials()) if tls is not None
                 else server.add_insecure_port(address))
    except RuntimeError:  # grpc: "Failed to bind to address ..." and nothing more
        bound = 0
    if bound == 0:
        await gate.close()
        raise _listen_error(host, port)
    await server.start()
    return server, bound


def _listen_error(host: str, port: int) -> ListenError:
    """Why ``host:port`` cannot be bound, found by binding it the way gRPC does."""
    address = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return ListenError(address, f"cannot resolve {host!r} ({exc.strerror})")
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return ListenError(address, "the port is in use", in_use=True)
                if exc.errno == errno.EADDRNOTAVAIL:
                    return ListenError(address, f"{host} is not an address of this machine")
                if exc.errno == errno.EACCES:
                    return ListenError(address, "permission denied (a port below 1024?)")
                return ListenError(address, exc.strerror or str(exc))
    return ListenError(address, "gRPC could not bind it (set GRPC_VERBOSITY=debug for why)")
