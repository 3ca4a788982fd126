"""The bridge's gRPC server before any handler runs: tokens checked before a request is
read, per-method message limits, failed authentications rate-limited per host, and the
server's stream, RPC, connection and connection-age bounds. Real gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest

from fedray.bridge.auth import AuthGate
from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.server import ServerLimits
from fedray.bridge.wire import auth_metadata, to_struct
from tests.bridge import METADATA, TOKEN, Bridge, header, status_of, update_bytes
from tests.waiting import async_wait_until, connections

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # not shared with other channels
TICK_S = 0.005  # the event-loop lag probe's period


def _code_of(exc: BaseException | None) -> grpc.StatusCode:
    return grpc.StatusCode.OK if exc is None else exc.code()


async def _loop_lag_while(work) -> tuple[float, object]:
    """Run ``work`` in a thread; how much later than asked a 5 ms ticker woke, in total."""
    lag = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal lag
        while not done.is_set():
            asked = time.perf_counter()
            await asyncio.sleep(TICK_S)  # behaviour: the ticker's period is the measurement
            lag += max(0.0, time.perf_counter() - asked - TICK_S)

    tick = asyncio.ensure_future(ticker())
    try:
        result = await asyncio.to_thread(work)
    finally:
        done.set()
        await tick
    return lag, result


async def test_wrong_token_calls_are_refused_before_their_request_is_read(bridge):
    data = to_struct({f"k{i}": i * 1.5 for i in range(48_000)})  # a ~1 MiB Struct
    request = pb.EventReport(client_id="x", level="info", message="m", data=data)
    raw = request.SerializeToString()
    assert 900_000 < len(raw) < 4 << 20

    def flood() -> set[grpc.StatusCode]:
        with grpc.insecure_channel(bridge.address) as ch:
            call = ch.unary_unary("/fedray.v1.Combiner/PushEvent",
                                  request_serializer=lambda b: b,
                                  response_deserializer=pb.Ack.FromString)
            futures = [call.future(raw, metadata=auth_metadata(f"wrong-{i}"), timeout=30)
                       for i in range(150)]
            return {_code_of(f.exception()) for f in futures}

    lag, codes = await _loop_lag_while(flood)
    assert codes <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert lag < 0.4, f"the server's event loop fell {lag:.2f} s behind"


async def test_control_rpcs_have_small_message_limits_and_updates_keep_theirs(bridge):
    tasks = await bridge.open_round(["a"])
    big = "x" * (100 << 10)
    heartbeat = await status_of(bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id=big),
                                                  metadata=METADATA))
    event = await status_of(bridge.stub.PushEvent(pb.EventReport(client_id="a", message=big),
                                              metadata=METADATA))
    small = await status_of(bridge.stub.PushEvent(pb.EventReport(client_id="a", message="ok"),
                                              metadata=METADATA))
    assert heartbeat is event is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert small is grpc.StatusCode.OK
    data = update_bytes(2.0)
    one_mib = [pb.UpdatePart(header=header(tasks["a"], "a", data)),
               pb.UpdatePart(chunk=pb.Chunk(data=os.urandom(1 << 20), offset=0))]
    reply = await bridge.push(one_mib)  # a 1 MiB part is read: refused for its contents
    assert not reply.accepted and reply.reason.startswith("too_large: more than the announced")


async def test_failed_authentications_are_rate_limited_per_host():
    events: list = []
    gate = AuthGate(TOKEN, on_event=lambda level, message, **data: events.append(data))
    bridge = await Bridge.start(gate=gate)
    try:
        codes = [await status_of(bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="a"),
                                                   metadata=auth_metadata(f"guess-{i}")))
                 for i in range(40)]
        good = await status_of(bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="a"),
                                                 metadata=METADATA))
    finally:
        await bridge.close()
    assert codes[0] is grpc.StatusCode.UNAUTHENTICATED
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 25, codes
    assert good is grpc.StatusCode.OK  # a valid token from the same host is not held back
    reasons = [e["reason"] for e in events]  # throttled like every refusal: 20 at once
    assert reasons.count("wrong_token") <= 10 and 1 <= reasons.count("auth_rate_limit") <= 20


async def test_concurrent_rpcs_and_streams_per_connection_are_bounded():
    bridge = await Bridge.start(limits=ServerLimits(max_concurrent_rpcs=3,
                                                    max_streams_per_connection=2))
    others = []
    try:
        joins = [bridge.stub.Join(pb.JoinRequest(client_id=f"c{i}"), metadata=METADATA)
                 for i in range(2)]
        for call in joins:
            await call.wait_for_connection()
        queued = bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="c0"), metadata=METADATA)
        with pytest.raises(asyncio.TimeoutError):  # a third stream waits on this connection
            await asyncio.wait_for(asyncio.shield(queued), 0.5)
        joins[0].cancel()
        assert (await asyncio.wait_for(queued, 5)).known is False  # c0 left: then it runs

        for i in range(2):  # three RPCs at once on the server: the most it serves
            ch = grpc.aio.insecure_channel(bridge.address, options=OWN_CONNECTION)
            others.append(ch)
            call = pb_grpc.CombinerStub(ch).Join(pb.JoinRequest(client_id=f"d{i}"),
                                                 metadata=METADATA)
            await call.wait_for_connection()
            joins.append(call)
        ch = grpc.aio.insecure_channel(bridge.address, options=OWN_CONNECTION)
        others.append(ch)
        over = await status_of(pb_grpc.CombinerStub(ch).Heartbeat(pb.HeartbeatRequest(client_id="e"),
                                                              metadata=METADATA, timeout=5))
        assert over is grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in joins:
            call.cancel()
    finally:
        for ch in others:
            await ch.close()
        await bridge.close()


async def test_connections_are_capped():
    bridge = await Bridge.start(limits=ServerLimits(max_connections=2))
    channels = [grpc.aio.insecure_channel(bridge.address, options=OWN_CONNECTION)
                for _ in range(3)]
    try:
        codes = [await status_of(pb_grpc.CombinerStub(ch).Heartbeat(
            pb.HeartbeatRequest(client_id="a"), metadata=METADATA, timeout=3))
            for ch in channels]
    finally:
        for ch in channels:
            await ch.close()
        await bridge.close()
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE]


async def test_idle_connections_are_closed():
    bridge = await Bridge.start(limits=ServerLimits(max_connection_idle_s=0.5))
    ch = grpc.aio.insecure_channel(bridge.address, options=OWN_CONNECTION)
    try:
        await pb_grpc.CombinerStub(ch).Heartbeat(pb.HeartbeatRequest(client_id="a"),
                                                 metadata=METADATA)
        assert ch.get_state() is grpc.ChannelConnectivity.READY
        try:
            await asyncio.wait_for(ch.wait_for_state_change(grpc.ChannelConnectivity.READY), 5)
        except TimeoutError:
            raise AssertionError("the idle connection stayed open") from None
    finally:
        await ch.close()
        await bridge.close()


async def test_old_connections_are_closed_and_their_streams_move_to_a_new_one():
    bridge = await Bridge.start(limits=ServerLimits(max_connection_age_s=0.5,
                                                    max_connection_age_grace_s=0.5))
    try:
        join = bridge.stub.Join(pb.JoinRequest(client_id="a"), metadata=METADATA)
        await join.wait_for_connection()

        async def until_it_ends() -> None:
            async for _ in join:
                pass

        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(until_it_ends(), 5)
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
        again = bridge.stub.Join(pb.JoinRequest(client_id="a"), metadata=METADATA)
        await again.wait_for_connection()  # the same channel dials a new connection
        assert "a" in bridge.core.clients
        again.cancel()
    finally:
        await bridge.close()


def test_default_limits_follow_the_combiner_settings():
    from fedray.config import CombinersConfig

    limits = ServerLimits.for_settings(CombinersConfig(max_clients=100,
                                                       max_clients_per_connection=8))
    assert limits.max_concurrent_rpcs >= 2 * 100 and limits.max_connections >= 100
    assert limits.max_streams_per_connection >= 4 * 8
    assert limits.message_limit("/fedray.v1.Combiner/PushUpdate") >= 4 << 20
    assert limits.message_limit("/fedray.v1.Combiner/PushEvent") == 64 << 10
    assert limits.message_limit("/fedray.v1.Gateway/Assign") == 64 << 10


class _Gateway(pb_grpc.GatewayServicer):
    """Sends every client to the bridge (the real gateway needs Ray)."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def Assign(self, request, context):  # noqa: N802 - gRPC's name
        return pb.Assignment(client_id=request.name, combiner="c-test", address=self.address)


async def test_an_edge_client_rejoins_when_its_connection_ages_out_and_still_trains():
    from fedray.edge.client import EdgeRunner, EdgeSettings
    from fedray.edge.workers import CallbackWorker
    from fedray.messages import RoundSpec, TaskKind
    from tests.bridge import GOOD_EXAMPLES, MODEL

    bridge = await Bridge.start(limits=ServerLimits(max_connection_age_s=1.0,
                                                    max_connection_age_grace_s=0.5))
    gateway = grpc.aio.server()
    pb_grpc.add_GatewayServicer_to_server(_Gateway(bridge.address), gateway)
    gateway_port = gateway.add_insecure_port("127.0.0.1:0")
    await gateway.start()
    lines: list[str] = []
    worker = CallbackWorker(lambda params, config: (
        {k: v + 1 for k, v in params.items()}, GOOD_EXAMPLES, {}))
    edge = EdgeRunner(worker, EdgeSettings(gateway=f"127.0.0.1:{gateway_port}", name="e1",
                                           token=TOKEN, heartbeat_s=0.3,
                                           backoff_initial_s=0.1), say=lines.append)
    running = asyncio.ensure_future(edge.run())
    try:
        def rejoined() -> bool:
            assert not running.done(), lines  # the client gave up
            return connections(lines) >= 3

        await async_wait_until(rejoined, "the client to connect three times (two rejoins)",
                               timeout=15, describe=lambda: lines)
        spec = RoundSpec(session_id="s1", round=1, kind=TaskKind.TRAIN, clients=("e1",),
                         config={}, timeout_s=10)
        result = await bridge.core.run_round(spec, MODEL)
    finally:
        edge.stop.set()
        await asyncio.wait_for(running, 10)
        await gateway.stop(0)
        await bridge.close()
    assert result.updates == 1, (result, lines)


async def test_a_burst_of_assigns_asks_the_combiners_for_their_loads_once():
    """Each Assign made one Ray call to every combiner: a burst of reconnecting clients
    became a burst of calls on every combiner."""
    from collections import Counter

    from fedray.actors.balance import CombinerLoad
    from fedray.actors.controller.gateway import GatewayServicer

    class Pool:
        calls = 0

        async def balance(self, recent_s, settle_s):
            Pool.calls += 1
            await asyncio.sleep(0.05)  # behaviour: a slow Ray call, so the Assigns overlap
            return {"c0": CombinerLoad(0, "127.0.0.1:1"), "c1": CombinerLoad(0, "127.0.0.1:2")}

    gateway = GatewayServicer(Pool(), max_clients=100)
    answers = await asyncio.gather(*(gateway.Assign(pb.AssignRequest(name=f"n{i}"), None)
                                     for i in range(50)))
    assert Pool.calls == 1
    # still spread, within one, by the assignments made since
    assert sorted(Counter(a.combiner for a in answers).values()) == [25, 25]
    gateway.LOADS_S = 0.0  # the loads were asked >= 0.05 s ago (the call above took that)
    await gateway.Assign(pb.AssignRequest(name="late"), None)
    assert Pool.calls == 2  # stale loads are asked again


async def test_a_shared_token_cannot_take_over_a_connected_clients_stream(bridge):
    """Finding 5 of issue 14: with the shared token, a Join under a live client's id took
    over its stream, and the two knocked each other off."""

    first = bridge.stub.Join(pb.JoinRequest(client_id="site-a", name="site-a"),
                             metadata=METADATA)
    await first.wait_for_connection()
    bridge.joins.append(first)
    await async_wait_until(lambda: "site-a" in bridge.core.clients, "site-a online")
    # Another connection (a channel of its own: gRPC shares connections between channels).
    async with grpc.aio.insecure_channel(
            bridge.address, options=[("grpc.use_local_subchannel_pool", 1)]) as other:
        second = pb_grpc.CombinerStub(other).Join(
            pb.JoinRequest(client_id="site-a", name="site-a"), metadata=METADATA)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(second.read(), 10)
    assert refused.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert "own --name" in refused.value.details()
    assert bridge.core.registry.get("site-a") is not None and not first.done()
    # The same connection joining again (a client's own retry) still replaces its stream.
    again = bridge.stub.Join(pb.JoinRequest(client_id="site-a", name="site-a"),
                             metadata=METADATA)
    await again.wait_for_connection()
    bridge.joins.append(again)
    await async_wait_until(lambda: first.done(), "the old stream closed")
