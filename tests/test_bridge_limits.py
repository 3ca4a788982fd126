"""Cheap floods against a real combiner bridge on 127.0.0.1: event budgets, rate limits a
renaming caller cannot escape, and the bounded tables behind them. No Ray."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from typing import Any

import grpc
import pytest

from fedray.bridge.auth import AuthGate
from fedray.bridge.limits import RateLimiter
from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.wire import auth_metadata, to_struct
from tests.bridge import TOKEN, Bridge, status_of
from tests.waiting import async_wait_until


class Recorder:
    """A combiner listener that keeps what would go to tracking."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def event(self, level: str, message: str, **data: Any) -> None:
        self.events.append((level, message, data))

    def client_status(self, *args: Any) -> None:
        pass

    def round_closed(self, *args: Any) -> None:
        pass


async def test_each_client_has_an_event_budget_in_count_and_bytes():
    bridge = await Bridge.start(max_client_events_per_min=12, max_event_bytes=1024)
    recorder = bridge.core.listener = Recorder()
    try:
        fat = to_struct({f"k{i:02d}": "v" * 900 for i in range(60)})  # ~55 KiB of data
        codes = [await status_of(bridge.stub.PushEvent(
            pb.EventReport(client_id="a", level="info", message="m" * 5000, data=fat),
            metadata=auth_metadata(TOKEN, "a"))) for _ in range(30)]
        other = await status_of(bridge.stub.PushEvent(pb.EventReport(client_id="b", message="hi"),
                                                  metadata=auth_metadata(TOKEN, "b")))
    finally:
        await bridge.close()

    assert set(codes) == {grpc.StatusCode.OK} and other is grpc.StatusCode.OK
    from_a = [e for e in recorder.events
              if e[2].get("client_id") == "a" and e[2].get("reason") != "event_budget"]
    assert len(from_a) == 6  # a burst of half a minute's budget, then nothing more yet
    for _, message, data in from_a:
        assert len(message.encode()) + len(json.dumps(data.get("data"))) <= 1024 + 64
    assert any(e[2].get("client_id") == "b" for e in recorder.events)
    over = [e for e in recorder.events if e[2].get("reason") == "event_budget"]
    assert over and over[0][0] == "warning" and "'a'" in over[0][1]


async def test_a_shared_token_caller_cannot_escape_its_rate_or_take_slots_by_renaming():
    gate = AuthGate(TOKEN, max_rpcs_per_s=5, max_ids_per_peer=3)
    bridge = await Bridge.start(gate=gate)
    try:
        # one connection, a new name on every call
        beats = [await status_of(bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id=f"n{i}"),
                                                   metadata=auth_metadata(TOKEN, f"n{i}")))
                 for i in range(40)]
        joins = []
        for i in range(10):
            call = bridge.stub.Join(pb.JoinRequest(client_id=f"j{i}", name=f"j{i}"),
                                    metadata=auth_metadata(TOKEN))
            try:
                await call.wait_for_connection()
                await call.initial_metadata()
                joins.append(call)
            except grpc.aio.AioRpcError:
                pass
        joined = set(bridge.core.clients)
        for call in joins:
            call.cancel()
    finally:
        await bridge.close()

    assert beats.count(grpc.StatusCode.OK) <= 3 * 10  # 3 names, a 2-second burst each
    assert beats[-1] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(joined) <= 3, joined


async def test_names_in_metadata_are_bounded_before_they_key_anything():
    gate = AuthGate(TOKEN, max_rpcs_per_s=5)
    bridge = await Bridge.start(gate=gate)
    try:
        code = await status_of(bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="a"),
                                                 metadata=auth_metadata(TOKEN, "x" * 5000)))
    finally:
        await bridge.close()
    assert code is grpc.StatusCode.INVALID_ARGUMENT


def test_the_rate_limiter_bounds_its_keys_in_number_and_length():
    limiter = RateLimiter(5.0, max_keys=1000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3000):
            limiter.allow(f"peer:ipv4:10.0.0.1:{i}|" + "x" * 8000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(limiter._buckets) == 1000
    assert max(len(k) for k in limiter._buckets) <= 128
    assert grown < 1000 * 1024, grown  # about 8 MiB with the raw keys


@pytest.mark.parametrize("kind", ["client", "shared"])
async def test_callers_are_keyed_by_identity_and_connection(kind):
    from fedray.bridge.client_tokens import ClientTokens
    from tests.test_auth import SECRET, row

    tokens = ClientTokens(lambda: [row("tok-a", "alice")], refresh_s=3600, secret=SECRET)
    gate = AuthGate(TOKEN, tokens, max_rpcs_per_s=5)
    await gate.start()
    try:
        token = "tok-a" if kind == "client" else TOKEN
        md = dict(auth_metadata(token, "alice" if kind == "client" else "bob"))
        admitted = 0
        for i in range(60):  # every call from a new connection of the same host
            try:
                gate.admit(md, "/m", f"ipv4:10.0.0.1:{1000 + i}")
                admitted += 1
            except Exception:  # noqa: BLE001 - Refused
                pass
    finally:
        await gate.close()
    # a token's identity has one budget wherever it calls from; a shared-token caller has
    # one per connection (its name is not an identity)
    assert admitted in ((10, 11) if kind == "client" else (60,))


async def test_one_client_cannot_fill_the_servers_call_slots_with_calls_that_never_end():
    """Uploads that never sent a header stayed open for the connection's age; at 50 calls
    a second one client filled every concurrent-call slot and heartbeats were refused."""
    from fedray.bridge.limits import MAX_CALLS_IN_FLIGHT

    bridge = await Bridge.start(upload_idle_s=30)
    mallory = auth_metadata(TOKEN, "mallory")

    async def never():
        await asyncio.sleep(60)  # behaviour: an upload that never sends anything
        yield  # pragma: no cover

    running = bridge.gate.in_flight._running  # calls in flight, per caller
    try:
        held = [bridge.stub.PushUpdate(never(), metadata=mallory)
                for _ in range(MAX_CALLS_IN_FLIGHT)]
        await async_wait_until(lambda: MAX_CALLS_IN_FLIGHT in running.values(),
                               f"mallory's {MAX_CALLS_IN_FLIGHT} calls to be in flight",
                               describe=lambda: dict(running))
        extra = await status_of(bridge.stub.PushUpdate(never(), metadata=mallory))
        beat = await status_of(bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="honest"),
                                                     metadata=auth_metadata(TOKEN, "honest")))
        assert extra is grpc.StatusCode.RESOURCE_EXHAUSTED and beat is grpc.StatusCode.OK
        for call in held:
            call.cancel()
        await async_wait_until(lambda: len(bridge.gate.in_flight) == 0,
                               "the ended calls to leave nothing behind",
                               describe=lambda: dict(running))
        again = await status_of(bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="mallory"),
                                                      metadata=mallory))
        assert again is grpc.StatusCode.OK
    finally:
        await bridge.close()


async def test_client_ids_in_messages_are_bounded_before_a_connection_holds_them():
    bridge = await Bridge.start()
    try:
        code = await status_of(bridge.stub.Heartbeat(
            pb.HeartbeatRequest(client_id="x" * 60_000), metadata=auth_metadata(TOKEN)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert bridge.gate.peer_ids._count == 0
    finally:
        await bridge.close()
