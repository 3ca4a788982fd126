"""Soak: 150 rounds of a 2,000,000-parameter model hold the actors' memory flat.

Real Ray actors, real gRPC on 127.0.0.1, two in-process edge clients, one combiner, no
validation, training that adds a constant. Each actor's memory is read from
/proc/<pid>/status after round 10 (past warm-up) and after round 150 (hardening #9: a
combiner that kept every round's float64 partial sums grew by 16 MB a round here).

What is compared is the actor's own memory, VmRSS - RssShmem. RssShmem counts the pages of
Ray's object store the process has touched (models and partials are read from it
zero-copy); it climbs by up to ~40 MB over the first 30-100 rounds as the store hands out
new addresses, and it is the node's object store, not the actor's (Ray's memory docs:
measure a worker's heap as RSS minus shared memory). What the store itself holds is
checked separately, from the raylet's figures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import numpy as np
import pytest

from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from fedray.serialization import decode, encode
from fedray.storage import open_model_store
from tests.waiting import wait_connected, wait_until

pytestmark = pytest.mark.integration

ROUNDS = 150
WARM = 10  # the reference round: warm-up (imports, first allocations, caches) is behind
PARAMS = 2_000_000  # float32, in 4 tensors: an 8 MB model
GROWTH = 1.2  # allowed: RSS after ROUNDS <= GROWTH * RSS after WARM
SEED = {f"layer{i}.weight": np.zeros(PARAMS // 4, np.float32) for i in range(4)}
MODEL_BYTES = PARAMS * 4
READING_GAP_S = 0.05  # between the three memory readings of one sample


class StepWorker:
    """'Trains' by adding a small constant: the runtime's own work is what is measured."""

    def train(self, model: bytes, config: dict):
        new = {k: v + np.float32(1e-3) for k, v in decode(model).items()}
        return encode(new), 10, {"loss": 1.0}

    def validate(self, model: bytes, config: dict):
        return 10, {}


def _config(tmp_path):
    return config_from_dict({
        "federation": "soak", "seed_model": "unused", "data_dir": str(tmp_path),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 1, "host": "127.0.0.1", "base_port": 0},
        "tracking": {"database": "t_soak"},
        "session": {"rounds": ROUNDS, "min_clients": 2, "round_timeout_s": 60,
                    "validate": False, "wait_for_clients_s": 30},
    })


def _memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and the process's own part of it (VmRSS - RssShmem), in MiB; the lowest of
    three readings, so memory a round has in flight right then does not count."""
    readings = []
    for attempt in range(3):
        if attempt:
            time.sleep(READING_GAP_S)  # behaviour: separate samples, not a wait for anything
        with open(f"/proc/{pid}/status") as fh:
            kib = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in fh)
                   if k in ("VmRSS", "RssShmem")}
        readings.append({"rss": kib["VmRSS"] / 1024,
                         "own": (kib["VmRSS"] - kib["RssShmem"]) / 1024})
    return min(readings, key=lambda r: r["own"])


def _object_store_mb() -> float:
    import ray._private.internal_api as internal
    import ray._private.state as ray_state

    stats = internal.get_memory_info_reply(ray_state.state, timeout_seconds=10).store_stats
    return stats.object_store_bytes_used / 2**20


def _settled_store_mb(limit_mb: float, timeout_s: float = 10.0) -> float:
    """The object store's use once it is at most ``limit_mb`` (frees are asynchronous), or
    the lowest seen in ``timeout_s`` (the caller's assertion reports it)."""
    seen = [float("inf")]

    def settled() -> bool:
        seen.append(_object_store_mb())
        return min(seen) <= limit_mb

    with contextlib.suppress(AssertionError):  # not settled: the lowest seen tells by how much
        wait_until(settled, f"the object store to hold at most {limit_mb:.0f} MiB",
                   timeout=timeout_s, poll_s=0.2)
    return min(seen)


def test_150_rounds_keep_combiner_and_controller_memory_flat(ray_session, tracking_uri, fleet,
                                                              tmp_path):
    import ray

    config = _config(tmp_path)
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(SEED))
    baseline_mb = _object_store_mb()  # what earlier tests may have left
    fed = Federation(config, None, tracking_uri).deploy()
    samples: dict[int, dict[str, dict[str, float]]] = {}
    store_mb: dict[int, float] = {}
    try:
        pids = dict(zip(("combiner", "controller"), ray.get(
            [h.__ray_call__.remote(lambda self: os.getpid())
             for h in (fed.combiners[0], fed.controller)]), strict=True))
        for i in range(2):
            fleet.add(f"soak-{i}", StepWorker(), fed.gateway)
        wait_connected(fleet, 2)

        def on_status(status):
            done = status["history"][-1]["round"] if status["history"] else 0
            for mark in (WARM, ROUNDS):  # once each round is done (committed, released)
                if done >= mark and mark not in samples:
                    samples[mark] = {name: _memory_mb(pid) for name, pid in pids.items()}
                    store_mb[mark] = _object_store_mb()

        started = time.monotonic()
        fed.start_session(seed_id)
        status = fed.follow(on_status)
        seconds = time.monotonic() - started
        # Left in the store: the last model, and the one before it that the combiner keeps.
        limit_mb = baseline_mb + 4 * MODEL_BYTES / 2**20
        settled_mb = _settled_store_mb(limit_mb)
    finally:
        fed.shutdown()
        shutil.rmtree(config.resolved_data_dir() / "models", ignore_errors=True)  # 1.2 GB

    assert status["state"] == "finished" and status["rounds_done"] == ROUNDS, status
    report = "; ".join(
        f"{name}: own {samples[WARM][name]['own']:.0f} -> {samples[ROUNDS][name]['own']:.0f} "
        f"MiB (VmRSS {samples[WARM][name]['rss']:.0f} -> {samples[ROUNDS][name]['rss']:.0f})"
        for name in pids) + (f"; object store {store_mb[WARM]:.0f} -> {store_mb[ROUNDS]:.0f} "
                             f"MiB, {settled_mb:.0f} MiB once settled (before the session "
                             f"{baseline_mb:.0f}); {ROUNDS} rounds in {seconds:.1f}s")
    print(report)
    for name in pids:
        assert samples[ROUNDS][name]["own"] <= GROWTH * samples[WARM][name]["own"], report
    # No model or partial of a finished round stays in the object store.
    assert settled_mb <= limit_mb, report
