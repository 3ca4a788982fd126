"""The elastic combiner tier for real (Ray actors, gRPC edge clients, one Ray node): a
swarm of clients joining grows the tier from 1 to 3 combiners, spread within 10%; when
most leave it drains back to 1; a session running meanwhile commits every round once."""

from __future__ import annotations

import time

import pytest
import ray
from test_federation import SEED, SlowWorker

from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from fedray.serialization import encode
from fedray.storage import open_model_store
from fedray.tracking.store import TrackingStore
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

DRAINED = "left the tier (drained)"
PER = 20  # clients_per_combiner (the 50, scaled down for CI)


def _config(name: str, tmp_path):
    return config_from_dict({
        "federation": name, "seed_model": "unused", "data_dir": str(tmp_path),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"min": 1, "max": 3, "clients_per_combiner": PER, "host": "127.0.0.1",
                      "base_port": 0, "heartbeat_interval_s": 0.5, "offline_after_s": 3,
                      "scale_interval_s": 0.5, "scale_cooldown_s": 3,
                      "rebalance_settle_s": 1.0, "rebalance_max_moves_per_s": 20},
        "tracking": {"database": f"t_{name.replace('-', '_')}"},
        "session": {"rounds": 10_000, "min_clients": 2, "validate": False,
                    "round_timeout_s": 20, "wait_for_clients_s": 60},
    })


def _loads(config) -> dict[str, int]:
    """Each combiner's online clients, asked of the actors themselves (one being removed
    raises: the caller's wait retries)."""
    names = sorted(e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
                   if e["namespace"] == config.namespace and e["name"].startswith("combiner-"))
    infos = ray.get([ray.get_actor(n, namespace=config.namespace).info.remote()
                     for n in names], timeout=10)
    return {n: info["load"] for n, info in zip(names, infos, strict=True)}


def _within(loads: dict[str, int], size: int, total: int) -> dict[str, int] | None:
    even = total / size
    ok = len(loads) == size and sum(loads.values()) == total \
        and all(abs(v - even) <= max(1.0, 0.1 * even) for v in loads.values())
    return loads if ok else None


def test_the_tier_grows_with_clients_and_shrinks_when_they_leave(ray_session, tracking_uri,
                                                                  fleet, tmp_path):
    config = _config("elastic", tmp_path)
    seed_id = open_model_store("file", config.resolved_data_dir()).put(encode(SEED))
    fed = Federation(config, None, tracking_uri).deploy()
    tier = lambda: ray.get(fed.controller.tier_status.remote(), timeout=10)  # noqa: E731
    timeline: list[tuple[float, str]] = []
    began = time.monotonic()

    def mark(what: str) -> None:
        timeline.append((round(time.monotonic() - began, 1), what))

    try:
        assert tier()["size"] == 1
        names = [f"e{i:02d}" for i in range(3 * PER)]
        for name in names[:4]:
            fleet.add(name, SlowWorker(1.0, 10, 0.2), fed.gateway, backoff_initial_s=0.2)
        session_id = fed.start_session(seed_id)
        for name in names[4:]:
            fleet.add(name, SlowWorker(1.0, 10, 0.2), fed.gateway, backoff_initial_s=0.2)
        mark(f"{len(names)} clients started")
        grown = wait_until(lambda: _within(_loads(config), 3, len(names)),
                           f"3 combiners with {PER} +-10% clients each", timeout=60,
                           retry_on=(Exception,), describe=lambda: (_loads(config), tier()))
        mark(f"tier at 3: {grown}")
        assert tier()["size"] == 3
        # those who stay are spread over the 3 combiners: the drained ones have clients to move
        by: dict[str, list[str]] = {}
        for name in names:
            by.setdefault(fleet.runners[name].combiner, []).append(name)
        staying = [n for group in zip(*by.values(), strict=False) for n in group][: PER // 2]
        assert len(by) == 3 and len(staying) == PER // 2, by
        leaving = [n for n in names if n not in staying]
        for name in leaving:
            fleet.stop(name)
        mark(f"{len(leaving)} clients stopped")
        shrunk = wait_until(
            lambda: (lambda t: _loads(config) if t["size"] == 1 and not t["draining"] else None)(
                tier()), "the tier back at 1", timeout=60, retry_on=(Exception,),
            describe=lambda: (_loads(config), tier()))
        mark(f"tier at 1: {shrunk}")
        wait_until(lambda: sum(_loads(config).values()) == PER // 2, "the clients left on one",
                   timeout=30, retry_on=(Exception,), describe=lambda: _loads(config))
        last = tier()["last_change"]
        ray.get(fed.controller.stop_session.remote(session_id, "test"), timeout=10)
        wait_until(lambda: ray.get(fed.controller.watch.remote(-1, 0.1))[1]["state"] == "stopped",
                   "the session stopped", timeout=60)
    finally:
        fed.shutdown()
    print("timeline", timeline)
    assert last["action"] == "removed" and last["size"] == 1, last
    assert any(DRAINED in line for line in fleet.lines), fleet.lines[-20:]
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    changes = [(e["data"].get("action", e["data"]["reason"]), e["data"]["combiner"])
               for e in tracking.find("events", {"data.reason": {"$regex": "^tier_"}},
                                      sort=[("created_at", 1)])]
    assert sorted(c for a, c in changes if a == "add") == ["combiner-1", "combiner-2"], changes
    assert "tier_trouble" not in [a for a, _ in changes], changes
    sent = tracking.find("events", {"data.reason": "drain"})  # each drained combiner's own
    assert sorted(e["source"] for e in sent) == sorted(c for a, c in changes if a == "drain")
    drained = sorted(c for a, c in changes if a == "drain")
    assert len(drained) == 2 and drained == sorted(c for a, c in changes if a == "removed")
    rounds = tracking.find("rounds", {"session_id": session_id}, sort=[("round", 1)])
    done = [r["round"] for r in rounds if r["status"] == "finished"]
    assert done == list(range(1, len(done) + 1)) and len(done) >= 3, done  # each once
    assert all(r["status"] == "finished" for r in rounds), [(r["round"], r["status"])
                                                            for r in rounds]
