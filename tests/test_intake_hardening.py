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
import time

import numpy as np

from fedray.serialization import encode
from tests.bridge import (
    GLOBAL,
    METADATA,
    Bridge,
    header,
    parts,
    update_bytes,
)

CLIENTS = ["a", "b", "good"]


def _with_header(head: bytes, payload: bytes) -> bytes:
    return struct.pack("<Q", len(head)) + head + payload


async def _settled(bridge: Bridge, client: str) -> None:
    for _ in range(100):
        if client in bridge.core.share.settled:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{client}'s task was not settled")


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
                await asyncio.sleep(60)
            return bridge.stub.PushUpdate(parts_then_nothing(), metadata=METADATA)

        calls = [stalled(c) for c in stallers]
        await asyncio.sleep(0.2)
        assert bridge.core.intake._slots._value == 0  # every slot is held
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
