"""`fedray run` and `fedray demo` as real processes, stopped by real signals at several
points (starting Ray, waiting for clients, mid-round, mid-session), and refused when the
federation already runs: each time one line, a stable exit code, and no process left over.

Leftovers are found by a mark in the command's environment (tests/procs.py), so the check
sees every descendant, however it renamed itself, and nothing that is not ours.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from netutil import free_ports
from procs import assert_none_left, marked, new_mark
from test_edge_faults import SLOW_APP, _client
from test_federation import SEED

from fedray.serialization import encode
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
CTRL_C_GAP_S = 0.3  # between a person's two Ctrl-C: the second lands while the first stops


class Command:
    """A `fedray ...` process in its own session, its stderr read line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "fedray", *map(str, args)], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._said = threading.Condition()  # notified at each line, and at the end of stderr
        self._ended = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._said:
                self.lines.append(line)
                self._said.notify_all()
        with self._said:
            self._ended = True
            self._said.notify_all()

    def wait_for(self, needle: str, timeout: float) -> None:
        """Until the command says ``needle`` on stderr; fails if it ends first."""
        def seen() -> bool:
            return any(needle in line for line in self.lines)

        with self._said:
            if self._said.wait_for(lambda: seen() or self._ended, timeout) and seen():
                return
            tail = "".join(self.lines)[-3000:]
        assert not self._ended, f"the command ended without saying {needle!r}:\n{tail}"
        raise AssertionError(f"timed out after {timeout:g}s waiting for {needle!r} in:\n{tail}")

    def signal(self, sig: int, group: bool = False) -> None:
        """``group``: to its whole process group, as a terminal's Ctrl-C does."""
        os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)

    def finish(self, timeout: float) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code, "".join(self.lines), self.proc.stdout.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"FEDRAY_TOKEN", "RAY_ADDRESS", "FEDRAY_DATA_DIR"}}
    return {**env, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """A short Ray temp dir for a Ray the command starts itself (socket paths are limited)."""
    folder = tempfile.mkdtemp(prefix="fr-life-", dir="/tmp")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _config(tmp_path: Path, name: str, ray_address: str, gateway: int, combiner: int,
            host: str = "127.0.0.1") -> Path:
    (tmp_path / "seed.safetensors").write_bytes(encode(SEED))
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        federation: {name}
        seed_model: {tmp_path / "seed.safetensors"}
        ray: {{address: "{ray_address}", num_cpus: 1}}
        controller: {{host: {host}, port: {gateway}}}
        combiners: {{count: 1, host: {host}, base_port: {combiner}}}
        session: {{rounds: 3, min_clients: 2, validate: false, round_timeout_s: 60,
                   wait_for_clients_s: 120}}
    """))
    return path


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def _clean(err: str) -> None:
    for noise in ("Traceback", "SIGTERM received", "internal error", "Aborted",
                  "Token authentication is enabled", "did not stop cleanly"):
        assert noise not in err, err[-3000:]


def test_a_live_run_is_refused_found_by_status_and_stopped_mid_round(ray_session, tmp_path):
    import ray

    from fedray.tracking.embedded import connect_or_start
    from fedray.tracking.store import TrackingStore

    name = f"life-{uuid.uuid4().hex[:6]}"
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    gateway, combiner = free_ports(2)
    config = _config(tmp_path, name, ray_session, gateway, combiner)
    data_dir, mark = tmp_path / "fed", new_mark()
    env = marked(_env(), mark)  # no token: the gateway and combiner bind loopback only
    first = Command(["run", config, "--data-dir", data_dir], env)
    clients = [_client(tmp_path, f"127.0.0.1:{gateway}", f"site-{i}", train_s=120)
               for i in range(2)]
    try:
        wait_until(lambda: all((tmp_path / f"site-{i}.training").exists() for i in range(2)),
                   "both clients training in round 1", timeout=120)
        # The same config again, from the same data directory: the lock file refuses it.
        again = subprocess.run([sys.executable, "-m", "fedray", "run", str(config),
                                "--data-dir", str(data_dir)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
        # From another data directory it gets as far as the Ray cluster, where the live
        # federation's lease refuses it before any of that federation's actors is touched.
        elsewhere = subprocess.run([sys.executable, "-m", "fedray", "run", str(config),
                                    "--data-dir", str(tmp_path / "other")], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=120)
        # `fedray status` with no argument finds the one federation running in the cluster.
        shown = subprocess.run([sys.executable, "-m", "fedray", "status", "--json"], cwd=ROOT,
                               env={**env, "RAY_ADDRESS": ray_session}, capture_output=True,
                               text=True, timeout=60)
        first.signal(signal.SIGTERM)
        code, err, _ = first.finish(timeout=60)
    finally:
        first.kill()
        for proc in clients:  # mid-way through a 120 s training: no point waiting for it
            proc.kill()
            proc.wait(timeout=20)
    assert again.returncode == 10, again.stderr[-3000:]
    assert again.stderr.count("\n") == 1 and "already running" in again.stderr, again.stderr
    assert str(first.proc.pid) in again.stderr
    assert elsewhere.returncode == 10, elsewhere.stderr[-3000:]
    assert "already running in the Ray cluster" in _last_line(elsewhere.stderr), elsewhere.stderr
    _clean(again.stderr + elsewhere.stderr)
    assert shown.returncode == 0, shown.stderr[-3000:]
    status = json.loads(shown.stdout)
    assert status["federation"] == name and status["session"]["state"] == "running", status

    assert code == 143, err[-3000:]
    assert _last_line(err) == f"fedray: stopped by SIGTERM: federation {name}, tracking server"
    _clean(err)
    assert_none_left(mark, tmp_path)
    assert not [e for e in ray.util.list_named_actors(all_namespaces=True)
                if e["namespace"] == f"fedray-{name}"]
    uri, server = connect_or_start(data_dir)
    try:
        store = TrackingStore.from_uri(uri)
        sessions = store.find("sessions", {})
        events = [e["message"] for e in store.find("events", {})]
        store.close()
    finally:
        if server is not None:
            server.stop()
    # The refused runs wrote nothing: one session, interrupted (resumable), never failed.
    assert [s["status"] for s in sessions] == ["running"], sessions
    assert not [m for m in events if "cannot go from" in m], events
    # The stop is said as such, with the signal; no round failed for it.
    stopped = [m for m in events if "stopped after 0 rounds: stopped by SIGTERM" in m]
    assert len(stopped) == 1, events
    assert not [m for m in events if "failed" in m], events


def test_ctrl_c_twice_to_fedray_demo_mid_session_leaves_nothing(tmp_path, ray_tmp):
    mark = new_mark()
    demo = Command(["demo", "--clients", "2", "--rounds", "50", "--data-dir", tmp_path / "demo"],
                   marked(_env(RAY_TMPDIR=ray_tmp), mark))
    try:
        demo.wait_for("round 2/50", 120)
        demo.signal(signal.SIGINT, group=True)  # what a terminal's Ctrl-C does, twice
        time.sleep(CTRL_C_GAP_S)  # behaviour: a person pressing Ctrl-C a second time
        demo.signal(signal.SIGINT, group=True)
        code, err, _ = demo.finish(timeout=60)
    finally:
        demo.kill()
    assert code == 130, err[-3000:]
    assert _last_line(err) == ("fedray: stopped by SIGINT: federation demo, 2 edge clients, "
                               "tracking server, Ray")
    _clean(err)
    assert_none_left(mark, tmp_path)


def test_sigterm_while_fedray_demo_starts_ray_leaves_nothing(tmp_path, ray_tmp):
    mark = new_mark()
    demo = Command(["demo", "--clients", "2", "--rounds", "2", "--data-dir", tmp_path / "demo"],
                   marked(_env(RAY_TMPDIR=ray_tmp), mark))
    try:
        wait_until(lambda: list(Path(ray_tmp).glob("ray/session_2*")), "Ray starting", timeout=60)
        demo.signal(signal.SIGTERM)
        code, err, _ = demo.finish(timeout=60)
    finally:
        demo.kill()
    assert code == 143, err[-3000:]
    assert _last_line(err).startswith("fedray: stopped by SIGTERM: "), err[-3000:]
    assert _last_line(err).endswith("tracking server, Ray"), err[-3000:]
    _clean(err)
    assert_none_left(mark, tmp_path)


def test_a_second_local_run_on_the_same_ports_fails_cleanly_and_ctrl_c_stops_the_first(
        tmp_path, ray_tmp):
    gateway, combiner = free_ports(2)
    config = _config(tmp_path, "life-ports", "local", gateway, combiner)
    first_mark, second_mark = new_mark(), new_mark()
    second_ray = tempfile.mkdtemp(prefix="fr-life-", dir="/tmp")
    first = Command(["run", config, "--data-dir", tmp_path / "one"],
                    marked(_env(RAY_TMPDIR=ray_tmp), first_mark))
    second = None
    try:
        first.wait_for("gateway listening", 120)
        # Another data directory, its own Ray: only the ports are shared, and its bind fails.
        second = Command(["run", config, "--data-dir", tmp_path / "two"],
                         marked(_env(RAY_TMPDIR=second_ray), second_mark))
        second_code, second_err, _ = second.finish(timeout=120)
        assert_none_left(second_mark, tmp_path / "two")
        first.signal(signal.SIGINT)  # it is waiting for clients that never come
        code, err, _ = first.finish(timeout=60)
    finally:
        first.kill()
        if second is not None:
            second.kill()
        shutil.rmtree(second_ray, ignore_errors=True)
    assert second_code == 7, second_err[-3000:]
    assert _last_line(second_err) == (
        f"fedray: error: {config}: combiners.base_port {combiner}: combiner-0 cannot listen on "
        f"127.0.0.1:{combiner}: the port is in use"), second_err[-3000:]
    _clean(second_err)
    assert code == 130, err[-3000:]
    assert _last_line(err) == "fedray: stopped by SIGINT: federation life-ports, tracking server, Ray"
    _clean(err)
    assert_none_left(first_mark, tmp_path / "one")


def test_a_port_another_program_holds_is_one_line_naming_the_field(ray_session, tmp_path):
    import socket

    import ray

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken, combiner = holder.getsockname()[1], free_ports(1)[0]
    config = _config(tmp_path, f"life-{uuid.uuid4().hex[:6]}", ray_session, taken, combiner)
    mark = new_mark()
    try:
        result = subprocess.run([sys.executable, "-m", "fedray", "run", str(config),
                                 "--data-dir", str(tmp_path / "fed")], cwd=ROOT,
                                env=marked(_env(FEDRAY_TOKEN=secrets.token_hex(16)), mark), capture_output=True,
                                text=True, timeout=120)
    finally:
        holder.close()
    assert result.returncode == 7, result.stderr[-3000:]
    assert result.stderr == (f"fedray: error: {config}: controller.port {taken}: the controller "
                             f"cannot listen on 127.0.0.1:{taken}: the port is in use\n")
    assert_none_left(mark, tmp_path)
    assert not [e for e in ray.util.list_named_actors(all_namespaces=True)
                if e["namespace"] == f"fedray-{config.stem}"]


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket of ``pids`` (``ss -ltnp``)."""
    import re

    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((pid, fields[3]))
    return found


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host.startswith(("127.", "::ffff:127.")) or host == "::1"


def test_a_local_ray_for_loopback_hosts_stays_on_loopback_and_status_finds_it(
        tmp_path, ray_tmp):
    """Finding 4 of issue 14: with loopback hosts, `fedray run` still started Ray's
    gcs_server, raylet, workers and agents on every interface, wrote its token file 0644,
    and `fedray status` rewrote --address 127.0.0.1:P to the node IP. No environment
    variable is set here: the run keeps Ray private by itself."""
    from procs import survivors

    name = f"priv-{uuid.uuid4().hex[:6]}"
    gateway, combiner = free_ports(2)
    config = _config(tmp_path, name, "local", gateway, combiner)
    data_dir, mark = tmp_path / "fed", new_mark()
    env = marked(_env(RAY_TMPDIR=ray_tmp), mark)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    run = Command(["run", config, "--data-dir", data_dir], env)
    try:
        run.wait_for("Ray at ", 180)
        line = next(x for x in run.lines if x.startswith("Ray at "))
        address = line.split()[2].rstrip(":")
        pids = {int(entry.split(":", 1)[0]) for entry in survivors(mark)}
        sockets = _listening(pids)
        status_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
        found = subprocess.run([sys.executable, "-m", "fedray", "status", "--json",
                                "--data-dir", str(data_dir)], cwd=ROOT, env=status_env,
                               capture_output=True, text=True, timeout=120)
        given = subprocess.run([sys.executable, "-m", "fedray", "status", "--json",
                                "--federation", name, "--address", address], cwd=ROOT,
                               env=status_env, capture_output=True, text=True, timeout=120)
        run.signal(signal.SIGTERM)
        code, err, _ = run.finish(timeout=60)
    finally:
        run.kill()
    assert address.startswith("127.0.0.1:") and "(loopback only)" in line, line
    assert sockets and all(_loopback(a) for _, a in sockets), sockets
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        assert token.stat().st_mode & 0o777 == 0o600
    assert found.returncode == 0, found.stderr[-3000:]
    assert json.loads(found.stdout)["federation"] == name
    assert given.returncode == 0, given.stderr[-3000:]
    assert code == 143, err[-3000:]
    assert_none_left(mark, tmp_path)


def test_a_local_ray_stays_on_loopback_while_the_bridge_serves_every_interface_over_tls(
        tmp_path, ray_tmp):
    """Issue 14: the metrics and dashboard ports are not reachable from other hosts unless
    asked for (ray.listen: all). With 0.0.0.0 hosts only the gateway and the combiner
    listen off loopback, over TLS from the federation's own CA, and they advertise this
    host's address (not Ray's loopback node address)."""
    from procs import survivors

    from fedray.bridge.addresses import primary_ip

    name = f"wide-{uuid.uuid4().hex[:6]}"
    gateway, combiner = free_ports(2)
    config = _config(tmp_path, name, "local", gateway, combiner, host="0.0.0.0")
    data_dir, mark = tmp_path / "fed", new_mark()
    env = marked(_env(RAY_TMPDIR=ray_tmp, FEDRAY_TOKEN=secrets.token_hex(16)), mark)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    run = Command(["run", config, "--data-dir", data_dir], env)
    try:
        run.wait_for("Ray at ", 180)
        pids = {int(entry.split(":", 1)[0]) for entry in survivors(mark)}
        sockets = _listening(pids)
        run.signal(signal.SIGTERM)
        code, err, _ = run.finish(timeout=60)
    finally:
        run.kill()
    ours = {str(gateway), str(combiner)}
    wide = [(pid, a) for pid, a in sockets if a.rpartition(":")[2] in ours]
    assert len(wide) == 2 and not any(_loopback(a) for _, a in wide), sockets
    others = [(pid, a) for pid, a in sockets if a.rpartition(":")[2] not in ours]
    assert others and all(_loopback(a) for _, a in others), others
    assert "(loopback only)" in err and "the bridge serves TLS" in err, err[-3000:]
    assert f"gateway listening at {primary_ip()}:{gateway}" in err, err[-3000:]
    assert (data_dir / "tls" / "server.key").stat().st_mode & 0o777 == 0o600
    assert code == 143, err[-3000:]
    assert_none_left(mark, tmp_path)
