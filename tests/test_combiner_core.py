"""The combiner core driven in-process (no gRPC, no Ray): intake checks and round closing."""

from __future__ import annotations

import asyncio
import hashlib
import time

import numpy as np
import pytest

from fedray.actors.combiner.core import CombinerCore
from fedray.config import CombinersConfig
from fedray.messages import RoundSpec, TaskKind, UpdateHeader
from fedray.serialization import encode, model_id
from fedray.strategies.fedavg import FedAvg
from tests.waiting import async_wait_until

GLOBAL = {"w": np.zeros((2, 2), np.float32)}
MODEL = np.frombuffer(encode(GLOBAL), np.uint8)


class Recorder:
    def __init__(self):
        self.events, self.statuses = [], []

    def event(self, level, message, **data):
        self.events.append((level, message, data))

    def client_status(self, client_id, name, status, online, attrs=None, version=None,
                      connection=None):
        self.statuses.append((client_id, status))
        self.said = (attrs, version)

    def round_closed(self, result):
        self.events.append(("round", result.close_reason, {}))


def _core(**settings) -> CombinerCore:
    base = {"heartbeat_interval_s": 0.05, "offline_after_s": 0.2, "chunk_kib": 1}
    core = CombinerCore("c0", CombinersConfig(**{**base, **settings}), listener=Recorder())
    core.start_session("s", FedAvg())
    return core


def _spec(clients, round_=1, timeout=5.0, kind=TaskKind.TRAIN) -> RoundSpec:
    return RoundSpec(session_id="s", round=round_, kind=kind, clients=tuple(clients), config={},
                     timeout_s=timeout)


async def _chunks(data: bytes, step: int = 7, order=None):
    pieces = [(data[i : i + step], i) for i in range(0, len(data), step)]
    for piece in (order(pieces) if order else pieces):
        yield piece


async def _start(core, clients, **kw):
    links = {c: core.connect(c, c) for c in clients}
    streams = {c: core.tasks(link) for c, link in links.items()}
    run = asyncio.ensure_future(core.run_round(_spec(clients, **kw), MODEL))
    tasks = {c: await anext(stream) for c, stream in streams.items()}
    return run, tasks, streams


def _header(task, client, data: bytes, **over) -> UpdateHeader:
    fields = dict(client_id=client, task_id=task.task_id, session_id=task.session_id,
                  round=task.round, model_id=task.model_id, num_examples=10, metrics={},
                  size=len(data), sha256=hashlib.sha256(data).hexdigest())
    return UpdateHeader(**{**fields, **over})


def _update(value: float) -> bytes:
    return encode({"w": np.full((2, 2), value, np.float32)})


async def test_round_closes_when_everyone_answered_and_folds_the_mean():
    core = _core()
    run, tasks, _ = await _start(core, ["a", "b"])
    for client, value in (("a", 1.0), ("b", 3.0)):
        data = _update(value)
        assert await core.push_update(_header(tasks[client], client, data), _chunks(data)) == (True, "accepted")
    result = await asyncio.wait_for(run, 2)
    assert result.close_reason == "all_answered" and result.updates == 2
    assert result.partial.weight == 20 and result.partial.sums["w"][0, 0] == 40.0
    assert result.bytes_out == 0  # nobody fetched the model in this test


@pytest.mark.parametrize(("change", "reason"), [
    ({"round": 7}, "stale"),
    ({"session_id": "other"}, "stale"),
    ({"task_id": "forged"}, "unknown_task"),
    ({"model_id": "0" * 64}, "wrong_model"),
    ({"num_examples": 0}, "no_examples"),
    ({"size": 10**9}, "too_large"),
    ({"sha256": "0" * 64}, "checksum"),
])
async def test_bad_headers_are_refused_before_folding(change, reason):
    core = _core()
    run, tasks, _ = await _start(core, ["a", "b"])
    data = _update(1.0)
    accepted, why = await core.push_update(_header(tasks["a"], "a", data, **change), _chunks(data))
    assert not accepted and why.startswith(reason)
    assert core.share.accepted == 0
    run.cancel()


async def test_a_task_given_to_someone_else_cannot_be_answered():
    core = _core()
    run, tasks, _ = await _start(core, ["a", "b"])
    data = _update(1.0)
    accepted, why = await core.push_update(_header(tasks["a"], "b", data), _chunks(data))
    assert not accepted and why.startswith("unknown_task")
    run.cancel()


async def test_duplicates_out_of_order_and_truncated_streams():
    core = _core()
    run, tasks, _ = await _start(core, ["a", "b", "c"])
    data = _update(1.0)
    assert (await core.push_update(_header(tasks["a"], "a", data), _chunks(data)))[0]
    dup = await core.push_update(_header(tasks["a"], "a", data), _chunks(data))
    assert dup[1].startswith("duplicate")
    shuffled = await core.push_update(_header(tasks["b"], "b", data),
                                      _chunks(data, order=lambda p: p[::-1]))
    assert shuffled[1].startswith("out_of_order")

    async def short():
        yield data[:10], 0

    truncated = await core.push_update(_header(tasks["c"], "c", data), short())
    assert truncated[1].startswith("truncated")
    # A stream cut short is not the client's answer (gRPC ends a dropped call the same
    # way): its whole update, sent again, still counts.
    assert (await core.push_update(_header(tasks["c"], "c", data), _chunks(data)))[0]
    result = await asyncio.wait_for(run, 2)
    assert result.updates == 2 and result.rejections == {"out_of_order": 1, "truncated": 1}
    assert result.partial.sums["w"][0, 0] == 20.0


async def test_a_late_update_for_a_closed_round_is_dropped():
    core = _core()
    run, tasks, streams = await _start(core, ["a"], timeout=0.2)
    result = await asyncio.wait_for(run, 2)
    assert result.close_reason == "deadline" and result.updates == 0
    data = _update(1.0)
    accepted, why = await core.push_update(_header(tasks["a"], "a", data), _chunks(data))
    assert not accepted and why.startswith("round_closed")
    run2 = asyncio.ensure_future(core.run_round(_spec(["a"], round_=2), MODEL))
    await anext(streams["a"])
    stale = await core.push_update(_header(tasks["a"], "a", data), _chunks(data))
    assert stale[1].startswith("stale")
    run2.cancel()


async def test_run_round_twice_for_one_round_runs_it_once():
    core = _core()
    core.connect("a", "a")
    first = asyncio.ensure_future(core.run_round(_spec(["a"], timeout=0.2), MODEL))
    second = asyncio.ensure_future(core.run_round(_spec(["a"], timeout=0.2), MODEL))
    r1, r2 = await asyncio.wait_for(asyncio.gather(first, second), 2)
    assert r1 is r2 and core.clients["a"].queue.qsize() == 1  # one task was sent, not two


async def test_silent_clients_go_offline_and_release_the_round():
    core = _core()
    run, _, streams = await _start(core, ["a"])
    core.sweep()
    assert core.online_clients() == ["a"]
    silence = core.clients["a"].last_seen + core.settings.offline_after_s
    await async_wait_until(lambda: time.monotonic() > silence,
                           "'a' to be silent for longer than offline_after_s")
    core.sweep()
    assert core.online_clients() == []
    result = await asyncio.wait_for(run, 2)
    assert result.close_reason == "all_answered" and result.failed == 1
    assert ("a", "offline") in core.listener.statuses
    assert core.heartbeat("a") is False


async def test_offline_selected_client_counts_as_failed_at_dispatch():
    core = _core()
    result = await asyncio.wait_for(core.run_round(_spec(["ghost"]), MODEL), 2)
    assert result.failed == 1 and result.close_reason == "all_answered"


async def test_model_chunks_are_views_of_the_one_serialized_copy():
    core = _core()
    big = np.frombuffer(encode({"w": np.arange(1000, dtype=np.float32)}), np.uint8)
    stream = core.tasks(core.connect("a", "a"))
    run = asyncio.ensure_future(core.run_round(_spec(["a"], timeout=0.2), big))
    task = await anext(stream)
    assert task.model_id == model_id(big) and task.model_size == big.nbytes
    chunks = list(core.model_chunks(task.model_id))
    assert b"".join(bytes(c) for c, _, _ in chunks) == big.tobytes()
    assert len(chunks) == 4 and all(len(c) <= 1024 for c, _, _ in chunks)
    assert all(np.shares_memory(np.frombuffer(c, np.uint8), big) for c, _, _ in chunks)
    with pytest.raises(KeyError):
        next(core.model_chunks("f" * 64))
    await run


async def test_a_client_s_attributes_and_version_reach_its_listener():
    core = _core()

    core.connect("a", "a", {"site": "eu"}, "fedray-0.1")

    assert core.listener.said == ({"site": "eu"}, "fedray-0.1")


async def test_reconnect_replaces_the_old_stream():
    core = _core()
    old = core.connect("a", "a")
    old_stream = core.tasks(old)
    core.connect("a", "a")
    assert await anext(old_stream, None) is None
    assert core.online_clients() == ["a"]


async def test_an_update_from_a_client_marked_offline_still_counts_once():
    core = _core()
    run, tasks, _ = await _start(core, ["a", "b"])
    core.clients["a"].last_seen -= 10
    core.sweep()  # "a" looks dead: its task is settled as failed for now
    assert core.share.failed == 1
    data = _update(1.0)
    assert (await core.push_update(_header(tasks["a"], "a", data), _chunks(data)))[0]
    assert (await core.push_update(_header(tasks["b"], "b", data), _chunks(data)))[0]
    result = await asyncio.wait_for(run, 2)
    assert result.updates == 2 and result.failed == 0


async def test_an_update_still_waiting_to_fold_when_the_round_closes_is_refused():
    core = _core()
    run, tasks, _ = await _start(core, ["a", "b"], timeout=0.3)
    share = core.share
    await share.fold_lock.acquire()  # a long fold of someone else's update
    data = _update(1.0)
    push = asyncio.ensure_future(core.push_update(_header(tasks["b"], "b", data), _chunks(data)))
    await async_wait_until(lambda: share.bytes_in >= len(data), "'b' to be received")
    await asyncio.wait_for(share.closed.wait(), 5)  # the deadline passes while "b" waits to fold
    share.fold_lock.release()
    accepted, why = await push
    result = await asyncio.wait_for(run, 2)
    assert not accepted and why.startswith("round_closed")
    assert result.updates == 0 and result.partial.count == 0


async def test_a_client_cannot_hold_several_upload_slots_for_one_task():
    core = _core(max_inflight_uploads=2)
    run, tasks, _ = await _start(core, ["a", "b"])
    data = _update(1.0)
    release = asyncio.Event()

    async def slow():
        yield data[:8], 0
        await release.wait()
        yield data[8:], 8

    first = asyncio.ensure_future(core.push_update(_header(tasks["a"], "a", data), slow()))
    await async_wait_until(lambda: "a" in core.share.uploading, "'a' to be uploading")
    accepted, why = await core.push_update(_header(tasks["a"], "a", data), _chunks(data))
    assert not accepted and "already running" in why
    # the other client still finds a free slot while "a" is uploading
    assert (await core.push_update(_header(tasks["b"], "b", data), _chunks(data)))[0]
    release.set()
    assert (await first)[0]
    result = await asyncio.wait_for(run, 2)
    assert result.updates == 2


async def test_in_flight_uploads_are_bounded_by_max_inflight_uploads():
    core = _core(max_inflight_uploads=1)
    run, tasks, _ = await _start(core, ["a", "b"])
    data = _update(1.0)
    release = asyncio.Event()
    started_b = asyncio.Event()

    async def held():
        yield data[:8], 0
        await release.wait()
        yield data[8:], 8

    async def watched():
        started_b.set()  # only runs once "b" holds the single upload slot
        async for piece in _chunks(data):
            yield piece

    first = asyncio.ensure_future(core.push_update(_header(tasks["a"], "a", data), held()))
    await async_wait_until(lambda: core.intake._slots.locked(), "'a' to take the one slot")
    second = asyncio.ensure_future(core.push_update(_header(tasks["b"], "b", data), watched()))
    await async_wait_until(lambda: core.intake._slots._waiters, "'b' to wait for the slot")
    assert not started_b.is_set() and not second.done()  # "b" waits for the slot
    release.set()
    assert (await first)[0] and (await second)[0]
    assert (await asyncio.wait_for(run, 2)).updates == 2
