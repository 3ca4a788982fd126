"""A three-node Ray cluster on this machine, and fedray's elastic tier on it.

Run as a process of its own by ``test_cluster_elastic.py`` (``python
tests/cluster_elastic_app.py TRACKING_URI FOLDER``): it builds the cluster with
``ray.cluster_utils.Cluster`` (a head and two workers, each a raylet of its own), deploys
a federation with ``combiners: {min: 1, max: 3, clients_per_combiner: 10}``, starts 30
edge clients (one event loop), waits for the tier to grow to 3 combiners with the
clients spread, notes each combiner's node, stops 25 clients and waits for the tier to
drain back to 1. It prints one JSON line with what it found. Its own temp dir and
address, like ``cluster_placement_app.py``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray._private.utils
from ray.cluster_utils import Cluster

from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from tests.conftest import EdgeFleet
from tests.test_federation import DeltaWorker
from tests.waiting import wait_until

PER = 10


def _config(folder: Path):
    return config_from_dict({
        "federation": "elastic-nodes", "seed_model": "unused", "data_dir": str(folder),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"min": 1, "max": 3, "clients_per_combiner": PER, "host": "127.0.0.1",
                      "base_port": 0, "heartbeat_interval_s": 0.5, "offline_after_s": 3,
                      "scale_interval_s": 0.5, "scale_cooldown_s": 3,
                      "rebalance_settle_s": 1.0},
        "tracking": {"database": f"t_elastic_nodes_{os.getpid()}"},
        "session": {"rounds": 1, "min_clients": 1, "validate": False},
    })


def _where(config) -> dict[str, dict]:
    names = sorted(e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
                   if e["namespace"] == config.namespace and e["name"].startswith("combiner-"))
    infos = ray.get([ray.get_actor(n, namespace=config.namespace).info.remote()
                     for n in names], timeout=10)
    return {n: {"node": i["node_id"], "load": i["load"]} for n, i in zip(names, infos,
                                                                         strict=True)}


def main(tracking_uri: str, folder: Path) -> None:
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    temp = tempfile.mkdtemp(prefix="fre-", dir="/tmp")
    common = {"temp_dir": temp, "include_dashboard": False, "object_store_memory": 80 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **common})
    fleet = EdgeFleet()
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, namespace="fedray-elastic", log_to_driver=False)
        alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        config = _config(folder)
        fed = Federation(config, None, tracking_uri).deploy()
        began = time.monotonic()
        try:
            names = [f"n{i:02d}" for i in range(3 * PER)]
            for name in names:
                fleet.add(name, DeltaWorker(1.0, 10), fed.gateway, backoff_initial_s=0.2)
            grown = wait_until(
                lambda: (lambda w: w if len(w) == 3 and all(
                    abs(c["load"] - PER) <= 1 for c in w.values()) else None)(_where(config)),
                "3 combiners with 10 +-1 clients", timeout=90, retry_on=(Exception,),
                poll_s=0.2)
            grew_s = round(time.monotonic() - began, 1)
            for name in names[: len(names) - PER // 2]:
                fleet.stop(name)
            shrunk = wait_until(
                lambda: (lambda w: w if len(w) == 1 and sum(c["load"] for c in w.values())
                         == PER // 2 else None)(_where(config)),
                "the tier back at 1", timeout=90, retry_on=(Exception,), poll_s=0.2)
            tier = ray.get(fed.controller.tier_status.remote(), timeout=10)
            from fedray.tracking.store import TrackingStore
            store = TrackingStore.from_uri(tracking_uri, config.tracking.database)
            events = [e["message"] for e in store.find(
                "events", {"data.reason": {"$regex": "^tier_"}}, sort=[("created_at", 1)])]
        finally:
            fed.shutdown()
        print(json.dumps({"alive": alive, "grown": grown, "shrunk": shrunk, "tier": tier, "events": events,
                          "grew_s": grew_s,
                          "shrank_s": round(time.monotonic() - began - grew_s, 1)}),
              flush=True)
    finally:
        fleet.close()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
