"""The last line of every gRPC servicer: an exception that no handler expected.

A handler answers what it knows about (a refused update, an unknown model) with a status
of its own. Anything else that escapes it is a bug, and gRPC's default answer would be
UNKNOWN with the exception's text, which can name files, paths or another client's data.
``guard_rpcs`` wraps every RPC method of a servicer class (unary and streaming, async
functions and async generators) so that such an exception is instead

* logged with its traceback on the server,
* recorded as an error event through the servicer's callback (a combiner's listener, the
  controller's observer), throttled by an ``EventThrottle`` so that a client repeating
  the same call cannot flood tracking, and
* answered with INTERNAL and one stable public line that carries a short random ref,
  also in the event and the log, for the operator to look up: never the exception's
  text nor its traceback.

gRPC's own abort (``context.abort``: the handler chose a status) and cancellation pass
through untouched, and so does a request stream's message that is not protobuf: gRPC
parses those while the handler reads them, and its own answer (UNKNOWN, "Error parsing
message ...") is about the client's bytes, not a bug here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import secrets
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from fedray.bridge.limits import EventThrottle

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 300  # of the exception's first line, in the event's message
MAX_TRACEBACK_CHARS = 4000  # the end of the traceback, in the event's data
PASS_THROUGH = (grpc.aio.AbortError, asyncio.CancelledError, DecodeError)
GUARDED = "__fedray_boundary__"  # set on each wrapped method

S = TypeVar("S", bound=type)


class EventSink(Protocol):
    """Where a servicer's events go: ``CombinerListener.event``, ``TrackingObserver.event``."""

    def __call__(self, level: str, message: str, **data: Any) -> None: ...


def log_event(level: str, message: str, **data: Any) -> None:
    """The sink of a servicer built without one (tests): the log only."""
    log.log(logging.getLevelName(level.upper()), message)


class Boundary:
    """What one servicer does with an unexpected exception; ``where`` names the server in
    the public message (``combiner combiner-0``, ``the gateway``)."""

    def __init__(self, where: str, on_event: EventSink = log_event,
                 throttle: EventThrottle | None = None) -> None:
        self.where = where
        self.on_event = on_event
        self.throttle = throttle or EventThrottle()

    def public_message(self, ref: str) -> str:
        return (f"internal error in {self.where} (ref {ref}); the federation's events hold "
                "the details")

    def report(self, method: str, exc: Exception, peer: str = "") -> str:
        """Log ``exc`` and record it as an error event (unless throttled); return its ref."""
        ref = secrets.token_hex(4)
        name = type(exc).__name__
        record, suppressed = self.throttle.allow()
        if not record:  # the traceback went to the log with an earlier event
            log.error("internal error in %s, %s (ref %s): %s (event throttled)", self.where,
                      method, ref, name)
            return ref
        log.error("internal error in %s, %s (ref %s)", self.where, method, ref, exc_info=exc)
        tail = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:]
        try:
            self.on_event("error", f"internal error in {self.where}, {method} (ref {ref}): "
                          f"{name}: {_first_line(exc)}", reason="internal_error", ref=ref,
                          method=method, error_class=name, peer=peer, traceback=tail,
                          suppressed=suppressed)
        except Exception:  # noqa: BLE001 - reporting a bug must not become a second one
            log.exception("could not record the event of ref %s", ref)
        return ref

    async def fail(self, context: grpc.aio.ServicerContext, method: str,
                   exc: Exception) -> NoReturn:
        """End the call with INTERNAL and the public message of ``exc``'s ref."""
        ref = self.report(method, exc, _peer(context))
        await context.abort(grpc.StatusCode.INTERNAL, self.public_message(ref))
        raise AssertionError("context.abort returned")  # pragma: no cover - abort raises


def guard_rpcs(cls: S) -> S:
    """Wrap each RPC method ``cls`` implements (those of its generated ``*_pb2_grpc``
    base) in the ``Boundary`` its instances keep as ``self.boundary``."""
    rpcs = {name for base in cls.__mro__[1:] if base.__module__.endswith("_pb2_grpc")
            for name, value in vars(base).items()
            if callable(value) and not name.startswith("_")}
    for name in sorted(rpcs):
        method = getattr(cls, name)
        if method.__module__.endswith("_pb2_grpc"):
            continue  # not implemented: gRPC's own UNIMPLEMENTED
        setattr(cls, name, guarded(method))
    return cls


def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (an async RPC method of a servicer with a ``boundary``) behind it."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async with contextlib.aclosing(method(self, request, context)) as items:
                    async for item in items:
                        yield item
            except PASS_THROUGH:
                raise
            except Exception as exc:  # noqa: BLE001 - the boundary: every bug ends here
                await self.boundary.fail(context, name, exc)

        setattr(stream, GUARDED, True)
        return stream
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def unary(self, request, context):
            try:
                return await method(self, request, context)
            except PASS_THROUGH:
                raise
            except Exception as exc:  # noqa: BLE001 - the boundary: every bug ends here
                await self.boundary.fail(context, name, exc)

        setattr(unary, GUARDED, True)
        return unary
    raise TypeError(f"{method.__qualname__}: an RPC method must be async to be guarded")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:MAX_DETAIL_CHARS] if text else ""


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:  # noqa: BLE001 - a context without a peer (tests, a dead call)
        return ""
