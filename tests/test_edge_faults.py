"""Edge clients as real processes, killed with SIGKILL mid-task and started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from netutil import free_ports
from test_federation import SEED, _config

from fedray.deploy.federation import Federation
from fedray.errors import TrackingError
from fedray.serialization import encode
from fedray.storage import open_model_store
from fedray.tracking.store import TrackingStore
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent

# A tracking query may fail while the run's supervisor restarts its tracking server (on a
# loaded machine): a wait asks again, as a user would.
TRACKING_DOWN = (TrackingError,)

SLOW_APP = textwrap.dedent('''
    """Adds 1.0 to every weight after a pause; touches a marker file when training starts."""
    import os
    import pathlib
    import time


    def train(params, config):
        pathlib.Path(os.environ["MARKER"]).touch()
        time.sleep(float(os.environ.get("TRAIN_S", "3")))  # behaviour: a slow training
        return {k: v + 1.0 for k, v in params.items()}, 10, {"loss": 1.0}
''')


def _client(tmp_path: Path, gateway: str, name: str, train_s: float = 3.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
           "MARKER": str(tmp_path / f"{name}.training"), "TRAIN_S": str(train_s)}
    log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "fedray", "edge", "start", "--gateway", gateway,
                             "--name", name, "--app", "slowapp"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def test_a_client_killed_mid_training_is_dropped_and_rejoins_the_next_round(
        ray_session, tracking_uri, tmp_path):
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    config = _config("edge-killed", tmp_path, combiners=1, rounds=2, min_clients=2,
                     round_timeout_s=60)
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(SEED))
    fed = Federation(config, None, tracking_uri).deploy()
    procs = {}
    try:
        for name in ("steady-1", "steady-2", "victim"):
            procs[name] = _client(tmp_path, fed.gateway, name)
        tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
        wait_until(lambda: len(tracking.find("clients", {"status": "online"})) == 3,
                   "three clients online", timeout=60, retry_on=TRACKING_DOWN)
        session_id = fed.start_session(seed_id)
        marker = tmp_path / "victim.training"
        wait_until(marker.exists, "the victim to start training", timeout=30)
        procs["victim"].send_signal(signal.SIGKILL)
        procs["victim"].wait()
        marker.unlink()
        procs["victim"] = _client(tmp_path, fed.gateway, "victim")  # back while round 1 runs
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=20)
    assert status["state"] == "finished", status["reason"]
    first = tracking.get_round(session_id, 1)["combiners"]["combiner-0"]
    second = tracking.get_round(session_id, 2)["combiners"]["combiner-0"]
    assert first["updates"] == 2 and first["failed"] == 1 and first["close_reason"] == "all_answered"
    assert second["updates"] == 3  # the restarted client took part again
    log = (tmp_path / "victim.log").read_text()
    assert "round 2 train" in log and "update accepted" in log
    events = [e["message"] for e in tracking.find("events", {"level": "warning"})]
    assert any("client victim is offline" in m for m in events)


def test_fedray_run_killed_and_started_again_resumes_the_session(ray_session, tmp_path):
    import json

    from fedray.tracking.embedded import connect_or_start, live_uri

    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    gateway_port, combiner_port = free_ports(2)
    data_dir = tmp_path / "fed"
    config = tmp_path / "fed.yaml"
    config.write_text(textwrap.dedent(f"""
        federation: whole-run
        seed_model: {tmp_path / "seed.safetensors"}
        ray: {{address: "{ray_session}"}}
        controller: {{host: 127.0.0.1, port: {gateway_port}}}
        combiners: {{count: 1, host: 127.0.0.1, base_port: {combiner_port}}}
        session: {{rounds: 3, min_clients: 2, validate: false, round_timeout_s: 60}}
    """))
    (tmp_path / "seed.safetensors").write_bytes(encode(SEED))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def fedray_run() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "fedray", "run", str(config), "--json",
                                 "--data-dir", str(data_dir)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = fedray_run()
    clients = [_client(tmp_path, f"127.0.0.1:{gateway_port}", f"site-{i}", train_s=1.0)
               for i in range(2)]
    try:
        wait_until(lambda: live_uri(data_dir) is not None, "the tracking server", timeout=60,
                   retry_on=TRACKING_DOWN)
        tracking = TrackingStore.from_uri(live_uri(data_dir))
        wait_until(lambda: tracking.find("rounds", {"status": "finished"}), "round 1",
                   timeout=90, retry_on=TRACKING_DOWN)
        session_id = tracking.find("sessions", {})[0]["session_id"]
        tracking.close()
        first.send_signal(signal.SIGKILL)  # its tracking server dies with it (PDEATHSIG)
        first.wait()
        second = fedray_run()
        out, err = second.communicate(timeout=180)
        uri, server = connect_or_start(data_dir)  # the second run stopped its own at the end
        try:
            tracking = TrackingStore.from_uri(uri)
            rounds = tracking.find("rounds", {"session_id": session_id}, sort=[("round", 1)])
            tracking.close()
        finally:
            if server is not None:
                server.stop()
    finally:
        for proc in [first, *clients]:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=20)
    assert second.returncode == 0, err[-2000:]
    assert f"resuming unfinished session {session_id}" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["session_id"] == session_id and summary["rounds"] == 3
    assert [(r["round"], r["status"]) for r in rounds] == [(1, "finished"), (2, "finished"),
                                                          (3, "finished")]
