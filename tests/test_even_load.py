"""Even load for real (Ray actors, gRPC edge clients): clients that start together spread
within one across the combiners, and a combiner Ray restarts gets its share back."""

from __future__ import annotations

import re
import time

import pytest
import ray
from test_federation import DeltaWorker

from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from fedray.tracking.store import TrackingStore
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

MOVED = "moved this client to even the load"


def _raw(name: str, tmp_path, combiners: int = 2, **rebalance) -> dict:
    return {
        "federation": name, "seed_model": "unused", "data_dir": str(tmp_path),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": combiners, "host": "127.0.0.1", "base_port": 0,
                      "heartbeat_interval_s": 0.5, "offline_after_s": 3, **rebalance},
        "tracking": {"database": f"t_{name.replace('-', '_')}"},
        "session": {"rounds": 1, "min_clients": 2, "validate": False},
    }


def _config(name: str, tmp_path, combiners: int = 2, **rebalance):
    return config_from_dict(_raw(name, tmp_path, combiners, **rebalance))


def _loads(config) -> dict[str, int]:
    """Each combiner's online clients, asked of the actors themselves (a restarting one
    raises: the caller's wait retries)."""
    names = [f"combiner-{i}" for i in range(config.combiners.count)]
    handles = [ray.get_actor(n, namespace=config.namespace) for n in names]
    infos = ray.get([h.info.remote() for h in handles], timeout=10)
    return {n: info["load"] for n, info in zip(names, infos, strict=True)}


def _even(loads: dict[str, int], total: int) -> bool:
    return sum(loads.values()) == total and max(loads.values()) - min(loads.values()) <= 1


def test_clients_that_start_together_spread_within_one(ray_session, tracking_uri, fleet,
                                                       tmp_path):
    # Rebalancing off: the spread is the gateway's assignments alone.
    config = _config("start-together", tmp_path, combiners=2, rebalance_max_moves_per_s=0)
    fed = Federation(config, None, tracking_uri).deploy()
    count = 201
    try:
        for i in range(count):  # all at once: each client's Assign races the others'
            fleet.add(f"s{i:02d}", DeltaWorker(1.0, 10), fed.gateway)
        loads = wait_until(lambda: (lambda got: got if sum(got.values()) == count else None)(
            _loads(config)), f"{count} clients online", timeout=60,
            describe=lambda: _loads(config))
    finally:
        fed.shutdown()
    assert sorted(loads.values()) == [count // 2, count - count // 2], loads
    assert not any(MOVED in line for line in fleet.lines)


def test_a_restarted_combiner_gets_its_share_back_as_clients_move(ray_session, tracking_uri,
                                                                  fleet, tmp_path):
    rate = 4  # moves a second
    config = _config("even-after-restart", tmp_path, combiners=2,
                     rebalance_max_moves_per_s=rate, rebalance_settle_s=1.0)
    fed = Federation(config, None, tracking_uri).deploy()
    count = 20
    try:
        for i in range(count):
            fleet.add(f"r{i:02d}", DeltaWorker(1.0, 10), fed.gateway, backoff_initial_s=0.2)
        wait_until(lambda: _even(_loads(config), count), f"{count} clients spread within one",
                   timeout=60, describe=lambda: _loads(config))
        lost = [n for n, r in fleet.runners.items() if r.combiner == "combiner-1"]
        mark = len(fleet.lines)
        ray.kill(ray.get_actor("combiner-1", namespace=config.namespace), no_restart=False)
        # combiner-1's clients rejoin through the gateway, which sends them to combiner-0
        # (they avoid the combiner they lost), whether or not Ray has combiner-1 back

        def rejoined() -> list[str]:
            return [n for n in lost if not any(line.startswith(f"[{n}] connected to combiner-0")
                                               for line in fleet.lines[mark:])]

        wait_until(lambda: not rejoined(), "combiner-1's clients on combiner-0", timeout=30,
                   describe=rejoined)
        back = time.monotonic()
        loads = wait_until(lambda: (lambda got: got if _even(got, count) else None)(
            _loads(config)), "the spread back within one", timeout=60, retry_on=(Exception,),
            describe=lambda: _loads(config))
        took = time.monotonic() - back
    finally:
        fed.shutdown()
    assert sorted(loads.values()) == [10, 10], loads
    moved = sum(MOVED in line for line in fleet.lines)
    assert moved >= count // 2, fleet.lines[-20:]
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    events = [e["message"] for e in tracking.find("events", {"data.reason": "rebalance"})]
    batches = [int(m.group(1)) for e in events if (m := re.match(r"rebalance: (\d+) client", e))]
    assert sum(batches) == moved, (batches, moved, events)  # each move a client saw, once
    assert max(batches) <= rate  # the churn bound: at most `rate` a tick of one second
    assert took >= (count // 2) / rate - 1.5  # 10 moves at 4 a second: not all at once


def test_clients_move_back_during_a_session_without_failing_a_round_task(
        ray_session, tracking_uri, fleet, tmp_path):
    """Moves take only clients that hold no task (done with the round, or not asked), and
    a round's planning waits until moved clients have rejoined: the rounds after the
    restart ask every client and lose no update to a move."""
    from test_federation import SEED, SlowWorker

    from fedray.serialization import encode
    from fedray.storage import open_model_store

    config = config_from_dict({**_raw("even-in-session", tmp_path, rebalance_max_moves_per_s=4,
                                      rebalance_settle_s=1.0),
                               "session": {"rounds": 12, "min_clients": 4, "validate": False,
                                           "round_timeout_s": 20, "wait_for_clients_s": 30}})
    seed_id = open_model_store("file", config.resolved_data_dir()).put(encode(SEED))
    fed = Federation(config, None, tracking_uri).deploy()
    count, killed = 8, []

    def on_status(status):
        if status["rounds_done"] == 2 and not killed:
            killed.append(time.monotonic())
            ray.kill(ray.get_actor("combiner-1", namespace=config.namespace), no_restart=False)

    try:
        for i in range(count):
            fleet.add(f"t{i}", SlowWorker(1.0, 10, 0.6), fed.gateway, backoff_initial_s=0.2)
        wait_until(lambda: _even(_loads(config), count), f"{count} clients spread within one",
                   timeout=60, describe=lambda: _loads(config))
        session_id = fed.start_session(seed_id)
        status = fed.follow(on_status)
    finally:
        fed.shutdown()
    assert killed and status["state"] == "finished", status
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    rounds = tracking.find("rounds", {"session_id": session_id, "status": "finished"},
                           sort=[("round", 1)])
    assert [r["round"] for r in rounds] == list(range(1, 13))
    assert any(MOVED in line for line in fleet.lines), fleet.lines[-20:]
    last = rounds[-1]["combiners"]
    assert sorted(c["asked"] for c in last.values()) == [4, 4], last  # its share is back
    late = [r for r in rounds if r["round"] >= 5]  # after the restart and the moves began
    failed = {r["round"]: {n: c["failures"] for n, c in r["combiners"].items() if c["failed"]}
              for r in late}
    assert not any(failed.values()), failed
    # every client asked answered (one in transit between combiners is not asked)
    assert all(c["updates"] == c["asked"] for r in late for c in r["combiners"].values()), \
        [(r["round"], r["combiners"]) for r in late]
    # and none was in transit when a round was planned (planning waits for moves to land)
    asked = [sum(c["asked"] for c in r["combiners"].values()) for r in rounds]
    assert all(a == count for a in asked[4:]), asked
