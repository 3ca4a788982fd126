"""Combiners placed on a real multi-node Ray cluster on this machine.

Three Ray nodes (a head and two workers, raylets of their own, the workers offering
``fedray_combiner: 2``), built in a process of its own (``cluster_placement_app.py``) so
the test session's Ray is untouched: with ``placement: spread`` three combiners land on
three different nodes, with ``pack`` on one, and with ``resources: {fedray_combiner: 1}``
only on the two workers; ``fedray status`` names each actor's node; and when a worker's
raylet is killed, its combiner comes back on a node that is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def placed(tracking_uri, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("placement")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)})
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_placement_app.py"),
                          tracking_uri, str(folder)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    each = ", ".join(f"{k} {result[k]['seconds']}s" for k in ("spread", "pack", "reserved"))
    print(f"3-node cluster, three federations deployed: {time.monotonic() - started:.1f}s "
          f"({each})")
    return result


def test_the_cluster_has_three_nodes(placed):
    nodes = placed["nodes"]
    assert sorted([nodes["head"], *nodes["workers"]]) == nodes["alive"]
    assert len(set(nodes["alive"])) == 3


def test_spread_puts_three_combiners_on_three_nodes(placed):
    spread = placed["spread"]["combiners"]
    assert sorted(spread) == ["combiner-0", "combiner-1", "combiner-2"]
    assert sorted(spread.values()) == placed["nodes"]["alive"]


def test_pack_puts_them_all_on_one_node(placed):
    packed = list(placed["pack"]["combiners"].values())
    assert len(packed) == 3 and len(set(packed)) == 1
    assert packed[0] in placed["nodes"]["alive"]


def test_a_reserved_resource_keeps_them_to_the_nodes_that_offer_it(placed):
    reserved = list(placed["reserved"]["combiners"].values())
    assert set(reserved) == set(placed["nodes"]["workers"])  # both workers, never the head
    assert len(reserved) == 3


def test_each_combiner_advertises_its_own_node_address(placed):
    # Every node of this one-machine cluster is 127.0.0.1, bound and advertised alike.
    assert all(a.startswith("127.0.0.1:") for a in placed["spread"]["addresses"])


def test_status_shows_the_node_of_every_combiner_and_of_the_controller(placed):
    status = placed["spread"]["status"]
    assert status["nodes"] == 3
    shown = {c["name"]: c["node_id"] for c in status["combiners"]}
    assert shown == placed["spread"]["combiners"]
    assert all(c["node_ip"] == "127.0.0.1" for c in status["combiners"])
    assert status["controller"]["node_id"] in placed["nodes"]["alive"]


def test_a_lost_node_s_combiners_come_back_on_the_nodes_left(placed):
    lost = placed["spread"]["lost"]
    assert lost["moved"], "spread put a combiner on every node, the lost one too"
    assert lost["node"] not in lost["after"].values()
    assert sorted(lost["after"]) == ["combiner-0", "combiner-1", "combiner-2"]
    kept = {n: node for n, node in placed["spread"]["combiners"].items() if n not in lost["moved"]}
    assert {n: lost["after"][n] for n in kept} == kept  # the others stayed where they were
    print(f"a lost node's combiners back in {lost['seconds']}s")
