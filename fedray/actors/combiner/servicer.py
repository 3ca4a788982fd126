"""The gRPC face of a combiner: a thin adapter from RPCs to ``CombinerCore`` calls.

Protocol errors from the network are answered with a status and a public message; they
never reach the core as exceptions and never stop the server. An exception that a handler
did not expect ends at ``fedray.bridge.boundary``: INTERNAL with a ref for the client, the
details in an error event. What a client reports about itself (``PushEvent``) goes to
tracking within its ``EventBudget``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import grpc

from fedray.actors.combiner.core import CombinerCore
from fedray.bridge.auth import current_caller
from fedray.bridge.boundary import Boundary, guard_rpcs
from fedray.bridge.limits import EventThrottle, RateLimiter
from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.server import caller_id
from fedray.bridge.wire import (
    REJOIN_HEADER,
    client_values,
    header_from_proto,
    stage_reply_from_proto,
    task_to_proto,
    validation_from_proto,
)
from fedray.errors import UpdateRejected
from fedray.messages import attrs_problem
from fedray.text import printable

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 256  # a client's id and name are kept while it is connected, and tracked
MAX_EVENT_CHARS = 2000  # of a client's event message
_ERROR_CLASS_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,99}")  # a Python class name, or none


EVENT_BURST_S = 30.0  # a client may spend half a minute's event budget at once


class EventBudget:
    """How much of what clients report reaches tracking: ``per_min`` events a minute per
    client (bursts of ``EVENT_BURST_S`` seconds' worth) of at most ``max_bytes`` each.
    Without it one valid client could write 76 KB events 50 times a second, for ever."""

    def __init__(self, per_min: float, max_bytes: int) -> None:
        self.per_min, self.max_bytes = per_min, max_bytes
        self.limiter = RateLimiter(per_min / 60.0, burst_s=EVENT_BURST_S)
        self.throttle = EventThrottle()  # reports of clients over budget

    def allow(self, client_id: str) -> bool:
        return self.limiter.allow(f"events:{client_id}")

    def bound(self, message: str, data: dict[str, Any]) -> tuple[str, dict[str, Any], int]:
        """(message, data, values left out): half the bytes for the message, the rest for
        as many of the data's values as fit (each counted as its JSON)."""
        text = _clip(message, self.max_bytes // 2)
        room = self.max_bytes - len(text.encode())
        kept: dict[str, Any] = {}
        for key, value in data.items():
            size = len(key.encode()) + len(json.dumps(value).encode()) + 6
            if size <= room:
                kept[key] = value
                room -= size
        return text, kept, len(data) - len(kept)


def _clip(text: str, max_bytes: int) -> str:
    raw = text.encode()
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode(errors="ignore")


@guard_rpcs
class CombinerServicer(pb_grpc.CombinerServicer):
    def __init__(self, core: CombinerCore, packages: dict[str, bytes] | None = None) -> None:
        self.core = core
        self.boundary = Boundary(f"combiner {core.name}", self._event)
        self.packages = packages if packages is not None else {}
        self.events = EventBudget(core.settings.max_client_events_per_min,
                                  core.settings.max_event_bytes)

    def _event(self, level: str, message: str, **data: Any) -> None:
        self.core.listener.event(level, message, **data)  # the core's listener of the moment

    async def Join(self, request: pb.JoinRequest, context):
        # With a per-client token, both the id and the name are the token's name.
        client_id = await caller_id(context, request.client_id, request.name)
        if not client_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client_id is required")
        if max(len(client_id), len(request.name), len(request.version)) > MAX_NAME_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client ids, names and "
                                f"versions are at most {MAX_NAME_CHARS} characters")
        name = client_id if current_caller().kind == "client" else request.name or client_id
        refused = attrs_problem(request.attrs)
        if refused:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"attrs: {refused}")
        if client_id not in self.core.clients and not self.core.accepts_clients():
            state = "is leaving the tier" if self.core.draining else "is full"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"combiner {self.core.name} {state}; ask the gateway again")
        caller = current_caller()
        if caller.kind != "client" and self.core.registry.held_elsewhere(client_id, caller.peer):
            if caller.gate is not None:  # throttled like every refusal
                caller.gate.report("warning", f"refused a second Join as {client_id!r} from "
                                   f"{caller.peer}: it is connected on another connection",
                                   reason="taken_id", client_id=client_id)
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"{client_id!r} is connected from another connection: give "
                                "each client its own --name (a client that lost its "
                                "connection gets back in once the old one times out)")
        link = self.core.connect(client_id, name, dict(request.attrs), request.version,
                                 caller.peer)
        await context.send_initial_metadata(())  # the client's wait_for_connection returns now
        async for task in self.core.tasks(link):
            yield task_to_proto(task)
        if link.moved:  # the client asks the gateway again, after a jittered pause
            context.set_trailing_metadata(((REJOIN_HEADER, link.moved),))

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        known = self.core.heartbeat(await caller_id(context, request.client_id), request.status)
        return pb.HeartbeatReply(interval_s=self.core.registry.beat_interval(), known=known)

    async def FetchModel(self, request: pb.FetchModelRequest, context):
        try:
            chunks = self.core.model_chunks(request.model_id, request.delta_from)
            first = next(chunks)
        except KeyError:
            what = f" as a delta from {request.delta_from[:12]}" if request.delta_from else ""
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {request.model_id[:12]} is not served by this "
                                f"combiner{what}")
        for chunk, offset, total in _prepend(first, chunks):
            yield pb.Chunk(data=bytes(chunk), offset=offset, total_size=total)

    async def FetchPackage(self, request: pb.FetchPackageRequest, context):
        data = self.packages.get(request.sha256)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no package {request.sha256[:12]}")
        step = self.core.settings.chunk_kib * 1024
        for offset in range(0, max(len(data), 1), step):
            yield pb.Chunk(data=data[offset : offset + step], offset=offset, total_size=len(data))

    async def PushUpdate(self, request_iterator, context) -> pb.PushReply:
        idle_s = self.core.settings.upload_idle_s
        try:  # a call that never sends its header must not hold a call slot for long
            first = await asyncio.wait_for(anext(aiter(request_iterator), None), idle_s)
        except TimeoutError:
            return pb.PushReply(accepted=False, reason=f"stalled: no header within {idle_s:g}s")
        if first is None or first.WhichOneof("part") != "header":
            return pb.PushReply(accepted=False, reason="malformed: the first part must be a header")
        client_id = await caller_id(context, first.header.client_id)
        try:
            header = header_from_proto(first.header, client_id)
        except UpdateRejected as exc:
            return pb.PushReply(accepted=False, reason=str(exc))

        async def chunks():
            async for part in request_iterator:
                if part.WhichOneof("part") != "chunk":
                    raise UpdateRejected("malformed", "only chunks may follow the header")
                yield part.chunk.data, part.chunk.offset

        accepted, reason = await self.core.push_update(header, chunks())
        return pb.PushReply(accepted=accepted, reason=reason)

    async def PushValidation(self, request: pb.ValidationReport, context) -> pb.Ack:
        return await self._report(request, context, validation_from_proto,
                                  self.core.push_validation, "validation")

    async def PushStageReply(self, request: pb.StageReply, context) -> pb.Ack:
        return await self._report(request, context, stage_reply_from_proto,
                                  self.core.push_reply, "stage reply")

    async def _report(self, request, context, convert, push, what: str) -> pb.Ack:
        """A client's answer to a task that is not an update: checked, then handed to the
        core; a refusal is the core's to count, the client just gets its Ack."""
        client_id = await caller_id(context, request.client_id)
        try:
            report = convert(request, client_id)
        except UpdateRejected as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        accepted, reason = push(report)
        if not accepted:
            log.info("%s from %s refused: %s", what, client_id, reason)
        return pb.Ack()

    async def PushEvent(self, request: pb.EventReport, context) -> pb.Ack:
        level = request.level if request.level in {"debug", "info", "warning", "error"} else "info"
        client_id = await caller_id(context, request.client_id)
        message, data, left_out = self.events.bound(printable(request.message),
                                                    client_values(request.data))
        if request.task_id and level == "error":  # one per task the client really has
            error_class = request.error_class
            if not _ERROR_CLASS_RE.fullmatch(error_class):
                error_class = ""  # not a class name: nothing of it is kept
            self.core.task_failed(client_id, request.task_id, message, error_class)
        elif self.events.allow(client_id):
            extra = {"truncated": left_out} if left_out else {}
            self.core.listener.event(level, f"client {client_id}: {message}",
                                     client_id=client_id, data=data, **extra)
        else:
            record, dropped = self.events.throttle.allow()
            if record:
                self.core.listener.event(
                    "warning", f"client {client_id!r} is over its event budget "
                    f"({self.events.per_min:g} events a minute); its events are not recorded",
                    client_id=client_id, reason="event_budget", suppressed=dropped)
        return pb.Ack()


def _prepend(first, rest):
    yield first
    yield from rest
