"""End to end, as a user would: `fedray run CONFIG` plus `fedray edge start` processes,
then the query commands on the finished run's tracking."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from netutil import free_block, free_ports
from procs import assert_none_left, marked, new_mark

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _fedray(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedray", *args], cwd=ROOT, **kwargs)


def _query(data_dir: Path, collection: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "fedray", collection, "--json",
                          "--data-dir", str(data_dir)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_fedray_run_with_edge_clients_then_query(ray_session, tmp_path):
    from examples.digits.data import write_partitions
    from fedray.packages import build_package

    (gateway_port,) = free_ports(1)
    combiner_port = free_block(2, avoid=(gateway_port,))  # the config's two combiners
    data_dir = tmp_path / "fed"
    paths = write_partitions(tmp_path / "data", 3, seed=1)
    config = tmp_path / "digits.yaml"
    config.write_text((ROOT / "configs" / "digits.yaml").read_text())
    env = {**os.environ, "FEDRAY_TOKEN": secrets.token_hex(16),  # fedray run refuses weak ones
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "FEDRAY_PACKAGE_CACHE": str(tmp_path / "package-cache")}
    mark = new_mark()
    run = _fedray("run", str(config), "--json", "--data-dir", str(data_dir),
                  "--set", f"ray.address={ray_session}", "--set", "session.rounds=3",
                  "--set", f"controller.port={gateway_port}", "--set", "controller.host=127.0.0.1",
                  "--set", "combiners.host=127.0.0.1", "--set", f"combiners.base_port={combiner_port}",
                  "--set", "session.min_clients=3", "--set", "session.wait_for_clients_s=120",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                  env=marked(env, mark))
    # The package the federation will serve, built the same deterministic way.
    digits_sha = build_package(ROOT / "examples" / "digits" / "client", tmp_path / "digits.tgz")
    clients = []
    try:
        for i, path in enumerate(paths):
            # One site runs Python callbacks, one a local compute package, and one (no
            # --app or --package) downloads the package the federation serves: over
            # plaintext only the package it pins.
            code = [["--app", "examples.digits.app"], ["--package", "examples/digits/client"],
                    ["--package-sha256", digits_sha]][i]
            clients.append(_fedray("edge", "start", "--gateway", f"127.0.0.1:{gateway_port}",
                                   "--name", f"site-{i}", *code, "--data", str(path),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=env))
        out, err = run.communicate(timeout=240)
    finally:
        run.kill() if run.poll() is None else None
        for proc in clients:
            proc.terminate()
        logs = [proc.communicate(timeout=20)[0] for proc in clients]
    assert run.returncode == 0, err[-3000:]
    assert_none_left(mark, data_dir)  # its tracking server went with it
    assert "Token authentication is enabled" not in err  # Ray's warning stays out of our output
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["state"] == "finished" and summary["rounds"] == 3
    assert "round 3/3" in err
    assert all("round 3 train" in log and "update accepted" in log for log in logs), logs
    assert "installed compute package 'digits'" in logs[2]
    assert summary["history"][-1]["validation_metrics"]["accuracy"] > 0.8

    rounds = _query(data_dir, "rounds")
    assert sorted(r["round"] for r in rounds) == [1, 2, 3]
    assert all(r["status"] == "finished" for r in rounds)
    models = {m["model_id"]: m for m in _query(data_dir, "models")}
    final = models[summary["model_id"]]
    trail = [final]
    while trail[-1]["parent_id"]:
        trail.append(models[trail[-1]["parent_id"]])
    assert [m["round"] for m in trail] == [3, 2, 1, 0]  # seed + one model per round
    clients_doc = _query(data_dir, "clients")
    assert {c["name"] for c in clients_doc} >= {"site-0", "site-1", "site-2"}
    assert _query(data_dir, "sessions")[0]["status"] == "finished"
    assert len(_query(data_dir, "validations")) == 9
    packages = _query(data_dir, "packages")
    assert packages[0]["name"] == "digits" and len(packages[0]["sha256"]) == 64


def test_cli_user_mistakes_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: x\nseed_model: s\nsession: {rounds: 0}\n")
    digits = str(ROOT / "configs" / "digits.yaml")
    env = {k: v for k, v in os.environ.items() if k not in {"FEDRAY_TOKEN", "FEDRAY_DATA_DIR"}}
    for args, code, needle in [
        (["run", str(bad)], 2, "session.rounds must be greater than 0"),
        (["run", str(tmp_path / "missing.yaml")], 2, "no such config file"),
        (["run", digits, "--set", "session.roudns=3"], 2,
         "--set session.roudns: unknown field (did you mean session.rounds?)"),
        # No token, no per-client token, and 0.0.0.0: anyone could join, so nothing starts.
        (["run", digits, "--data-dir", str(tmp_path / "open")], 2,
         "$FEDRAY_TOKEN is not set and no client has a token"),
        (["edge", "start", "--gateway", "x:1", "--name", "n", "--app", "a", "--package", "b"], 2,
         "not both"),
        (["edge", "start", "--gateway", "x:1", "--name", "n", "--package", "/no/such"], 2,
         "no such folder"),
        (["edge", "start", "--gateway", "x:1", "--name", "n", "--app", "no.such.module"], 2,
         "cannot import"),
        (["rounds", "--filter", "{not json", "--data-dir", str(tmp_path)], 2, "--filter"),
    ]:
        result = subprocess.run([sys.executable, "-m", "fedray", *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == code, (args, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
