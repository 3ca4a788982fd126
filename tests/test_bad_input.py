"""Bad updates through the real gRPC bridge: every one is refused with a clear reason, the
round's aggregate stays untouched, and the server goes on to accept a good update.

The bridge (``tests/bridge.py``) is a grpc.aio server on 127.0.0.1 hosting the combiner's
servicer over its core, with the real token interceptor and message limits; the inputs
are sent with raw ``fedray.bridge.proto`` stubs, as a hostile client would.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
import time

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.serialization import encode
from tests.bridge import (
    GOOD_EXAMPLES,
    GOOD_VALUE,
    METADATA,
    Bridge,
    chunk_parts,
    header,
    parts,
    update_bytes,
)
from tests.waiting import async_wait_until

CLIENTS = ["a", "b", "good"]


def _safetensors(entries: bytes | dict, data: bytes = b"\0" * 160) -> bytes:
    head = entries if isinstance(entries, bytes) else json.dumps(entries).encode()
    return struct.pack("<Q", len(head)) + head + data


def _w(**w) -> dict:
    """GLOBAL's layout as a safetensors header, with ``w``'s entry changed by ``w``."""
    return {"w": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128], **w},
            "b": {"dtype": "F32", "shape": [8], "data_offsets": [128, 160]}}


def _same(task, data, **over):
    return parts(header(task["a"], "a", data, **over), data)


def _swap(transform):
    def build(task):
        data = update_bytes(1.0)
        return transform(pb.UpdatePart(header=header(task["a"], "a", data)), chunk_parts(data, 64))
    return build


def _payload(data: bytes, **over):
    return lambda task: _same(task, data, **over)


def _with_header(**over):
    return lambda task: _same(task, update_bytes(1.0), **over)


BAD_PAYLOADS = {
    "extra tensor": (update_bytes(1.0, x=np.zeros(2, np.float32)), "wrong_names"),
    "renamed tensor": (encode(
        {"W": np.ones((4, 8), np.float32), "b": np.ones(8, np.float32)}), "wrong_names"),
    "missing tensor": (encode(
        {"w": np.ones((4, 8), np.float32)}), "wrong_names"),
    "transposed": (update_bytes(1.0, w=np.ones((8, 4), np.float32)), "wrong_shape"),
    "flattened": (update_bytes(1.0, w=np.ones(32, np.float32)), "wrong_shape"),
    "float64": (update_bytes(1.0, w=np.ones((4, 8), np.float64)), "wrong_dtype"),
    "int32": (update_bytes(1.0, b=np.ones(8, np.int32)), "wrong_dtype"),
    "nan": (update_bytes(1.0, b=np.array([0] * 7 + [np.nan], np.float32)), "non_finite"),
    "inf": (update_bytes(1.0, w=np.full((4, 8), np.inf, np.float32)), "non_finite"),
    "-inf": (update_bytes(1.0, b=np.array([-np.inf] + [0] * 7, np.float32)), "non_finite"),
    "random bytes": (os.urandom(300), "malformed"),
    "header length past the end": (struct.pack("<Q", 2**63) + b"{}", "malformed"),
    "header not json": (_safetensors(b"{not json"), "malformed"),
    "unsupported dtype": (_safetensors(_w(dtype="F8")), "malformed"),
    "dtype as a list": (_safetensors(_w(dtype=["F32"])), "malformed"),
    "dimension too large for int64": (_safetensors(_w(shape=[2**70, 8])), "malformed"),
    "dimensions that overflow int64": (_safetensors(_w(shape=[2**62, 4, 8], data_offsets=[0, 0])),
                                       "malformed"),
    "infinite dimension": (_safetensors(json.dumps(_w(shape=[4, 0.5])).replace("0.5", "Infinity")
                                        .encode()), "malformed"),
    "fractional dimension": (_safetensors(_w(shape=[4.5, 8])), "malformed"),
    "dimension as a string": (_safetensors(_w(shape=["4", 8])), "malformed"),
    "dimension as a boolean": (_safetensors(_w(shape=[4, 8, True])), "malformed"),
    "offsets as floats": (_safetensors(_w(data_offsets=[0.0, 128.0])), "malformed"),
    "entry not an object": (_safetensors({**_w(), "w": [1, 2]}), "malformed"),
    "deeply nested header": (_safetensors(b"[" * 50_000 + b"]" * 50_000), "malformed"),
    "offsets past the data": (_safetensors(_w(data_offsets=[0, 1 << 40])), "malformed"),
    "empty payload": (b"", "malformed"),
}

BAD_STREAMS = {
    "header size over the bound": (_with_header(size=10**9), "too_large"),
    "header size of 2**64-1": (_with_header(size=2**64 - 1), "too_large"),
    "more bytes than announced": (
        lambda task: [pb.UpdatePart(header=header(task["a"], "a", update_bytes(1.0),
                                                  size=len(update_bytes(1.0)) - 8)),
                      *chunk_parts(update_bytes(1.0))], "too_large"),
    "another round": (_with_header(round=2), "stale"),
    "another session": (_with_header(session_id="s0"), "stale"),
    "another model": (_with_header(model_id="0" * 64), "wrong_model"),
    "a task given to someone else": (
        lambda task: parts(header(task["a"], "b", update_bytes(1.0)), update_bytes(1.0)),
        "unknown_task"),
    "a forged task id": (_with_header(task_id="f" * 32), "unknown_task"),
    "no examples": (_with_header(num_examples=0), "no_examples"),
    "bad sha256": (_with_header(sha256="0" * 64), "checksum"),
    "chunks reversed": (_swap(lambda h, c: [h, *c[::-1]]), "out_of_order"),
    "a chunk repeated": (_swap(lambda h, c: [h, c[0], c[0], *c[1:]]), "out_of_order"),
    "a chunk skipped": (_swap(lambda h, c: [h, c[0], *c[2:]]), "out_of_order"),
    "a second header": (_swap(lambda h, c: [h, c[0], h, *c[1:]]), "malformed"),
    "no header": (_swap(lambda h, c: c), "malformed"),
    "empty stream": (_swap(lambda h, c: []), "malformed"),
    "header only": (_swap(lambda h, c: [h]), "truncated"),
    "cut short": (_swap(lambda h, c: [h, *c[:-1]]), "truncated"),
}


@pytest.mark.parametrize(("build", "reason"), [(_payload(d), r) for d, r in BAD_PAYLOADS.values()]
                         + list(BAD_STREAMS.values()),
                         ids=[*BAD_PAYLOADS, *BAD_STREAMS])
async def test_a_bad_update_is_refused_and_the_aggregate_is_untouched(bridge, build, reason):
    tasks = await bridge.open_round(CLIENTS)
    reply = await bridge.push(build(tasks))
    assert not reply.accepted and reply.reason.startswith(reason + ":") or reply.reason == reason, \
        reply.reason
    bridge.assert_untouched()
    await bridge.good_update_is_accepted(tasks["good"], "good")
    bridge.assert_untouched(count=1)


async def test_a_duplicate_is_refused_and_counted_once(bridge):
    tasks = await bridge.open_round(CLIENTS)
    await bridge.good_update_is_accepted(tasks["good"], "good")
    data = update_bytes(5.0)
    reply = await bridge.push(parts(header(tasks["good"], "good", data), data))
    assert not reply.accepted and reply.reason.startswith("duplicate")
    bridge.assert_untouched(count=1)


async def test_concurrent_copies_of_one_update_are_folded_once(bridge):
    """Two streams of the same task that both arrive before either is folded."""
    tasks = await bridge.open_round(CLIENTS)
    data = update_bytes(2.0)
    lock = bridge.core.share.fold_lock
    await lock.acquire()  # a long fold of someone else's update is in progress
    pushes = [asyncio.ensure_future(bridge.push(parts(header(tasks["good"], "good", data), data)))
              for _ in range(2)]
    # One copy is received and waits to fold; the other is refused while the first uploads
    # (or, had it arrived later, by the duplicate check under the fold lock).
    await async_wait_until(lambda: bridge.core.share.bytes_in >= len(data)
                           and any(p.done() for p in pushes),
                           "one copy received and the other refused")
    lock.release()
    replies = await asyncio.gather(*pushes)
    assert sorted(r.accepted for r in replies) == [False, True]
    assert any(r.reason.startswith("duplicate") for r in replies)
    bridge.assert_untouched(count=1)


async def test_a_client_that_cancels_mid_stream_leaves_nothing_behind(bridge):
    tasks = await bridge.open_round(CLIENTS)
    data = update_bytes(1.0)
    sent = asyncio.Event()

    async def half():
        for part in parts(header(tasks["a"], "a", data), data)[:2]:
            yield part
        sent.set()
        await asyncio.sleep(60)  # behaviour: a client that stops mid-stream

    call = bridge.stub.PushUpdate(half(), metadata=METADATA)
    await sent.wait()
    free = bridge.core.settings.max_inflight_uploads
    await async_wait_until(lambda: bridge.core.intake._slots._value == free - 1,
                           "the server to hold the header (an upload slot taken)")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await async_wait_until(lambda: bridge.core.intake._slots._value == free,
                           "the upload slot to come back")
    bridge.assert_untouched()
    # The partial upload is discarded; depending on whether the server saw the stream end
    # or the cancellation first, it is counted as truncated or not at all.
    assert bridge.core.share.rejected in ({}, {"truncated": 1})
    await bridge.good_update_is_accepted(tasks["good"], "good")
    bridge.assert_untouched(count=1)


async def test_a_stalled_upload_gives_up_its_slot_when_the_round_closes():
    """Uploads that stop sending cannot pin memory and upload slots past their round."""
    bridge = await Bridge.start(max_inflight_uploads=1)
    try:
        tasks = await bridge.open_round(CLIENTS, timeout=1.0)
        data = update_bytes(1.0)

        async def stalled():
            yield parts(header(tasks["a"], "a", data), data)[0]
            await asyncio.sleep(60)  # behaviour: an upload that stalls

        call = bridge.stub.PushUpdate(stalled(), metadata=METADATA)
        reply = await asyncio.wait_for(call, 5)
        assert not reply.accepted and reply.reason.startswith("round_closed"), reply.reason
        result = await asyncio.wait_for(bridge.round, 5)
        assert result.close_reason == "deadline" and result.partial.count == 0
        assert bridge.core.intake._slots._value == 1
        bridge.round = None
        tasks = await bridge.open_round(CLIENTS, round_=2)  # the next round still takes updates
        await bridge.good_update_is_accepted(tasks["good"], "good")
        bridge.assert_untouched(count=1)
    finally:
        await bridge.close()


def _metrics(**values) -> struct_pb2.Struct:
    metrics = struct_pb2.Struct()
    for key, value in values.items():
        metrics.fields[key].number_value = value
    return metrics


async def test_hostile_metrics_are_dropped_but_the_update_counts(bridge):
    """Non-finite numbers (no JSON for them) and keys no database can store."""
    tasks = await bridge.open_round(CLIENTS)
    metrics = _metrics(loss=0.5, nan=float("nan"), inf=float("inf"), huge=1e308)
    for key in ("", "$where", "nul\x00key", "k" * 1000):
        metrics.fields[key].number_value = 1.0
    metrics.fields["nested"].struct_value.fields["x"].number_value = 1.0
    data = update_bytes(GOOD_VALUE)
    reply = await bridge.push(parts(header(tasks["good"], "good", data, metrics=metrics), data))
    assert reply.accepted, reply.reason
    bridge.assert_untouched(count=1)
    sums = bridge.core.share.metrics.sums
    assert sums["loss"] == 0.5 * GOOD_EXAMPLES
    assert "huge" not in sums  # 1e308 x 10 examples is no longer finite
    assert set(sums) == {"loss"}


async def test_hostile_metrics_in_reports_and_events_do_not_break_the_rpc(bridge):
    bad = _metrics(nan=float("nan"))
    bad.fields["nul\x00"].number_value = 1.0
    await bridge.stub.PushValidation(pb.ValidationReport(client_id="a", task_id="t", metrics=bad),
                                     metadata=METADATA)
    await bridge.stub.PushEvent(pb.EventReport(client_id="a", level="error", message="m",
                                               data=bad),
                                metadata=METADATA)
    tasks = await bridge.open_round(CLIENTS)
    await bridge.good_update_is_accepted(tasks["good"], "good")


async def test_a_client_that_hangs_up_during_the_fold_is_still_counted_once(bridge):
    """All bytes arrived, so the update is folded; it must then also be counted."""
    tasks = await bridge.open_round(CLIENTS)
    accumulator = bridge.core.share.accumulator
    folding = threading.Event()
    fold = accumulator.fold

    def slow_fold(*args, **kwargs):
        folding.set()
        time.sleep(0.3)  # behaviour: a long fold, in the worker thread
        fold(*args, **kwargs)

    accumulator.fold = slow_fold
    data = update_bytes(GOOD_VALUE)
    call = bridge.stub.PushUpdate(iter(parts(header(tasks["good"], "good", data), data)),
                                  metadata=METADATA)
    assert await asyncio.to_thread(folding.wait, 10), "the fold did not start"
    call.cancel()
    async with bridge.core.share.fold_lock:  # the fold finishes before anyone reads the sums
        bridge.assert_untouched(count=1)


async def test_a_heartbeat_cannot_declare_its_client_offline_or_invent_a_status(bridge):
    await bridge.open_round(CLIENTS)
    for status in ("offline", "x" * 5000, "$where", "nul\x00"):
        reply = await bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="a", status=status),
                                            metadata=METADATA)
        assert reply.known
    assert bridge.core.online_clients() == sorted(CLIENTS)
    assert bridge.core.clients["a"].status == "online"
    await bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="a", status="training"),
                                metadata=METADATA)
    assert bridge.core.clients["a"].status == "training"


async def test_overlong_client_ids_names_and_versions_are_refused(bridge):
    for request in (pb.JoinRequest(client_id="i" * 300),
                    pb.JoinRequest(client_id="a", name="n" * 300),
                    pb.JoinRequest(client_id="a", version="v" * 300)):
        call = bridge.stub.Join(request, metadata=METADATA)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), 5)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bridge.core.clients == {}


async def test_clients_that_left_are_forgotten(bridge):
    """A stream of joins under fresh ids must not grow the combiner's memory for good."""
    for i in range(200):
        call = bridge.stub.Join(pb.JoinRequest(client_id=f"drive-by-{i}", name="n" * 256),
                                metadata=METADATA)
        await call.wait_for_connection()
        call.cancel()
    await async_wait_until(lambda: not bridge.core.clients, "the clients that left to be forgotten",
                           describe=lambda: len(bridge.core.clients))
    tasks = await bridge.open_round(CLIENTS)
    await bridge.good_update_is_accepted(tasks["good"], "good")
