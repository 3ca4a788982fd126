"""Probes of the hardening issue against a real gRPC bridge: what a client with a valid
token could do to a combiner through its updates, and what stops it now.

Each test sends what the issue describes and checks three things: the combiner answers
quickly with a refusal and a reason (never UNKNOWN), the client's task is settled (the
round does not wait for it), and the aggregate holds only the honest updates.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time

import numpy as np

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.wire import to_struct
from fedray.serialization import encode
from tests.bridge import (
    GLOBAL,
    GOOD_VALUE,
    METADATA,
    Bridge,
    header,
    parts,
    update_bytes,
)
from tests.waiting import async_wait_until

CLIENTS = ["a", "b", "good"]
TRICKLE_S = 0.2  # a byte this often resets a 0.3 s idle timer, and is still too slow


def _with_header(head: bytes, payload: bytes) -> bytes:
    return struct.pack("<Q", len(head)) + head + payload


async def _settled(bridge: Bridge, client: str) -> None:
    await async_wait_until(lambda: client in bridge.core.share.settled,
                           f"{client}'s task to be settled")


async def test_integer_dimensions_thousands_of_digits_long_are_refused_at_once(bridge):
    tasks = await bridge.open_round(CLIENTS)
    huge = "9" * 4000  # fits the header bound; Python would build the int, then prod() it
    head = ('{"w":{"dtype":"F32","shape":[' + ",".join([huge] * 30) + '],'
            '"data_offsets":[0,128]},"b":{"dtype":"F32","shape":[8],"data_offsets":[128,160]}}')
    data = _with_header(head.encode(), b"\0" * 160)
    started = time.perf_counter()
    reply = await bridge.push(parts(header(tasks["a"], "a", data), data))
    assert time.perf_counter() - started < 0.5  # was seconds to minutes, with the GIL held
    assert not reply.accepted and reply.reason.startswith("malformed"), reply.reason
    await _settled(bridge, "a")
    bridge.assert_untouched()
    await bridge.good_update_is_accepted(tasks["good"], "good")
    bridge.assert_untouched(count=1)


async def test_a_header_larger_than_the_rounds_model_needs_is_refused_unread(bridge):
    tasks = await bridge.open_round(CLIENTS)
    filler = json.dumps({"__metadata__": {"x": "y" * (1 << 20)}})  # 1 MiB of header
    data = _with_header(filler.encode(), b"")
    started = time.perf_counter()
    reply = await bridge.push(parts(header(tasks["a"], "a", data), data, step=1 << 16))
    assert time.perf_counter() - started < 1.0
    assert not reply.accepted and reply.reason.startswith("malformed"), reply.reason
    assert "out of bounds" in reply.reason
    await _settled(bridge, "a")
    bridge.assert_untouched()


async def test_a_self_reported_weight_beyond_max_examples_is_refused():
    bridge = await Bridge.start()
    try:
        tasks = await bridge.open_round(CLIENTS, max_examples=100_000)
        data = update_bytes(1e30)
        for client, examples in (("a", 2**64 - 1), ("b", 2**62)):
            reply = await bridge.push(parts(header(tasks[client], client, data,
                                                   num_examples=examples), data))
            assert not reply.accepted and reply.reason.startswith("too_many_examples")
            assert "session.max_examples_per_update" in reply.reason
            await _settled(bridge, client)
        await bridge.good_update_is_accepted(tasks["good"], "good")
        bridge.assert_untouched(count=1)
        assert bridge.core.share.rejected == {"too_many_examples": 2}
    finally:
        await bridge.close()


async def test_values_that_would_overflow_the_sums_once_weighted_are_refused(bridge):
    """Finite float64 values of 1e300 weighted by a million examples are no finite sum:
    refused before the fold, so the aggregate stays finite (and untouched)."""
    wide = {k: v.astype(np.float64) for k, v in GLOBAL.items()}
    tasks = await bridge.open_round(["x", "honest"], model=wide)
    data = encode({"w": np.full((4, 8), 1e300), "b": np.zeros(8)})
    reply = await bridge.push(parts(header(tasks["x"], "x", data, num_examples=10**6), data))
    assert not reply.accepted and reply.reason.startswith("overflow"), reply.reason
    await _settled(bridge, "x")
    honest = encode({"w": np.ones((4, 8)), "b": np.ones(8)})
    reply = await bridge.push(parts(header(tasks["honest"], "honest", honest), honest))
    assert reply.accepted, reply.reason
    partial = bridge.core.share.accumulator.partial()
    assert partial.count == 1 and np.isfinite(partial.sums["w"]).all()
    np.testing.assert_array_equal(partial.sums["w"], 10.0)


async def test_an_update_too_far_from_the_rounds_model_is_refused_with_reason_norm():
    bridge = await Bridge.start()
    try:
        tasks = await bridge.open_round(CLIENTS, max_update_norm=50.0)
        far = update_bytes(100.0)  # ||update - 0|| = 100 * sqrt(40)
        reply = await bridge.push(parts(header(tasks["a"], "a", far), far))
        assert not reply.accepted and reply.reason.startswith("norm"), reply.reason
        assert "session.max_update_norm" in reply.reason
        await _settled(bridge, "a")
        await bridge.good_update_is_accepted(tasks["good"], "good")  # 2 * sqrt(40) ~ 12.6
        bridge.assert_untouched(count=1)
    finally:
        await bridge.close()


async def test_uploads_that_stall_after_their_header_give_their_slots_back():
    """Four stalled uploads held every slot until the round's deadline; now each is cut
    off after combiners.upload_idle_s without a chunk, and honest uploads get through."""
    bridge = await Bridge.start(max_inflight_uploads=4, upload_idle_s=0.5)
    try:
        stallers = ["s0", "s1", "s2", "s3"]
        tasks = await bridge.open_round([*stallers, "good"], timeout=30)
        data = update_bytes(1.0)

        def stalled(client):
            async def parts_then_nothing():
                yield parts(header(tasks[client], client, data), data)[0]
                await asyncio.sleep(60)  # behaviour: an upload that stalls after its header
            return bridge.stub.PushUpdate(parts_then_nothing(), metadata=METADATA)

        calls = [stalled(c) for c in stallers]
        await async_wait_until(lambda: bridge.core.intake._slots._value == 0,
                               "the stalled uploads to hold every slot")
        started = time.perf_counter()
        await bridge.good_update_is_accepted(tasks["good"], "good")
        assert time.perf_counter() - started < 3.0  # not the 30 s deadline
        replies = await asyncio.wait_for(asyncio.gather(*calls), 5)
        assert all(r.reason.startswith("stalled") for r in replies), [r.reason for r in replies]
        for client in stallers:
            await _settled(bridge, client)
        result = await asyncio.wait_for(bridge.round, 5)
        assert result.close_reason == "all_answered" and result.updates == 1
        assert bridge.core.intake._slots._value == 4
    finally:
        await bridge.close()


# -------------------------------------------------------------- found by a second review


async def test_ids_longer_than_any_combiner_hands_out_are_refused_before_they_are_copied():
    """A 4 MB session_id was copied into a rejection event on every push."""
    bridge = await Bridge.start()
    try:
        tasks = await bridge.open_round(CLIENTS, timeout=30)
        data = update_bytes(1.0)
        for field_name in ("session_id", "task_id", "model_id"):
            long_header = header(tasks["a"], "a", data, **{field_name: "x" * 1_000_000})
            reply = await bridge.push(parts(long_header, data))
            assert not reply.accepted and reply.reason.startswith("malformed"), reply.reason
        reply = await bridge.push(parts(header(tasks["a"], "a", data, sha256="ab"), data))
        assert reply.reason.startswith("malformed") and "sha256" in reply.reason
        await bridge.good_update_is_accepted(tasks["good"], "good")
        bridge.assert_untouched(1)
    finally:
        await bridge.close()


async def test_an_upload_that_never_sends_its_header_ends_after_upload_idle_s():
    bridge = await Bridge.start(upload_idle_s=0.3)
    try:
        async def nothing():
            await asyncio.sleep(30)  # behaviour: an upload that never sends its header
            yield  # pragma: no cover

        started = time.perf_counter()
        reply = await asyncio.wait_for(bridge.stub.PushUpdate(nothing(), metadata=METADATA), 5)
        assert reply.reason.startswith("stalled: no header"), reply.reason
        assert time.perf_counter() - started < 2.0
    finally:
        await bridge.close()


async def test_a_trickling_upload_is_cut_off_and_an_honest_one_gets_the_slot():
    """One byte every 0.2 s kept resetting a 0.3 s idle timer until the round's deadline."""
    bridge = await Bridge.start(max_inflight_uploads=1, upload_idle_s=0.3)
    try:
        tasks = await bridge.open_round(["slow", "good"], timeout=30)
        data = update_bytes(1.0)

        async def trickle():
            yield parts(header(tasks["slow"], "slow", data), data)[0]
            for offset in range(len(data)):
                await asyncio.sleep(TRICKLE_S)  # behaviour: one byte at a time, slowly
                yield pb.UpdatePart(chunk=pb.Chunk(data=data[offset : offset + 1],
                                                   offset=offset, total_size=len(data)))

        started = time.perf_counter()
        slow = asyncio.ensure_future(bridge.stub.PushUpdate(trickle(), metadata=METADATA))
        await async_wait_until(lambda: "slow" in bridge.core.share.uploading
                               and bridge.core.intake._slots._value == 0,
                               "the trickle to take the one upload slot")
        await bridge.good_update_is_accepted(tasks["good"], "good")
        assert time.perf_counter() - started < 3.0  # not the 30 s deadline
        reply = await asyncio.wait_for(slow, 5)
        assert reply.reason.startswith("too_slow"), reply.reason
        await _settled(bridge, "slow")
    finally:
        await bridge.close()


async def test_empty_chunks_are_no_sign_of_life_and_parts_are_bounded():
    bridge = await Bridge.start(upload_idle_s=0.3)
    try:
        tasks = await bridge.open_round(["a", "b", "good"], timeout=30)
        data = update_bytes(1.0)

        async def empties():
            yield parts(header(tasks["a"], "a", data), data)[0]
            for _ in range(100):
                await asyncio.sleep(0.05)  # behaviour: an empty chunk now and then
                yield pb.UpdatePart(chunk=pb.Chunk(data=b"", offset=0, total_size=len(data)))

        reply = await asyncio.wait_for(bridge.stub.PushUpdate(empties(), metadata=METADATA), 5)
        assert reply.reason.startswith(("stalled", "too_many_chunks")), reply.reason
        one_byte = [pb.UpdatePart(chunk=pb.Chunk(data=data[i : i + 1], offset=i))
                    for i in range(len(data))]
        reply = await bridge.push([parts(header(tasks["b"], "b", data), data)[0], *one_byte])
        assert reply.reason.startswith("too_many_chunks"), reply.reason
        await bridge.good_update_is_accepted(tasks["good"], "good")
        bridge.assert_untouched(1)
    finally:
        await bridge.close()


async def test_a_client_that_hangs_up_during_the_check_keeps_its_slot_until_it_ends():
    """The slot was given back while the shielded check still ran, so a client could start
    any number of model-sized checks at once."""
    bridge = await Bridge.start(max_inflight_uploads=2)
    try:
        tasks = await bridge.open_round(CLIENTS, timeout=30)
        checking, checked = threading.Event(), threading.Event()
        check = bridge.core.intake._verify

        def slow_check(*args):
            checking.set()
            checked.wait(30)  # a long check: it ends when the test says so
            return check(*args)

        bridge.core.intake._verify = slow_check
        calls = bridge.gate.in_flight._running  # the joins' streams, then the upload too
        before = sum(calls.values())
        data = update_bytes(GOOD_VALUE)
        call = bridge.stub.PushUpdate(iter(parts(header(tasks["good"], "good", data), data)),
                                      metadata=METADATA)
        try:
            assert await asyncio.to_thread(checking.wait, 5), "the check did not start"
            call.cancel()
            await async_wait_until(lambda: sum(calls.values()) == before,
                                   "the server to end the cancelled upload call")
            assert bridge.core.intake._slots._value == 1  # still held by the running check
            assert "good" in bridge.core.share.uploading
        finally:
            checked.set()
        await async_wait_until(lambda: bridge.core.intake._slots._value == 2,
                               "the check to end and give its slot back")
        assert not bridge.core.share.uploading
        bridge.assert_untouched(1)  # delivered and counted although the client left
    finally:
        await bridge.close()


async def test_a_strategy_error_of_fedrays_own_type_refuses_the_update_never_unknown():
    from fedray.errors import ConfigError

    bridge = await Bridge.start()
    try:
        tasks = await bridge.open_round(CLIENTS, timeout=30)

        def broken(update):
            raise ConfigError("the strategy is confused")

        bridge.core.share.accumulator.fold = broken
        data = update_bytes(1.0)
        reply = await bridge.push(parts(header(tasks["a"], "a", data), data))
        assert reply.reason.startswith("strategy_error"), reply.reason
        await _settled(bridge, "a")
    finally:
        await bridge.close()


async def test_refused_updates_sent_over_and_over_write_a_bounded_number_of_events():
    bridge = await Bridge.start()
    events: list[str] = []

    class Recorder:
        def event(self, level: str, message: str, **data) -> None:
            events.append(message)

    bridge.core.intake._events = Recorder()
    try:
        tasks = await bridge.open_round(CLIENTS, timeout=30)
        data = update_bytes(1.0)
        wrong = header(tasks["a"], "a", data, model_id="f" * 64)
        for _ in range(60):
            reply = await bridge.push(parts(wrong, data))
            assert not reply.accepted
        assert 25 <= len(events) <= 35 and bridge.core.intake.unrecorded >= 25
    finally:
        await bridge.close()


async def test_a_validation_is_counted_once_even_after_its_client_was_marked_gone():
    """A client that closed its task stream could replay its validation report without
    limit, and one report weighted by 2**64 - 1 examples decided the round's means."""
    from fedray.messages import TaskKind

    bridge = await Bridge.start()
    try:
        tasks = await bridge.open_round(CLIENTS, timeout=30, kind=TaskKind.VALIDATE,
                                        max_examples=1000)
        share = bridge.core.share
        report = pb.ValidationReport(client_id="a", task_id=tasks["a"].task_id,
                                     session_id="s1", round=1, model_id=tasks["a"].model_id,
                                     num_examples=10, metrics=to_struct({"accuracy": 0.5}))
        huge = pb.ValidationReport()
        huge.CopyFrom(report)
        huge.client_id, huge.task_id, huge.num_examples = "b", tasks["b"].task_id, 2**64 - 1
        await bridge.stub.PushValidation(huge, metadata=METADATA)
        bridge.joins[0].cancel()  # "a" closes its task stream: marked gone
        await async_wait_until(lambda: "a" in share.gone, "'a' to be marked gone")
        for _ in range(5):
            await bridge.stub.PushValidation(report, metadata=METADATA)
        assert [v.client_id for v in share.validations] == ["a"]
        assert share.accepted == 1 and "a" not in share.gone
    finally:
        await bridge.close()


async def test_the_norm_bound_measures_the_distance_from_the_model_not_the_size_of_the_update():
    """The cheap first check (||u|| + ||w||) cannot settle these: an update near a large
    model passes on its exact distance, one as far as the limit is refused."""
    model = {k: np.full(v.shape, 100.0, v.dtype) for k, v in GLOBAL.items()}
    bridge = await Bridge.start()
    try:
        tasks = await bridge.open_round(CLIENTS, max_update_norm=50.0, model=model)
        near = update_bytes(101.0)  # ||u - w|| = sqrt(40) ~ 6.3, ||u|| + ||w|| ~ 1270
        reply = await bridge.push(parts(header(tasks["a"], "a", near), near))
        assert reply.accepted, reply.reason
        far = update_bytes(110.0)  # 10 * sqrt(40) ~ 63 > 50
        reply = await bridge.push(parts(header(tasks["b"], "b", far), far))
        assert not reply.accepted and reply.reason.startswith("norm"), reply.reason
    finally:
        await bridge.close()
