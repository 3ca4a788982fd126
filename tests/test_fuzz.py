"""Fuzzing a running federation: random bytes and random valid-looking protobufs at every
RPC of the gateway and the combiner, then, during a session, a hostile client that holds a
real task and answers it with mutated updates. Afterwards the session must finish with
exactly the honest clients' mean, tracking must hold the round, and no actor may have been
restarted (same PIDs, no restart event).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from collections import Counter

import grpc
import numpy as np
import pytest
import ray

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.wire import auth_metadata
from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from fedray.serialization import decode, encode
from fedray.storage import open_model_store
from fedray.tracking.store import TrackingStore
from tests.fuzzing import Fuzzer, fuzz
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token"
SEED = {"w": np.zeros((4, 8), np.float32), "b": np.zeros(8, np.float32)}
ITERATIONS = 400  # before the session; the hostile client adds about 100 more
HEARTBEAT_S = 0.5  # the hostile client beats like an honest one (offline_after_s is 3)
BACKOFF_S = 0.2  # and pauses when the combiner refuses a call (e.g. over its RPC rate)


class Honest:
    """Adds ``delta`` to every weight; reports metrics with names tracking cannot store."""

    def __init__(self, delta: float, examples: int) -> None:
        self.delta, self.examples = delta, examples

    def train(self, model: bytes, config: dict):
        new = {k: (v + self.delta).astype(v.dtype) for k, v in decode(model).items()}
        return encode(new), self.examples, {"loss": self.delta, "nul\x00key": 1.0, "$where": 2.0}

    def validate(self, model: bytes, config: dict):
        return self.examples, {"accuracy": 0.5}


def _bad_payloads(rng: random.Random) -> bytes:
    """An update that must never be folded (the honest mean is checked to the last bit)."""
    ones = {k: np.ones_like(v) for k, v in SEED.items()}
    return rng.choice([
        encode({**ones, "w": np.full((4, 8), np.nan, np.float32)}),
        encode({**ones, "w": np.ones((8, 4), np.float32)}),
        encode({**ones, "b": np.ones(8, np.float64)}),
        encode({"w": ones["w"]}),
        rng.randbytes(rng.randrange(1, 400)),
    ])


async def _hostile_client(address: str, fuzzer: Fuzzer, pushes: int, log: Counter) -> None:
    """Join as a client, take the round's task, answer it with ``pushes`` mutated updates
    (real ids with random fields changed, bad payloads, broken chunk streams), leave."""
    rng = fuzzer.rng
    md = auth_metadata(TOKEN, "hostile")
    async with grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.CombinerStub(channel)
        join = stub.Join(pb.JoinRequest(client_id="hostile", name="hostile"), metadata=md)

        async def beat():
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Heartbeat(pb.HeartbeatRequest(client_id="hostile"), metadata=md)
                await asyncio.sleep(HEARTBEAT_S)  # behaviour: a client's heartbeat period

        beats = asyncio.ensure_future(beat())
        try:
            task = await asyncio.wait_for(join.read(), 60)
            fuzzer.known += [task.task_id, task.session_id, task.model_id]
            log["task"] += 1
            for _ in range(pushes):
                data = _bad_payloads(rng)
                header = pb.UpdateHeader(
                    client_id="hostile", task_id=task.task_id, session_id=task.session_id,
                    round=task.round, model_id=task.model_id, num_examples=rng.randrange(1, 99),
                    size=len(data), sha256=hashlib.sha256(data).hexdigest())
                other = fuzzer.message(pb.UpdateHeader)
                for field in rng.sample(["task_id", "session_id", "round", "model_id", "size",
                                         "num_examples", "sha256"], rng.randrange(3)):
                    setattr(header, field, getattr(other, field))
                header.metrics.CopyFrom(fuzzer.struct())
                step = rng.choice([1, 7, 64, 4096])
                parts = [pb.UpdatePart(header=header)] + [
                    pb.UpdatePart(chunk=pb.Chunk(data=data[i : i + step], offset=i))
                    for i in range(0, len(data), step)]
                if rng.random() < 0.3:
                    rng.shuffle(parts)
                if rng.random() < 0.2:
                    parts = parts[: rng.randrange(len(parts) + 1)]
                try:
                    reply = await stub.PushUpdate(iter(parts), metadata=md, timeout=5)
                except grpc.aio.AioRpcError as exc:  # e.g. over its RPC rate
                    log[exc.code().name] += 1
                    await asyncio.sleep(BACKOFF_S)  # behaviour: a refused client backs off
                    continue
                log["accepted" if reply.accepted else reply.reason.split(":")[0]] += 1
                if rng.random() < 0.1:  # and the other RPCs, now with ids that exist
                    await fuzzer.round_of(channel, rng.choice(["/fedray.v1.Combiner/PushEvent",
                                                               "/fedray.v1.Combiner/Heartbeat"]))
        finally:
            beats.cancel()
            join.cancel()


def _pid(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))


def test_fuzzing_every_rpc_leaves_a_federation_that_completes_its_round(
        ray_session, tracking_uri, fleet, tmp_path):
    config = config_from_dict({
        "federation": "fuzz", "seed_model": "unused", "data_dir": str(tmp_path),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 1, "host": "127.0.0.1", "base_port": 0,
                      "heartbeat_interval_s": 0.5, "offline_after_s": 3},
        "tracking": {"database": "t_fuzz"},
        "session": {"rounds": 1, "min_clients": 2, "round_timeout_s": 30, "validate": False,
                    "wait_for_clients_s": 30},
    })
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(SEED))
    fed = Federation(config, TOKEN, tracking_uri).deploy()
    try:
        combiner = fed.combiner_info[0]["address"]
        pids = (_pid(fed.controller), _pid(fed.combiners[0]))
        fuzzer = Fuzzer(seed=20240, token=TOKEN, known=[seed_id, "combiner-0", "c1"])
        started = time.monotonic()
        asyncio.run(fuzz(fed.gateway, combiner, fuzzer, ITERATIONS, budget_s=20))
        fuzz_s = time.monotonic() - started
        assert sum(fuzzer.outcomes.values()) >= ITERATIONS // 2, fuzzer.outcomes

        hostile = Counter()
        attack = asyncio.run_coroutine_threadsafe(
            _hostile_client(combiner, fuzzer, 100, hostile), fleet.loop)
        fleet.add("c1", Honest(1.0, 10), fed.gateway, token=TOKEN)
        fleet.add("c2", Honest(3.0, 30), fed.gateway, token=TOKEN)
        wait_until(lambda: len(ray.get(fed.combiners[0].online_clients.remote())) == 3,
                   "three clients online", describe=lambda: fleet.lines)
        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
        attack.result(timeout=30)
        assert status["state"] == "finished", status
        assert (_pid(fed.controller), _pid(fed.combiners[0])) == pids
    finally:
        fed.shutdown()
    assert not fuzzer.findings, fuzzer.findings[:10]
    assert hostile["task"] == 1 and hostile["accepted"] == 0, hostile
    final = decode(store.get(status["model_id"]))
    for name in SEED:
        np.testing.assert_array_equal(final[name], np.float32(2.5))  # (1*10 + 3*30) / 40
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    round_doc = tracking.get_round(status["session_id"], 1)
    assert round_doc["status"] == "finished" and round_doc["updates"] == 2
    assert round_doc["train_metrics"] == {"loss": 2.5}
    events = tracking.find("events", {"source": "combiner-0"})
    assert not [e for e in events if "restarted" in e["message"]]
    print(f"fuzzed {sum(fuzzer.outcomes.values())} calls in {fuzz_s:.1f}s: "
          f"{dict(fuzzer.outcomes)}; hostile client: {dict(hostile)}; slowest: {fuzzer.slowest}")
