"""Random input for every RPC of the gateway and a combiner, for ``test_fuzz``.

Two kinds: raw random bytes sent as the serialized request, and *valid-looking* protobuf
messages built from the message types' descriptors with random field values (empty and
huge strings, ids that exist, NaN and 2**64-1, nested Structs with hostile keys). Every
outcome is recorded; a status outside ``EXPECTED`` (above all UNKNOWN from a handler that
raised) is a finding.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor as F

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.wire import AUTH_HEADER, CLIENT_HEADER

# path -> (request type, request streaming, response streaming)
RPCS = {
    "/fedray.v1.Gateway/Assign": (pb.AssignRequest, False, False),
    "/fedray.v1.Combiner/Join": (pb.JoinRequest, False, True),
    "/fedray.v1.Combiner/Heartbeat": (pb.HeartbeatRequest, False, False),
    "/fedray.v1.Combiner/FetchModel": (pb.FetchModelRequest, False, True),
    "/fedray.v1.Combiner/FetchPackage": (pb.FetchPackageRequest, False, True),
    "/fedray.v1.Combiner/PushUpdate": (pb.UpdatePart, True, False),
    "/fedray.v1.Combiner/PushValidation": (pb.ValidationReport, False, False),
    "/fedray.v1.Combiner/PushEvent": (pb.EventReport, False, False),
}
C = grpc.StatusCode
EXPECTED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.DEADLINE_EXCEEDED, C.RESOURCE_EXHAUSTED,
            C.UNAUTHENTICATED, C.PERMISSION_DENIED, C.UNAVAILABLE}
PARSE_ERROR = "Error parsing message"  # grpc's UNKNOWN for bytes that are not the message
# grpc.aio's client, not the server: when the server answers a client stream early (a
# refusal) while the client still writes, the failed write can overwrite the server's
# status with this one (grpc/grpc#36066, fix pending in grpc/grpc#43486). Our servers'
# own INTERNAL always carries a reference instead.
CLIENT_WRITE_RACE = "Internal error from Core"


class Fuzzer:
    def __init__(self, seed: int, token: str, known: list[str]) -> None:
        self.rng = random.Random(seed)
        self.token = token
        self.known = known  # ids that exist (session, model, task, client ids)
        self.outcomes: Counter[str] = Counter()
        self.findings: list[str] = []
        self.slowest: dict[str, float] = {}  # path -> seconds of its slowest call

    # ------------------------------------------------------------------ values

    def text(self) -> str:
        r = self.rng
        return r.choice([
            "", " ", "a", "x" * r.choice([64, 4096, 100_000]), "\x00", "nul\x00in", "$where",
            "a.b", "../../etc/passwd", "ünïcødé ✓", "%s%n", r.choice(self.known or ["k"]),
            "".join(r.choice("abcdef0123456789") for _ in range(64)),
        ])

    def number(self, bits: int) -> int:
        top = 2**bits - 1
        return self.rng.choice([0, 1, 2, 7, top, top - 1, 2**(bits - 1), self.rng.randrange(top)])

    def double(self) -> float:
        return self.rng.choice([0.0, -1.0, 0.5, 1e308, -1e308, 5e-324, float("nan"),
                                float("inf"), float("-inf"), self.rng.uniform(-1e9, 1e9)])

    def struct(self, depth: int = 0) -> struct_pb2.Struct:
        s = struct_pb2.Struct()
        for _ in range(self.rng.randrange(4)):
            value = s.fields[self.text()[:200]]
            kind = self.rng.randrange(5 if depth < 3 else 4)
            if kind == 0:
                value.number_value = self.double()
            elif kind == 1:
                value.string_value = self.text()[:5000]
            elif kind == 2:
                value.bool_value = self.rng.random() < 0.5
            elif kind == 3:
                value.null_value = struct_pb2.NULL_VALUE
            else:
                value.struct_value.CopyFrom(self.struct(depth + 1))
        return s

    def message(self, cls: type, depth: int = 0) -> Any:
        """A ``cls`` with random values in a random subset of its fields."""
        msg = cls()
        for field in cls.DESCRIPTOR.fields:
            if self.rng.random() < 0.3:
                continue
            if field.type == F.TYPE_STRING:
                setattr(msg, field.name, self.text())
            elif field.type == F.TYPE_BYTES:
                setattr(msg, field.name, self.rng.randbytes(self.rng.choice([0, 1, 100, 70_000])))
            elif field.type in (F.TYPE_UINT32, F.TYPE_UINT64):
                setattr(msg, field.name, self.number(32 if field.type == F.TYPE_UINT32 else 64))
            elif field.type == F.TYPE_DOUBLE:
                setattr(msg, field.name, self.double())
            elif field.type == F.TYPE_BOOL:
                setattr(msg, field.name, self.rng.random() < 0.5)
            elif field.type == F.TYPE_ENUM:
                setattr(msg, field.name, self.rng.choice([0, 1, 2, 3, 2**31 - 1]))
            elif field.message_type.GetOptions().map_entry:  # map<string, string> attrs
                for _ in range(self.rng.choice([0, 1, 3, 40])):
                    getattr(msg, field.name)[self.text()] = self.text()
            elif field.message_type.full_name == "google.protobuf.Struct":
                getattr(msg, field.name).CopyFrom(self.struct())
            elif depth < 2:
                getattr(msg, field.name).CopyFrom(self.message(type(getattr(msg, field.name)),
                                                                depth + 1))
        return msg

    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.token if self.rng.random() < 0.97 else self.rng.choice(["", "wrong"])
        name = "fz-" + "".join(self.rng.choice("abcdefgh") for _ in range(8))
        return ((AUTH_HEADER, f"Bearer {token}"), (CLIENT_HEADER, name))

    # ------------------------------------------------------------------ calls

    async def call(self, channel: grpc.aio.Channel, path: str, requests: list[Any],
                   raw: bool) -> None:
        """One RPC; ``requests`` are messages, or bytes when ``raw``."""
        _, request_streaming, response_streaming = RPCS[path]
        codec = {"request_serializer": (lambda x: x) if raw else (lambda m: m.SerializeToString()),
                 "response_deserializer": lambda x: x}
        md = self.metadata()
        began = asyncio.get_running_loop().time()
        try:
            if request_streaming:
                await channel.stream_unary(path, **codec)(iter(requests), metadata=md, timeout=3)
            elif response_streaming:
                call = channel.unary_stream(path, **codec)(requests[0], metadata=md, timeout=0.1)
                async for _ in call:
                    pass
            else:
                await channel.unary_unary(path, **codec)(requests[0], metadata=md, timeout=3)
            code, details = C.OK, ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        self.outcomes[f"{path.rsplit('/', 1)[1]} {code.name}"] += 1
        took = asyncio.get_running_loop().time() - began
        self.slowest[path] = max(self.slowest.get(path, 0.0), took)
        client_race = request_streaming and code is C.INTERNAL and details == CLIENT_WRITE_RACE
        if code not in EXPECTED and not (code is C.UNKNOWN and PARSE_ERROR in details) \
                and not client_race:
            self.findings.append(f"{path} -> {code.name}: {details[:300]}")

    async def round_of(self, channel: grpc.aio.Channel, path: str) -> None:
        cls, request_streaming, _ = RPCS[path]
        count = self.rng.randrange(1, 5) if request_streaming else 1
        if self.rng.random() < 0.3:
            await self.call(channel, path, [self.rng.randbytes(self.rng.randrange(0, 300))
                                            for _ in range(count)], raw=True)
        else:
            await self.call(channel, path, [self.message(cls) for _ in range(count)], raw=False)


async def fuzz(gateway: str, combiner: str, fuzzer: Fuzzer, iterations: int,
               budget_s: float, together: int = 16) -> None:
    """``iterations`` random calls spread over every RPC, ``together`` at a time, stopping
    early after ``budget_s``."""
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + budget_s
    # Connections of their own: the bridge keys shared-token callers by connection, and the
    # fuzzer's hundreds of made-up names must not use up the budget of the honest clients
    # that a test starts in this process afterwards (channels share connections otherwise).
    own = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(gateway, options=own) as gw, \
            grpc.aio.insecure_channel(combiner, options=own) as cb:
        paths = list(RPCS)
        for start in range(0, iterations, together):
            if loop.time() > stop_at:
                break
            batch = [paths[i % len(paths)] for i in range(start, min(start + together, iterations))]
            await asyncio.gather(*(fuzzer.round_of(gw if "Gateway" in p else cb, p) for p in batch))
