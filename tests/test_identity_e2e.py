"""Identity end to end (issue 14's done-when), as a user would drive it: `fedray client
add` credentials, a federation bound to 0.0.0.0 (so TLS is on by default, with the
federation's own CA), clients dialing 127.0.0.1 with nothing but their bundle; and a
revoked credential, another federation's credential and no credential each refused within
2 s, each with its own one-line reason. No traffic leaves loopback (combiners advertise
127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netutil import free_block, free_ports

from tests.waiting import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _fedray(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedray", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, **kwargs)


def _refused(env: dict[str, str], *args: str) -> tuple[int, str, float]:
    """(exit code, stderr, seconds from the client's first line to its end)."""
    proc = subprocess.Popen([sys.executable, "-m", "fedray", "edge", "start", *args,
                             "--app", "examples.digits.app"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()  # "[name] starting ..." once its imports are done
        started = time.monotonic()
        assert "starting" in first, first
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, time.monotonic() - started


def test_a_federation_on_every_interface_runs_with_key_credentials_over_its_own_tls(
        ray_session, tmp_path):
    from examples.digits.data import write_partitions

    (gateway_port,) = free_ports(1)
    combiner_port = free_block(2, avoid=(gateway_port,))  # the config's two combiners
    fed, other = tmp_path / "fed", tmp_path / "other"
    env = {k: v for k, v in os.environ.items() if k not in ("FEDRAY_TOKEN", "FEDRAY_DATA_DIR")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    gateway = f"127.0.0.1:{gateway_port}"
    for name, folder in (("site-0", fed), ("site-1", fed), ("gone", fed), ("intruder", other)):
        out = _fedray("client", "add", name, "--data-dir", str(folder), "--gateway", gateway,
                      "--attr", "region=eu", "-o", str(tmp_path / f"{name}.json"), env=env)
        assert out.returncode == 0, out.stderr
        assert oct((tmp_path / f"{name}.json").stat().st_mode & 0o777) == "0o600"
    out = _fedray("client", "revoke", "gone", "--data-dir", str(fed), env=env)
    assert out.returncode == 0 and "revoked 1 credential" in out.stdout, out.stderr
    listed = json.loads(_fedray("client", "list", "--json", "--data-dir", str(fed),
                                env=env).stdout)
    assert {(c["name"], c["kind"], c["revoked"]) for c in listed} == {
        ("site-0", "key", False), ("site-1", "key", False), ("gone", "key", True)}
    # The federation keeps only public material: no private key in its data directory.
    keys = [json.loads((tmp_path / f"{n}.json").read_text())["private_key"]
            for n in ("site-0", "site-1")]
    stored = b"".join(p.read_bytes() for p in fed.rglob("*") if p.is_file())
    assert not any(k.encode() in stored or bytes.fromhex(k) in stored for k in keys)

    paths = write_partitions(tmp_path / "data", 2, seed=1)
    run = subprocess.Popen(
        [sys.executable, "-m", "fedray", "run", "configs/digits.yaml", "--json",
         "--data-dir", str(fed), "--set", f"ray.address={ray_session}",
         "--set", f"controller.port={gateway_port}", "--set", f"combiners.base_port={combiner_port}",
         "--set", "combiners.advertise=127.0.0.1", "--set", "session.rounds=2",
         "--set", "session.min_clients=2", "--set", "session.wait_for_clients_s=120"],
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    clients = []
    try:
        wait_until(lambda: (fed / "gateway.json").exists() or run.poll() is not None,
                   "the federation to be up", timeout=120)
        assert run.poll() is None, run.communicate()[1][-3000:]
        refusals = {
            "revoked": _refused(env, "--credentials", str(tmp_path / "gone.json")),
            "other federation": _refused(env, "--credentials", str(tmp_path / "intruder.json")),
            "none": _refused(env, "--gateway", gateway, "--name", "anon",
                             "--ca", str(fed / "tls" / "ca.pem")),
        }
        for i, path in enumerate(paths):
            clients.append(subprocess.Popen(
                [sys.executable, "-m", "fedray", "edge", "start", "--credentials",
                 str(tmp_path / f"site-{i}.json"), "--app", "examples.digits.app",
                 "--data", str(path)], cwd=ROOT, env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        out, err = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
        for proc in clients:
            proc.terminate()
        logs = [proc.communicate(timeout=20)[0] for proc in clients]
    assert run.returncode == 0, err[-3000:]
    assert "the bridge serves TLS" in err and str(fed / "tls" / "ca.pem") in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["state"] == "finished" and summary["rounds"] == 2
    assert all("over TLS" in log and "round 2 train" in log for log in logs), logs

    reasons = {"revoked": "the credential of 'gone' was revoked",
               "other federation": "not signed by the CA in --credentials",
               "none": "needs a credential and none was sent"}
    for what, (code, stderr, seconds) in refusals.items():
        assert code != 0 and reasons[what] in stderr, (what, code, stderr)
        assert stderr.count("\n") == 1, (what, stderr)  # one line
        assert seconds < 2.0, (what, seconds)
    events = json.loads(_fedray("events", "--json", "--data-dir", str(fed), env=env).stdout)
    seen = {e.get("data", {}).get("reason") for e in events}
    assert {"revoked", "no_token"} <= seen, seen
    clients_doc = json.loads(_fedray("clients", "--json", "--data-dir", str(fed),
                                     env=env).stdout)
    assert {c["client_id"] for c in clients_doc} == {"site-0", "site-1"}
    assert all(c["attrs"] == {"region": "eu"} for c in clients_doc), clients_doc
