"""A combiner's gRPC bridge on 127.0.0.1 without Ray, for the bad-input and fuzz tests.

``Bridge`` serves ``CombinerServicer`` over a ``CombinerCore`` with the real server setup
(token interceptor, message limits) in the test's own event loop, so a test can both talk
to it through raw ``fedray.bridge.proto`` stubs and look inside the core to check that a refused
input left the round's aggregate untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import grpc
import numpy as np

from fedray.actors.combiner.core import CombinerCore
from fedray.actors.combiner.servicer import CombinerServicer
from fedray.bridge.auth import AuthGate
from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.server import start_server
from fedray.bridge.wire import auth_metadata
from fedray.config import CombinersConfig
from fedray.messages import RoundSpec, TaskKind
from fedray.serialization import encode
from fedray.strategies.fedavg import FedAvg

TOKEN = "bad-input-token"
METADATA = auth_metadata(TOKEN)
GLOBAL = {"w": np.zeros((4, 8), np.float32), "b": np.zeros(8, np.float32)}
MODEL = np.frombuffer(encode(GLOBAL), np.uint8)
GOOD_VALUE, GOOD_EXAMPLES = 2.0, 10


def update_bytes(value: float = 1.0, **replace: np.ndarray) -> bytes:
    """An update shaped like GLOBAL filled with ``value``; ``replace`` swaps or adds tensors."""
    model = {k: np.full(v.shape, value, v.dtype) for k, v in GLOBAL.items()}
    return encode({**model, **replace})


def header(task: pb.Task, client: str, data: bytes, **over: Any) -> pb.UpdateHeader:
    fields = dict(client_id=client, task_id=task.task_id, session_id=task.session_id,
                  round=task.round, model_id=task.model_id, num_examples=GOOD_EXAMPLES,
                  size=len(data), sha256=hashlib.sha256(data).hexdigest())
    return pb.UpdateHeader(**{**fields, **over})


def chunk_parts(data: bytes, step: int = 1024, start: int = 0) -> list[pb.UpdatePart]:
    return [pb.UpdatePart(chunk=pb.Chunk(data=data[i : i + step], offset=start + i,
                                         total_size=len(data)))
            for i in range(0, len(data), step)]


def parts(hdr: pb.UpdateHeader, data: bytes, step: int = 1024) -> list[pb.UpdatePart]:
    return [pb.UpdatePart(header=hdr), *chunk_parts(data, step)]


class Bridge:
    def __init__(self, core: CombinerCore, server: grpc.aio.Server, port: int,
                 gate: AuthGate) -> None:
        self.core, self.server, self.port, self.gate = core, server, port, gate
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = pb_grpc.CombinerStub(self.channel)
        self.joins: list[Any] = []
        self.round: asyncio.Future | None = None

    @classmethod
    async def start(cls, gate: AuthGate | None = None, limits: Any = None,
                    **settings: Any) -> Bridge:
        """A bridge over ``CombinersConfig(**settings)``; ``gate`` defaults to the shared
        TOKEN without a rate limit, ``limits`` (``ServerLimits``) to the production ones."""
        base = {"host": "127.0.0.1", "heartbeat_interval_s": 0.5, "offline_after_s": 30}
        core = CombinerCore("c-test", CombinersConfig(**{**base, **settings}))
        core.start_session("s1", FedAvg())

        def register(server: grpc.aio.Server) -> None:
            pb_grpc.add_CombinerServicer_to_server(CombinerServicer(core), server)

        gate = gate or AuthGate(TOKEN)
        extra = {} if limits is None else {"limits": limits}
        server, port = await start_server(register, "127.0.0.1", 0, gate, **extra)
        return cls(core, server, port, gate)

    async def open_round(self, clients: list[str], round_: int = 1,
                         timeout: float = 30.0, model: dict | None = None,
                         kind: TaskKind = TaskKind.TRAIN, **spec: Any) -> dict[str, pb.Task]:
        """Join ``clients`` over gRPC, start a train round for them, return their tasks;
        ``model`` replaces GLOBAL, ``spec`` sets more ``RoundSpec`` fields."""
        calls = {}
        for client in clients:
            call = self.stub.Join(pb.JoinRequest(client_id=client, name=client), metadata=METADATA)
            await call.wait_for_connection()
            calls[client] = call
        self.joins.extend(calls.values())
        order = RoundSpec(session_id="s1", round=round_, kind=kind,
                          clients=tuple(clients), config={}, timeout_s=timeout, **spec)
        served = MODEL if model is None else np.frombuffer(encode(model), np.uint8)
        self.round = asyncio.ensure_future(self.core.run_round(order, served))
        return {c: await asyncio.wait_for(call.read(), 5) for c, call in calls.items()}

    async def push(self, update_parts, timeout: float = 10.0) -> pb.PushReply:
        async def stream():
            for part in update_parts:
                yield part

        return await self.stub.PushUpdate(stream(), metadata=METADATA, timeout=timeout)

    def partial(self):
        return self.core.share.accumulator.partial()

    def assert_untouched(self, count: int = 0) -> None:
        """The round's aggregate holds exactly ``count`` good updates and nothing else."""
        partial = self.partial()
        assert partial.count == count and self.core.share.accepted == count
        assert partial.weight == count * GOOD_EXAMPLES
        for name, total in partial.sums.items():
            np.testing.assert_array_equal(total, count * GOOD_VALUE * GOOD_EXAMPLES,
                                          err_msg=name)

    async def good_update_is_accepted(self, task: pb.Task, client: str) -> None:
        data = update_bytes(GOOD_VALUE)
        reply = await self.push(parts(header(task, client, data), data))
        assert reply.accepted, reply.reason

    async def close(self) -> None:
        if self.round is not None:
            self.round.cancel()
        for call in self.joins:
            call.cancel()
        await self.channel.close()
        await self.server.stop(0)
        await self.gate.close()


async def status_of(call) -> grpc.StatusCode:
    """The status an RPC ended with (OK when it succeeded)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
