"""Chunk reassembly as properties: an update is taken iff its chunks are exactly its
payload, in order. ``CombinerCore._receive`` alone (random cuts, shuffles, drops, repeats,
overflows, bad offsets against a random announced size) and the whole ``push_update`` of a
real round (checksum and checks included, with the aggregate read back).
"""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedray.actors.combiner.core import CombinerCore
from fedray.config import CombinersConfig
from fedray.errors import UpdateRejected
from fedray.messages import RoundSpec, TaskKind, UpdateHeader
from fedray.strategies.fedavg import FedAvg
from tests.bridge import GLOBAL, MODEL, update_bytes


def _chunkings(payload: bytes, data) -> list[tuple[bytes, int]]:
    """Random cuts of ``payload``, then maybe one corruption of the sequence."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=6), "cuts"))
    pieces = [(payload[a:b], a) for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    how = data.draw(st.sampled_from(["none", "none", "shuffle", "drop", "repeat", "extend",
                                     "shift", "flip"]), "corruption")
    if how == "shuffle":
        pieces = data.draw(st.permutations(pieces), "order")
    elif how in {"drop", "repeat"} and pieces:
        i = data.draw(st.integers(0, len(pieces) - 1), "index")
        pieces = pieces[:i] + pieces[i + 1:] if how == "drop" else pieces[:i + 1] + pieces[i:]
    elif how == "extend":
        pieces.append((data.draw(st.binary(min_size=1, max_size=9)), len(payload)))
    elif how == "shift" and pieces:
        i = data.draw(st.integers(0, len(pieces) - 1), "index")
        pieces[i] = (pieces[i][0], data.draw(st.integers(0, 2**64 - 1), "offset"))
    elif how == "flip" and payload:
        i = data.draw(st.integers(0, len(payload) - 1), "byte")
        flipped = payload[:i] + bytes([payload[i] ^ 0xFF]) + payload[i + 1:]
        pieces = [(flipped[o : o + len(c)], o) for c, o in pieces]
    return pieces


def _in_order(pieces: list[tuple[bytes, int]]) -> bool:
    at = 0
    for chunk, offset in pieces:
        if offset != at:
            return False
        at += len(chunk)
    return True


def _core() -> CombinerCore:
    core = CombinerCore("c", CombinersConfig())
    core.start_session("s", FedAvg())
    return core


async def _aiter(pieces):
    for piece in pieces:
        yield piece


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 260), st.data())
def test_receive_takes_exactly_the_announced_bytes_in_order(payload, announced, data):
    pieces = _chunkings(payload, data)
    hdr = UpdateHeader(client_id="a", task_id="t", session_id="s", round=1, model_id="m",
                       num_examples=1, metrics={}, size=announced)
    core = _core()
    total = sum(len(c) for c, _ in pieces)
    try:
        got, _ = asyncio.run(core.intake._receive(hdr, _aiter(pieces)))
    except UpdateRejected as exc:
        assert not (_in_order(pieces) and total == announced)
        assert exc.reason in {"out_of_order", "too_large", "truncated"}
        if _in_order(pieces):
            assert exc.reason == ("truncated" if total < announced else "too_large")
    else:
        assert _in_order(pieces) and total == announced
        assert got.tobytes() == b"".join(c for c, _ in pieces)


@settings(max_examples=150, deadline=None)
@given(st.floats(-1e6, 1e6, width=32), st.data())
def test_an_update_is_folded_iff_its_chunks_are_exactly_the_payload_in_order(value, data):
    async def scenario():
        core = _core()
        stream = core.tasks(core.connect("a", "a"))
        spec = RoundSpec(session_id="s", round=1, kind=TaskKind.TRAIN, clients=("a",),
                         config={}, timeout_s=30)
        run = asyncio.ensure_future(core.run_round(spec, MODEL))
        task = await anext(stream)
        payload = update_bytes(value)
        pieces = _chunkings(payload, data)
        hdr = UpdateHeader(client_id="a", task_id=task.task_id, session_id="s", round=1,
                           model_id=task.model_id, num_examples=3, metrics={},
                           size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
        accepted, why = await core.push_update(hdr, _aiter(pieces))
        if why.startswith("truncated"):  # the task stays open for a retry: the client gives up
            core.task_failed("a", task.task_id, "gave up")
        result = await asyncio.wait_for(run, 5)  # one client: the round closes either way
        return pieces, payload, accepted, result

    pieces, payload, accepted, result = asyncio.run(scenario())
    exact = _in_order(pieces) and b"".join(c for c, _ in pieces) == payload
    assert accepted == exact
    assert result.partial.count == int(exact) and result.updates == int(exact)
    for name, total in result.partial.sums.items():
        np.testing.assert_array_equal(total, np.full(GLOBAL[name].shape, 3.0 * value if exact
                                                     else 0.0))
