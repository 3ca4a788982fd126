"""Raw bytes at a combiner's gRPC port: garbage, HTTP/1.1, malformed protobuf, oversized
messages and a flood of connections. The server refuses each without running a handler on
bad data, and afterwards a normal client still completes a round.

No Ray: the bridge (``tests/bridge.py``) is the combiner's servicer and core on a real
127.0.0.1 socket, with the production server options (4 MiB receive limit).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time

import grpc
import pytest

from fedray.bridge.proto import fedray_v1_pb2 as pb
from tests.bridge import METADATA, Bridge, header, parts, update_bytes

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
METHODS = {  # path -> (request streaming, response streaming)
    "/fedray.v1.Combiner/Join": (False, True),
    "/fedray.v1.Combiner/Heartbeat": (False, False),
    "/fedray.v1.Combiner/FetchModel": (False, True),
    "/fedray.v1.Combiner/FetchPackage": (False, True),
    "/fedray.v1.Combiner/PushUpdate": (True, False),
    "/fedray.v1.Combiner/PushValidation": (False, False),
    "/fedray.v1.Combiner/PushEvent": (False, False),
}
# What a refusal may look like; UNKNOWN only for bytes that are not the message at all.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
PARSE_ERROR = "Error parsing message"


async def _a_round_still_completes(bridge: Bridge, tasks: dict[str, pb.Task]) -> None:
    for client in tasks:
        await bridge.good_update_is_accepted(tasks[client], client)
    result = await asyncio.wait_for(bridge.round, 5)
    assert result.close_reason == "all_answered" and result.updates == len(tasks)
    assert result.partial.count == len(tasks)


async def _talk(port: int, payload: bytes, wait_s: float = 3.0) -> bytes:
    """Send ``payload`` on a fresh TCP connection; what the server says until it hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        heard = b""
        while chunk := await asyncio.wait_for(reader.read(65536), wait_s):
            heard += chunk
        return heard
    finally:
        writer.close()


@pytest.mark.parametrize("payload", [
    os.urandom(1), os.urandom(100), os.urandom(64 * 1024),
    b"GET / HTTP/1.1\r\nHost: combiner\r\nConnection: keep-alive\r\n\r\n",
    b"POST /fedray.v1.Combiner/PushUpdate HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200),  # a TLS ClientHello
    H2_PREFACE + os.urandom(500),
    H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # SETTINGS, then a HEADERS frame
    + b"\x00\x00\x20\x01\x05\x00\x00\x00\x01" + os.urandom(32),  # with garbage HPACK
], ids=["1 byte", "100 bytes", "64 KiB", "HTTP/1.1 GET", "HTTP/1.1 POST", "TLS hello",
        "h2 preface then garbage", "h2 garbage headers"])
async def test_garbage_on_the_port_is_dropped_and_the_server_keeps_serving(bridge, payload):
    tasks = await bridge.open_round(["a", "b"])
    heard = await _talk(bridge.port, payload)  # returns once the server hung up
    assert b"HTTP/1.1 200" not in heard
    await _a_round_still_completes(bridge, tasks)


def _raw_call(channel: grpc.aio.Channel, path: str, data: bytes):
    """Call ``path`` with ``data`` as the already-serialized request."""
    request_streaming, response_streaming = METHODS[path]
    raw = {"request_serializer": lambda x: x, "response_deserializer": lambda x: x}
    if request_streaming:
        return channel.stream_unary(path, **raw)(iter([data, data]), metadata=METADATA, timeout=2)
    if response_streaming:
        return channel.unary_stream(path, **raw)(data, metadata=METADATA, timeout=0.5)
    return channel.unary_unary(path, **raw)(data, metadata=METADATA, timeout=2)


async def _outcome(call) -> grpc.StatusCode:
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in REFUSALS or (
            exc.code() is grpc.StatusCode.UNKNOWN and PARSE_ERROR in exc.details()), \
            (exc.code(), exc.details())
        return exc.code()
    return grpc.StatusCode.OK


async def test_malformed_protobuf_on_every_method_is_refused(bridge):
    tasks = await bridge.open_round(["a", "b"])
    rng = random.Random(4)
    not_protobuf = [b"\xff" * 8, b"\x0a\x05abc", b"\x0a\xff\xff\xff\xff\x0f", b"\x08"]
    codes = []
    for path in METHODS:
        for data in not_protobuf + [rng.randbytes(rng.randrange(1, 300)) for _ in range(10)]:
            codes.append(await _outcome(_raw_call(bridge.channel, path, data)))
    assert codes.count(grpc.StatusCode.UNKNOWN) >= len(METHODS) * len(not_protobuf)
    bridge.assert_untouched()
    await _a_round_still_completes(bridge, tasks)


async def test_messages_over_four_mib_are_refused_by_grpc(bridge):
    tasks = await bridge.open_round(["a", "b"])
    big = "x" * (5 << 20)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id=big), metadata=METADATA)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    data = update_bytes(1.0)
    oversized_chunk = [pb.UpdatePart(header=header(tasks["a"], "a", data)),
                       pb.UpdatePart(chunk=pb.Chunk(data=os.urandom(5 << 20), offset=0))]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bridge.push(oversized_chunk)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    bridge.assert_untouched()
    assert bridge.core.intake._slots._value == bridge.core.settings.max_inflight_uploads
    await _a_round_still_completes(bridge, tasks)


def _flood(port: int, total: int, together: int) -> int:
    """Open ``total`` TCP connections, ``together`` at a time, and drop them; some say hello
    in HTTP/2 first, some are reset instead of closed. Returns how many connected."""
    connected = 0
    for start in range(0, total, together):
        socks = []
        for i in range(start, min(start + together, total)):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            connected += 1
            if i % 3 == 0:
                s.sendall(H2_PREFACE)
            if i % 5 == 0:  # RST instead of FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            socks.append(s)
        for s in socks:
            s.close()
    return connected


async def test_thousands_of_connections_opened_and_dropped(bridge):
    tasks = await bridge.open_round(["a", "b"])
    started = time.monotonic()
    assert await asyncio.to_thread(_flood, bridge.port, 2000, 200) == 2000
    assert time.monotonic() - started < 30
    await _a_round_still_completes(bridge, tasks)
    # and a fresh client can still join and upload in the next round
    bridge.round = None
    tasks = await bridge.open_round(["c"], round_=2)
    data = update_bytes(2.0)
    assert (await bridge.push(parts(header(tasks["c"], "c", data), data))).accepted
