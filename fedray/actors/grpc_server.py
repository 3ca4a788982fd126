"""Starting a grpc.aio server inside an actor's event loop, with authentication and TLS.

Every RPC passes ``Gatekeeper`` first. It asks the server's ``AuthGate``
(``fedray.actors.auth``) about the call's metadata before the handler runs: a missing,
wrong or revoked token ends the call with UNAUTHENTICATED, a caller over its rate with
RESOURCE_EXHAUSTED. An admitted call runs with its ``Caller`` in a context variable, and
servicers take client ids from ``caller_id`` rather than from what a message claims.
With ``ServerTls`` the port only speaks TLS (and asks for client certificates under
mutual TLS); without it, plaintext.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import grpc

from fedray.actors.auth import CALLER, AuthGate, Refused, current_caller
from fedray.errors import ListenError
from fedray.tls import ServerTls

SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class Gatekeeper(grpc.aio.ServerInterceptor):
    def __init__(self, gate: AuthGate) -> None:
        self.gate = gate

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        return _guarded(handler, self.gate, details.method)


def _guarded(handler: grpc.RpcMethodHandler, gate: AuthGate, method: str) -> grpc.RpcMethodHandler:
    """``handler`` behind the gate: nothing of it runs for a refused call."""
    kind = (handler.request_streaming, handler.response_streaming)

    async def admit(context) -> None:
        try:
            caller = await gate.admit(dict(context.invocation_metadata() or ()), method,
                                      context.peer())
        except Refused as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        CALLER.set(caller)  # each RPC runs in its own task, so this stays with this call

    if handler.response_streaming:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def behavior(request, context):
            await admit(context)
            async for item in inner(request, context):
                yield item
    else:
        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def behavior(request, context):
            await admit(context)
            return await inner(request, context)

    return _FACTORIES[kind](behavior, request_deserializer=handler.request_deserializer,
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
                       ) -> tuple[grpc.aio.Server, int]:
    """Bind ``host:port`` (0 = any free port) and return the server and its real port.

    The port is ours alone: without ``SO_REUSEPORT`` (gRPC's default on Linux) a second
    federation on the same port fails here, with a ``ListenError``, instead of sharing it.
    """
    await gate.start()
    server = grpc.aio.server(interceptors=[Gatekeeper(gate)],
                             options=[*SERVER_OPTIONS, ("grpc.so_reuseport", 0)])
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
