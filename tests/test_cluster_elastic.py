"""The elastic tier on a real 3-node Ray cluster on this machine (``cluster_elastic_app.py``,
a process of its own): 30 clients grow the tier from 1 to 3 combiners, one on each node
(``placement: spread`` for combiners added at run time), and it drains back to 1 when 25
of them leave."""

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


def test_added_combiners_spread_over_the_nodes_and_drain_away(tracking_uri, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)})
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_elastic_app.py"),
                          tracking_uri, str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=220)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"3-node elastic: {time.monotonic() - started:.1f}s in all, grew in "
          f"{found['grew_s']}s, shrank in {found['shrank_s']}s")
    print("\n".join(found["events"]))
    nodes = sorted(c["node"] for c in found["grown"].values())
    assert nodes == found["alive"], (found["grown"], found["events"])  # one combiner on each of the 3 nodes
    assert len(found["shrunk"]) == 1 and found["tier"]["size"] == 1
    assert found["tier"]["last_change"]["action"] == "removed"
