"""End to end, as a user would: `fedray serve` and `fedray edge start` processes, sessions
from the CLI and from examples/notebook.py (the Python API), then `fedray down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from netutil import free_block, free_ports
from procs import assert_none_left, marked, new_mark

from tests.waiting import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _fedray(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedray", *args], cwd=ROOT, **kwargs)


def _cli(*args: str, env, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedray", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_serve_then_sessions_from_the_cli_and_the_python_api_then_down(ray_session, tmp_path):
    from examples.digits.data import write_partitions

    gateway, api = free_ports(2)
    combiner = free_block(2, avoid=(gateway, api))  # the config's two combiners
    data_dir = tmp_path / "fed"
    paths = write_partitions(tmp_path / "data", 4, seed=1)
    env = {**{k: v for k, v in os.environ.items() if k != "FEDRAY_DATA_DIR"},
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    mark = new_mark()
    serve = _fedray("serve", "configs/digits.yaml", "--data-dir", str(data_dir),
                    "--set", f"controller.port={gateway}", "--set", "controller.host=127.0.0.1",
                    "--set", "combiners.host=127.0.0.1", "--set", f"combiners.base_port={combiner}",
                    "--set", f"api.port={api}", "--set", "session.rounds=2",
                    "--set", f"ray.address={ray_session}",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env=marked(env, mark))
    clients = []
    try:
        wait_until(lambda: (data_dir / "api.json").exists() or serve.poll() is not None,
                   "fedray serve to record its API", timeout=120)
        assert serve.poll() is None, serve.communicate()[1][-3000:]
        for i, path in enumerate(paths):
            clients.append(_fedray("edge", "start", "--gateway", f"127.0.0.1:{gateway}",
                                   "--name", f"site-{i}", "--app", "examples.digits.app",
                                   "--data", str(path), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT, env=env))
        started = _cli("session", "start", "--data-dir", str(data_dir), "--json",
                       "--set", "session.min_clients=4", env=env)
        assert started.returncode == 0, started.stderr
        assert "round 2/2" in started.stderr, started.stderr
        first = json.loads(started.stdout.strip().splitlines()[-1])
        assert first["status"] == "finished" and first["rounds_done"] == 2

        notebook = subprocess.run([sys.executable, "examples/notebook.py", str(data_dir)],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert notebook.returncode == 0, notebook.stdout[-2000:] + notebook.stderr[-3000:]
        out = notebook.stdout
        assert "finished after 3 round(s)" in out and "latest model written to" in out, out
        assert out.rstrip().endswith("done"), out

        listed = _cli("session", "list", "--data-dir", str(data_dir), "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        sessions = json.loads(listed.stdout)
        assert len(sessions) == 4 and {s["status"] for s in sessions} == {"finished"}
        shown = _cli("session", "show", first["session_id"][:8], "--data-dir", str(data_dir),
                     env=env)
        assert json.loads(shown.stdout)["rounds"][-1]["round"] == 2, shown.stderr

        down = _cli("down", "--data-dir", str(data_dir), env=env)
        assert down.returncode == 0 and "is down" in down.stderr, down.stderr
        _, err = serve.communicate(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
        for proc in clients:
            proc.terminate()
        for proc in clients:
            proc.wait(timeout=20)
    assert serve.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM: HTTP API, federation digits" in err, err[-2000:]
    assert f"API at http://127.0.0.1:{api}/api/v1" in err
    assert not (data_dir / "api.json").exists()
    assert_none_left(mark, data_dir)
