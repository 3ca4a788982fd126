"""Starting a grpc.aio server inside an actor's event loop, with token authentication.

Every RPC passes ``TokenAuth`` first: when the federation has a token, a call without
``authorization: Bearer <token>`` metadata is refused with UNAUTHENTICATED before any
handler runs.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

from fedray.wire import AUTH_HEADER

SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str | None, on_denied: Callable[[str], None] | None = None) -> None:
        self._expected = f"Bearer {token}".encode() if token else None
        self._on_denied = on_denied

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if self._expected is None or handler is None:
            return handler
        given = dict(details.invocation_metadata or ()).get(AUTH_HEADER, "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return handler
        if self._on_denied is not None:
            self._on_denied(details.method)
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong federation token")

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong federation token")
        yield  # pragma: no cover - makes this an async generator

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
    }
    factory = kinds.get((handler.request_streaming, handler.response_streaming))
    if factory is not None:
        return factory(deny, handler.request_deserializer, handler.response_serializer)
    factory = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
               else grpc.unary_stream_rpc_method_handler)
    return factory(deny_stream, handler.request_deserializer, handler.response_serializer)


async def start_server(register: Callable[[grpc.aio.Server], None], host: str, port: int,
                       token: str | None, on_denied: Callable[[str], None] | None = None,
                       ) -> tuple[grpc.aio.Server, int]:
    """Bind ``host:port`` (0 = any free port) and return the server and its real port."""
    server = grpc.aio.server(interceptors=[TokenAuth(token, on_denied)], options=SERVER_OPTIONS)
    register(server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (is the port taken?)")
    await server.start()
    return server, bound
