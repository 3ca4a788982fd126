"""`fedray run` as a real `ray job submit` job on a real `ray start --head` cluster.

Everything else tests fedray inside a Ray that the test process started itself. Users run
it differently: a head node started with `ray start`, token auth on (Ray 2.60's default),
the job uploaded with `--working-dir`, edge clients outside the cluster and `fedray status`
from another shell. This test does exactly that, with the README's commands, and talks to
Ray only through its CLIs and the job server's HTTP API: no `ray.init` here, so the
session-wide Ray of the other tests is untouched (own temp dir, own ports, own token file).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netutil import free_block, free_ports

from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# As in the README. Ray 2.60 always leaves out .git (and warns when it is listed) and also
# honours .gitignore; these keep virtualenvs out even of a checkout without one.
EXCLUDES = [".ci-venv", "venv", ".venv", "__pycache__"]


@dataclass
class Head:
    gcs: str  # what `fedray status --address` takes
    dashboard: str  # what `ray job submit --address` takes
    env: dict[str, str]
    token: str
    root: Path

    def http(self, path: str) -> bytes:
        request = urllib.request.Request(self.dashboard + path,
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ray_head() -> Iterator[Head]:
    root = Path(tempfile.mkdtemp(prefix="frc-", dir="/tmp"))  # short: Ray's sockets live here
    try:
        yield from _head(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _head(root: Path) -> Iterator[Head]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job runs `fedray` from here
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep the node IP (and all traffic) on loopback
        "RAY_AUTH_MODE": "token",  # token auth, explicitly, for the head and every CLI below
    })
    # `ray get-auth-token --generate` always writes ~/.ray/auth_token: give it our own HOME.
    # (It refuses a RAY_AUTH_TOKEN_PATH that names a missing file, so set that only after.)
    made = _run([str(BIN / "ray"), "get-auth-token", "--generate"], {**env, "HOME": str(root)})
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    env["RAY_AUTH_TOKEN_PATH"] = str(root / ".ray" / "auth_token")
    gcs, dashboard, client_server, agent = free_ports(4)
    # The suite's own Ray on this machine may hold Ray's default ports for the client
    # server (10001) and the dashboard agent (52365): take free ones.
    with (root / "head.log").open("w") as log:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={root / 'ray'}",
             "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             f"--ray-client-server-port={client_server}", f"--dashboard-agent-listen-port={agent}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    node = Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env, token, root)
    try:
        def answers() -> bool:
            assert head.poll() is None, (root / "head.log").read_text()[-3000:]
            node.http("/api/version")  # the job API answers (and accepts our token) ...
            # ... and so does the head's dashboard agent, a few seconds later on a busy
            # machine: until then a submit fails with "No available agent to submit job".
            urllib.request.urlopen(f"http://127.0.0.1:{agent}/api/healthz", timeout=5).close()
            return True

        wait_until(answers, "the head's dashboard and its agent to answer", timeout=90,
                   retry_on=(OSError,), poll_s=0.5)
        yield node
    finally:
        head.send_signal(signal.SIGTERM)  # stops the whole local cluster; never `ray stop`
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(head.pid, signal.SIGKILL)  # anything of ours still in its group


def _status(head: Head, *extra: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "fedray", "status", "--federation", "digits",
                 "--address", head.gcs, *extra], head.env)


def _wait_status(head: Head, ready, what: str, timeout: float = 90) -> dict:
    """`fedray status --json` once ``ready(status)``; each ask is a command of its own."""
    last = None

    def shown() -> dict | None:
        nonlocal last
        last = _status(head, "--json")
        status = json.loads(last.stdout) if last.returncode == 0 else None
        return status if status is not None and ready(status) else None

    return wait_until(shown, f"fedray status to show {what}", timeout=timeout, poll_s=1.0,
                      describe=lambda: last and f"{last.stdout} {last.stderr}")


def _job(head: Head, job_id: str) -> dict:
    return json.loads(head.http(f"/api/jobs/{job_id}"))


def _stop_strays(head: Head, job_id: str, marker: Path) -> None:
    """After a failure: stop the job (its driver cleans up), then kill what still runs for it."""
    # AssertionError: the job did not stop in time; what still runs is killed below.
    with contextlib.suppress(OSError, ValueError, KeyError, AssertionError):
        if _job(head, job_id)["status"] in {"PENDING", "RUNNING"}:
            urllib.request.urlopen(urllib.request.Request(
                f"{head.dashboard}/api/jobs/{job_id}/stop", method="POST",
                headers={"Authorization": f"Bearer {head.token}"}), timeout=10)
            wait_until(lambda: _job(head, job_id)["status"] not in {"PENDING", "RUNNING"},
                       f"job {job_id} to stop", timeout=20, poll_s=0.5)
    # The driver's embedded tracking server runs in a session of its own: find it by our
    # unique data path, not by name.
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if proc.name.isdigit() and str(marker) in (proc / "cmdline").read_text():
                os.kill(int(proc.name), signal.SIGKILL)


def test_ray_job_submit_on_a_ray_start_head(ray_head, tmp_path):
    from examples.digits.data import write_partitions

    started = time.monotonic()
    head = ray_head
    (gateway,) = free_ports(1)
    combiner = free_block(2, avoid=(gateway,))  # combiner i listens on base_port + i
    data_dir, fed_token = tmp_path / "fed", uuid.uuid4().hex
    paths = write_partitions(tmp_path / "data", 2, seed=1)
    job_id = f"fedray-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"FEDRAY_TOKEN": fed_token}}
    edges: list[subprocess.Popen] = []
    try:
        submit = _run([str(BIN / "ray"), "job", "submit", "--address", head.dashboard,
                       "--submission-id", job_id, "--no-wait", "--working-dir", str(ROOT),
                       "--runtime-env-json", json.dumps(runtime_env), "--",
                       "fedray", "run", "configs/digits.yaml", "--json",
                       "--data-dir", str(data_dir), "--set", "session.rounds=2",
                       "--set", "session.min_clients=2", "--set", "controller.host=127.0.0.1",
                       "--set", f"controller.port={gateway}", "--set", "combiners.host=127.0.0.1",
                       "--set", f"combiners.base_port={combiner}",
                       # a user's own strategy, shipped with the job's working directory
                       "--set", "session.aggregator=examples.custom_strategy.clipped:ClippedFedAvg",
                       "--set", "session.aggregator_kwargs={clip: 5.0, lr_decay: 0.9}"],
                      head.env)
        assert submit.returncode == 0, submit.stderr[-3000:]

        # From another shell: the federation is up and its session waits for clients.
        status = _wait_status(head, lambda s: len(s["combiners"]) == 2 and s["session"],
                              "two combiners and a session")
        assert status["gateway"] == f"127.0.0.1:{gateway}"
        assert [(c["name"], c["address"], c["status"]) for c in status["combiners"]] == [
            ("combiner-0", f"127.0.0.1:{combiner}", "online"),
            ("combiner-1", f"127.0.0.1:{combiner + 1}", "online")]
        assert status["session"]["rounds_planned"] == 2

        edge_env = {**os.environ, "FEDRAY_TOKEN": fed_token}
        for i, path in enumerate(paths):
            edges.append(subprocess.Popen(
                [sys.executable, "-m", "fedray", "edge", "start", "--gateway",
                 f"127.0.0.1:{gateway}", "--name", f"site-{i}", "--app", "examples.digits.app",
                 "--data", str(path)],
                cwd=ROOT, env=edge_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            if i == 0:  # one client: the session keeps waiting, so status can see it
                status = _wait_status(head, lambda s: s["clients_connected"] == 1, "site-0")
                assert sum((c["client_names"] for c in status["combiners"]), []) == ["site-0"]
                shown = _status(head)
                assert shown.returncode == 0, shown.stderr
                assert "combiner-0" in shown.stdout and "combiner-1" in shown.stdout
                assert f"127.0.0.1:{gateway}" in shown.stdout

        followed = _run([str(BIN / "ray"), "job", "logs", "--address", head.dashboard, "--follow",
                         job_id], head.env, timeout=150)  # returns when the job has ended
        logs = followed.stdout
        assert _job(head, job_id)["status"] == "SUCCEEDED", logs[-4000:] + followed.stderr[-2000:]
    finally:
        for proc in edges:
            proc.terminate()
        edge_logs = [proc.communicate(timeout=20)[0] for proc in edges]
        _stop_strays(head, job_id, tmp_path)
    assert all("update accepted" in log for log in edge_logs), edge_logs
    # Ray's own "Job ... succeeded" lines follow the job's output: its JSON line is the last one.
    summary = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    assert summary["state"] == "finished" and summary["rounds"] == 2
    assert "round 2/2" in logs
    shown = _run([str(BIN / "ray"), "job", "status", "--address", head.dashboard, job_id], head.env)
    assert f"Job '{job_id}' succeeded" in shown.stdout, shown.stdout + shown.stderr

    out = _run([sys.executable, "-m", "fedray", "rounds", "--json", "--data-dir", str(data_dir)],
               head.env, timeout=120)
    assert out.returncode == 0, out.stderr
    rounds = json.loads(out.stdout)
    assert sorted((r["round"], r["status"]) for r in rounds) == [(1, "finished"), (2, "finished")]
    assert all("clipped_fraction" in r["report"] for r in rounds)  # the user strategy ran

    anonymous = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    refused = _run([sys.executable, "-m", "fedray", "status", "--federation", "digits",
                    "--address", head.gcs], anonymous)
    # Without the head's token: this machine's token file is not it, and the line says so.
    assert refused.returncode == 8 and "set RAY_AUTH_MODE=token" in refused.stderr, refused.stderr
    gone = _status(head)  # the job tore its actors down
    assert gone.returncode == 23 and "no federation 'digits' is running" in gone.stderr
    assert "Traceback" not in gone.stderr
    print(f"cluster test body took {time.monotonic() - started:.1f}s")
