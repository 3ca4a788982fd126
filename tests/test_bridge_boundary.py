"""An exception no handler expected, at the combiner's and the gateway's gRPC servicers:
INTERNAL with a public line and a ref, never the exception's text; an error event with
the same ref (throttled); and the server goes on serving. Real gRPC on 127.0.0.1."""

from __future__ import annotations

import logging
import re
from typing import Any

import grpc
import pytest

from fedray.bridge.auth import AuthGate
from fedray.bridge.boundary import GUARDED, Boundary
from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.server import start_server
from tests.bridge import METADATA, TOKEN, Bridge, header, parts, status_of, update_bytes
from tests.waiting import async_wait_until

SECRET = "secret detail /home/x"
PUBLIC = re.compile(r"internal error in (.+) \(ref ([0-9a-f]{8})\); "
                    r"the federation's events hold the details")


class Recorder:
    """A listener (or an observer's ``event``) that keeps what would go to tracking."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def event(self, level: str, message: str, **data: Any) -> None:
        self.events.append((level, message, data))

    def client_status(self, *args: Any) -> None:
        pass

    def round_closed(self, *args: Any) -> None:
        pass

    def internal(self) -> list[dict[str, Any]]:
        return [data for level, _, data in self.events
                if level == "error" and data.get("reason") == "internal_error"]


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(SECRET)


@pytest.fixture
async def watched():
    bridge = await Bridge.start()
    recorder = bridge.core.listener = Recorder()
    try:
        yield bridge, recorder
    finally:
        await bridge.close()


async def _failure(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def _ref_of(error: grpc.aio.AioRpcError, where: str) -> str:
    details = error.details() or ""
    assert error.code() is grpc.StatusCode.INTERNAL, (error.code(), details)
    match = PUBLIC.fullmatch(details)
    assert match and match.group(1) == where, details
    assert "secret" not in details and "/home/x" not in details and "Traceback" not in details
    return match.group(2)


def _event_of(recorder: Recorder, ref: str, method: str) -> dict[str, Any]:
    (event,) = [data for data in recorder.internal() if data["ref"] == ref]
    assert event["method"] == method and event["error_class"] == "RuntimeError"
    assert SECRET in event["traceback"]  # the details are the operator's, in tracking
    return event


async def test_a_unary_rpc_that_raises_is_internal_with_a_ref_and_an_event(watched,
                                                                           monkeypatch):
    bridge, recorder = watched
    monkeypatch.setattr(bridge.core, "heartbeat", _raise)
    error = await _failure(bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="a"),
                                                 metadata=METADATA))
    ref = _ref_of(error, "combiner c-test")
    event = _event_of(recorder, ref, "Heartbeat")
    assert event["peer"].startswith("ipv4:127.0.0.1:")
    other = await status_of(bridge.stub.PushEvent(pb.EventReport(client_id="a", message="hi"),
                                                  metadata=METADATA))
    monkeypatch.undo()
    again = await bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="a"), metadata=METADATA)
    assert other is grpc.StatusCode.OK and again.known is False  # the server still serves


async def test_a_server_streaming_rpc_that_raises_before_or_after_a_message(watched,
                                                                            monkeypatch):
    bridge, recorder = watched
    monkeypatch.setattr(bridge.core, "connect", _raise)
    join = bridge.stub.Join(pb.JoinRequest(client_id="a", name="a"), metadata=METADATA)
    ref = _ref_of(await _failure(join.read()), "combiner c-test")
    _event_of(recorder, ref, "Join")

    def one_chunk_then_a_bug(wanted: str, delta_from: str = ""):
        yield memoryview(b"12345678"), 0, 16
        raise RuntimeError(SECRET)

    monkeypatch.setattr(bridge.core, "model_chunks", one_chunk_then_a_bug)
    fetch = bridge.stub.FetchModel(pb.FetchModelRequest(model_id="m" * 64), metadata=METADATA)
    first = await fetch.read()
    assert first.data == b"12345678" and first.total_size == 16
    ref = _ref_of(await _failure(fetch.read()), "combiner c-test")
    _event_of(recorder, ref, "FetchModel")

    monkeypatch.undo()
    tasks = await bridge.open_round(["b"])  # Join and the round still work
    await bridge.good_update_is_accepted(tasks["b"], "b")
    bridge.assert_untouched(1)


async def test_a_client_streaming_rpc_that_raises_is_internal(watched, monkeypatch):
    bridge, recorder = watched
    tasks = await bridge.open_round(["a"])

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(bridge.core, "push_update", broken)
    data = update_bytes(2.0)
    error = await _failure(bridge.push(parts(header(tasks["a"], "a", data), data)))
    _event_of(recorder, _ref_of(error, "combiner c-test"), "PushUpdate")
    monkeypatch.undo()
    await bridge.good_update_is_accepted(tasks["a"], "a")


async def test_chosen_statuses_bad_bytes_and_cancelled_calls_pass_through(watched):
    bridge, recorder = watched
    missing = bridge.stub.FetchModel(pb.FetchModelRequest(model_id="0" * 64), metadata=METADATA)
    error = await _failure(missing.read())
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == "model 000000000000 is not served by this combiner"
    push = bridge.channel.stream_unary("/fedray.v1.Combiner/PushUpdate",
                                       request_serializer=lambda raw: raw,
                                       response_deserializer=pb.PushReply.FromString)
    garbage = await _failure(push(iter([b"\xff" * 8]), metadata=METADATA))
    assert garbage.code() is grpc.StatusCode.UNKNOWN  # gRPC's parse error: the client's bytes
    assert "Error parsing message" in (garbage.details() or "")
    join = bridge.stub.Join(pb.JoinRequest(client_id="gone", name="gone"), metadata=METADATA)
    await join.wait_for_connection()
    await async_wait_until(lambda: "gone" in bridge.core.clients, "the client to join")
    join.cancel()
    await async_wait_until(lambda: "gone" not in bridge.core.clients,
                           "the cancelled Join to end")
    assert recorder.internal() == []


async def test_a_client_repeating_a_failing_call_cannot_flood_tracking(watched, monkeypatch,
                                                                       caplog):
    bridge, recorder = watched
    monkeypatch.setattr(bridge.core, "heartbeat", _raise)
    caplog.set_level(logging.ERROR, logger="fedray.bridge.boundary")
    errors = [await _failure(bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="a"),
                                                   metadata=METADATA)) for _ in range(60)]
    refs = [_ref_of(e, "combiner c-test") for e in errors]
    assert len(set(refs)) == 60  # every call has its own ref
    recorded = recorder.internal()
    assert 1 <= len(recorded) <= 21, len(recorded)  # EventThrottle: a burst of 20, then 1/5 s
    logged = caplog.text
    assert all(ref in logged for ref in refs)  # an operator finds every ref in the log
    assert logged.count("Traceback") == len(recorded)  # but the traceback only once an event


def test_the_boundary_counts_what_it_did_not_record():
    from fedray.bridge.limits import EventThrottle

    recorder = Recorder()
    throttle = EventThrottle(burst=1, every_s=3600.0)
    boundary = Boundary("the gateway", recorder.event, throttle)
    boundary.report("Assign", RuntimeError(SECRET))
    boundary.report("Assign", RuntimeError(SECRET))
    throttle.limiter._buckets.clear()  # the time to the next recorded event has passed
    boundary.report("Assign", RuntimeError(SECRET))
    assert [e["suppressed"] for e in recorder.internal()] == [0, 1]


def test_every_rpc_of_both_servicers_is_guarded():
    from fedray.actors.combiner.servicer import CombinerServicer
    from fedray.actors.controller.gateway import GatewayServicer

    for servicer, base in [(CombinerServicer, pb_grpc.CombinerServicer),
                           (GatewayServicer, pb_grpc.GatewayServicer)]:
        rpcs = [n for n, v in vars(base).items() if callable(v) and not n.startswith("_")]
        assert rpcs and all(getattr(getattr(servicer, n), GUARDED, False) for n in rpcs), \
            (servicer, rpcs)


async def test_the_gateway_answers_a_bug_with_internal_and_an_event_of_the_controller():
    from fedray.actors.balance import CombinerLoad
    from fedray.actors.controller.gateway import GatewayServicer

    class Pool:
        broken = True

        async def balance(self, recent_s, settle_s):
            if Pool.broken:
                raise RuntimeError(SECRET)
            return {"combiner-0": CombinerLoad(0, "127.0.0.1:1")}

    observer = Recorder()
    gateway = GatewayServicer(Pool(), max_clients=10, on_event=observer.event)
    gateway.LOADS_S = 0.0  # no cached failure: the next call asks the pool again

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_GatewayServicer_to_server(gateway, server)

    gate = AuthGate(TOKEN)
    server, port = await start_server(register, "127.0.0.1", 0, gate)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GatewayStub(channel)
    try:
        error = await _failure(stub.Assign(pb.AssignRequest(name="a"), metadata=METADATA))
        ref = _ref_of(error, "the gateway")
        _event_of(observer, ref, "Assign")
        Pool.broken = False  # a failed ask is never reused: the next Assign asks again
        answer = await stub.Assign(pb.AssignRequest(name="a"), metadata=METADATA)
    finally:
        await channel.close()
        await server.stop(0)
        await gate.close()
    assert answer.combiner == "combiner-0" and answer.address == "127.0.0.1:1"
