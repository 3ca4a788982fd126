"""A three-node Ray cluster on this machine, and fedray's combiners placed on it.

Run as a process of its own by ``test_cluster_placement.py`` (``python
tests/cluster_placement_app.py TRACKING_URI FOLDER``): it builds the cluster with
``ray.cluster_utils.Cluster`` (a head and two workers, each a raylet of its own, the
workers offering ``fedray_combiner: 2``), deploys a federation of three combiners through
``Federation.deploy`` once per placement, asks ``fedray status --json`` (a process of its
own, as an operator would) where each actor runs, kills a worker's raylet and waits for
its combiners to come back on the nodes left, and prints one JSON line with what it
found. Its own temp dir and address: the test session's Ray is never touched, and the
cluster's address is written nowhere another ``ray.init()`` on this machine would find it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray._private.utils
from ray.cluster_utils import Cluster

from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
WORKER_RESOURCES = {"fedray_combiner": 2}


def _config(name: str, folder: Path, **combiners):
    return config_from_dict({
        "federation": name, "seed_model": "unused", "data_dir": str(folder / name),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 3, "host": "127.0.0.1", "base_port": 0, **combiners},
        "tracking": {"database": f"t_{name.replace('-', '_')}_{os.getpid()}"},
        "session": {"rounds": 1, "min_clients": 1, "validate": False},
    })


def _status(name: str, address: str) -> dict:
    """``fedray status --json``, run as an operator would: a process of its own."""
    shown = subprocess.run([sys.executable, "-m", "fedray", "status", "--federation", name,
                            "--address", address, "--json"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-3000:]
    return json.loads(shown.stdout)


def _deployed(name: str, folder: Path, tracking_uri: str, then=None, **combiners) -> dict:
    config = _config(name, folder, **combiners)
    started = time.monotonic()
    fed = Federation(config, None, tracking_uri).deploy()
    try:
        found = {"combiners": {c["name"]: c["node_id"] for c in fed.combiner_info},
                 "addresses": [c["address"] for c in fed.combiner_info],
                 "seconds": round(time.monotonic() - started, 1)}
        if then is not None:
            then(fed, found)
        return found
    finally:
        fed.shutdown()


def _where(fed: Federation) -> dict[str, str]:
    """Each combiner's node, asked of the combiners now (a restarting one raises)."""
    infos = ray.get([h.ready.remote() for h in fed.combiners], timeout=10)
    return {i["name"]: i["node_id"] for i in infos}


def _lose_a_node(cluster: Cluster, workers: list, fed: Federation, found: dict) -> None:
    found["status"] = _status(fed.config.federation, cluster.address)
    lost = workers[0]
    moved = [n for n, node in found["combiners"].items() if node == lost.node_id]
    started = time.monotonic()
    cluster.remove_node(lost, allow_graceful=False)  # its raylet killed: a node loss
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - {lost.node_id}
    after = wait_until(lambda: (lambda now: now if set(now.values()) <= alive else None)(
        _where(fed)), f"{moved} to come back on another node", timeout=90,
        retry_on=(ray.exceptions.RayError,), poll_s=0.5)
    found["lost"] = {"node": lost.node_id, "moved": moved, "after": after,
                     "seconds": round(time.monotonic() - started, 1)}


def main(tracking_uri: str, folder: Path) -> None:
    # Cluster records its address in /tmp/ray/ray_current_cluster, where any ray.init()
    # without an address on this machine would find and join it: keep it to ourselves.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    temp = tempfile.mkdtemp(prefix="frn-", dir="/tmp")  # short: Ray's sockets live here
    common = {"temp_dir": temp, "include_dashboard": False, "object_store_memory": 80 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **common})
    try:
        workers = [cluster.add_node(num_cpus=1, resources=WORKER_RESOURCES)
                   for _ in range(2)]
        ray.init(address=cluster.address, namespace="fedray-placement", log_to_driver=False)
        nodes = {"head": cluster.head_node.node_id,
                 "workers": [w.node_id for w in workers],
                 "alive": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}
        result = {"nodes": nodes}
        result["pack"] = _deployed("pack", folder, tracking_uri, placement="pack")
        result["reserved"] = _deployed("reserved", folder, tracking_uri,
                                       resources={"fedray_combiner": 1})
        # Last, as it loses a node: spread, what status shows, then a worker's raylet killed.
        result["spread"] = _deployed("spread", folder, tracking_uri,
                                     then=lambda fed, found: _lose_a_node(cluster, workers, fed,
                                                                          found))
        print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
