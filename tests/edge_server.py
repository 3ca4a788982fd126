"""A scripted federation for edge-client tests: a real gRPC server on 127.0.0.1.

``ScriptedFederation`` serves the Gateway and Combiner services on one port (optionally
over TLS). The test decides which tasks go down a client's stream and which bytes a
model or package download streams, hostile ones included; the server records what the
client sends (joins, events, validations, updates) and how many bytes each download
handed out before the client hung up. The client under test is the real ``EdgeRunner``
or a real ``fedray edge start`` process.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.tls import ServerTls

Chunks = Callable[[], Iterable[bytes]]


def chunked(data: bytes, step: int = 1 << 20) -> Chunks:
    """The chunks of ``data`` (each a fresh 1 MiB ``bytes``), produced lazily."""
    view = memoryview(data)
    return lambda: (bytes(view[i : i + step]) for i in range(0, max(len(data), 1), step))


def endless(step: int = 1 << 20, count: int = 64) -> Chunks:
    """``count`` chunks of ``step`` zero bytes: far more than any task announces."""
    return lambda: (b"\0" * step for _ in range(count))


def task(kind: str = "validate", model: bytes = b"", **over: Any) -> pb.Task:
    fields: dict[str, Any] = dict(
        task_id=uuid.uuid4().hex, session_id="s1", round=1,
        kind=pb.TASK_KIND_TRAIN if kind == "train" else pb.TASK_KIND_VALIDATE,
        model_id=hashlib.sha256(model).hexdigest(), model_size=len(model),
        deadline_unix=time.time() + 60)
    return pb.Task(**{**fields, **over})


class ScriptedCombiner(pb_grpc.CombinerServicer, pb_grpc.GatewayServicer):
    def __init__(self) -> None:
        self.address = ""  # where Assign sends clients (this server unless changed)
        self.identity = ""  # the client id Assign gives, as a per-client token would
        self.pending: list[pb.Task] = []  # for the next client to join
        self.streams: list[asyncio.Queue[pb.Task]] = []  # of the clients joined, in order
        self.downloads: dict[str, Chunks] = {}  # model id or package sha256 -> chunks
        self.sent: dict[str, int] = {}  # bytes handed out per download id
        self.assigns: list[pb.AssignRequest] = []
        self.joins: list[pb.JoinRequest] = []
        self.events: list[pb.EventReport] = []
        self.validations: list[pb.ValidationReport] = []
        self.updates: list[pb.UpdateHeader] = []
        self.update_bytes: list[bytes] = []  # the payload of each update, in order
        self.stage_replies: list[pb.StageReply] = []
        self.heartbeat_interval_s = 0.5  # what Heartbeat tells the client
        self.heartbeats = 0

    def send(self, task: pb.Task) -> None:
        """Down the task stream of the client that joined last, or of the next to join."""
        if self.streams:
            self.streams[-1].put_nowait(task)
        else:
            self.pending.append(task)

    def serve(self, data: bytes) -> str:
        """Serve ``data`` as a model and as a package under its sha256; returns that."""
        key = hashlib.sha256(data).hexdigest()
        self.downloads[key] = chunked(data)
        return key

    async def Assign(self, request: pb.AssignRequest, context) -> pb.Assignment:
        self.assigns.append(request)
        return pb.Assignment(client_id=self.identity or request.name, combiner="c-test",
                             address=self.address)

    async def Join(self, request: pb.JoinRequest, context):
        self.joins.append(request)
        queue: asyncio.Queue[pb.Task] = asyncio.Queue()
        for waiting in self.pending:
            queue.put_nowait(waiting)
        self.pending.clear()
        self.streams.append(queue)
        await context.send_initial_metadata(())
        try:
            while True:
                yield await queue.get()
        finally:
            self.streams.remove(queue)

    async def Heartbeat(self, request, context) -> pb.HeartbeatReply:
        self.heartbeats += 1
        return pb.HeartbeatReply(interval_s=self.heartbeat_interval_s, known=True)

    async def _download(self, key: str, context):
        chunks = self.downloads.get(key)
        if chunks is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"nothing served as {key[:12]}")
        self.sent.setdefault(key, 0)
        for data in chunks():
            self.sent[key] += len(data)
            yield pb.Chunk(data=data)

    async def FetchModel(self, request: pb.FetchModelRequest, context):
        async for chunk in self._download(request.model_id, context):
            yield chunk

    async def FetchPackage(self, request: pb.FetchPackageRequest, context):
        async for chunk in self._download(request.sha256, context):
            yield chunk

    async def PushUpdate(self, request_iterator, context) -> pb.PushReply:
        data = bytearray()
        async for part in request_iterator:
            if part.WhichOneof("part") == "header":
                self.updates.append(part.header)
            else:
                data += part.chunk.data
        self.update_bytes.append(bytes(data))
        return pb.PushReply(accepted=True)

    async def PushStageReply(self, request: pb.StageReply, context) -> pb.Ack:
        self.stage_replies.append(request)
        return pb.Ack()

    async def PushValidation(self, request: pb.ValidationReport, context) -> pb.Ack:
        self.validations.append(request)
        return pb.Ack()

    async def PushEvent(self, request: pb.EventReport, context) -> pb.Ack:
        self.events.append(request)
        return pb.Ack()


class ScriptedFederation:
    def __init__(self, server: grpc.aio.Server, port: int, servicer: ScriptedCombiner) -> None:
        self.server, self.servicer = server, servicer
        self.gateway = f"127.0.0.1:{port}"
        servicer.address = self.gateway

    @classmethod
    async def start(cls, tls: ServerTls | None = None) -> ScriptedFederation:
        servicer = ScriptedCombiner()
        server = grpc.aio.server()
        pb_grpc.add_GatewayServicer_to_server(servicer, server)
        pb_grpc.add_CombinerServicer_to_server(servicer, server)
        if tls is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", tls.credentials())
        await server.start()
        return cls(server, port, servicer)

    async def close(self) -> None:
        await self.server.stop(0)
