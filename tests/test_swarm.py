"""`fedray edge swarm`: many real edge clients from one command, stopped by one signal."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_service import _config, served

from fedray.edge.swarm import split
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("count", "procs", "want"), [
    (10, 3, [(0, 4), (4, 3), (7, 3)]), (2, 5, [(0, 1), (1, 1)]), (7, 1, [(0, 7)])])
def test_clients_split_evenly_over_processes_and_none_is_empty(count, procs, want):
    assert split(count, procs) == want


@pytest.mark.integration
def test_a_swarm_joins_trains_and_stops_on_one_sigterm(ray_session, tracking_uri, tmp_path):
    config = _config("swarm", tmp_path, tracking_uri, min_clients=30, rounds=2)
    with served(config) as fed:
        swarm = subprocess.Popen(
            [sys.executable, "-m", "fedray", "edge", "swarm", "--count", "30", "--procs", "2",
             "--gateway", fed.info()["gateway"], "--app", "tests.swarm_app",
             "--heartbeat-s", "0.5"],
            cwd=ROOT, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: len(fed.clients(status="online")) == 30, "30 swarm clients",
                       timeout=60)
            names = sorted(c["client_id"] for c in fed.clients())
            assert names == [f"swarm-{i:05d}" for i in range(30)]
            doc = fed.start_session().wait(timeout=60)
            assert doc["status"] == "finished"
            assert [r["updates"] for r in fed.session(doc["session_id"]).rounds()] == [30, 30]
        finally:
            swarm.send_signal(signal.SIGTERM)
            _, err = swarm.communicate(timeout=60)
        assert swarm.returncode == 0, err[-2000:]
        assert "swarm: 30 clients stopped" in err and "60 task(s) done" in err, err[-2000:]
        wait_until(lambda: not fed.clients(status="online"), "the swarm gone from tracking",
                   timeout=30)


@pytest.mark.integration
def test_more_clients_in_one_process_than_one_connection_may_carry_all_connect(
        ray_session, tracking_uri, tmp_path):
    """gRPC shares one connection among a process's channels to the same server, and a
    combiner admits combiners.max_clients_per_connection (256) ids per connection: a swarm
    stopped at 256 per combiner (1,024 of 3,000 in 2 processes over 2 combiners). Each
    client now has a connection of its own."""
    config = _config("swarm-one-process", tmp_path, tracking_uri, min_clients=300)
    config = dataclasses.replace(config, combiners=dataclasses.replace(config.combiners, count=1))
    with served(config) as fed:
        swarm = subprocess.Popen(
            [sys.executable, "-m", "fedray", "edge", "swarm", "--count", "300", "--procs", "1",
             "--gateway", fed.info()["gateway"], "--app", "tests.swarm_app"],
            cwd=ROOT, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: len(fed.clients(status="online")) == 300,
                       "300 clients of one process online", timeout=90,
                       describe=lambda: len(fed.clients(status="online")))
        finally:
            swarm.send_signal(signal.SIGTERM)
            swarm.communicate(timeout=60)
