"""Compute packages with their own Python environment (``python_env`` in fedray.yaml).

The manifest field, the venv built once per package and requirement list (reused, rebuilt
when either changes, one build when clients race), and in a real federation: a second
session after a client restart runs no pip, and an unsatisfiable requirement fails only
that client's task, with an event, while the others' round commits. pip sees only a
folder of wheels made by the test (tests/wheels.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from wheels import make_wheel, offline_pip, write_env_package

from fedray.errors import PackageError, PythonEnvError
from fedray.packages import build_package, load_package, parse_manifest
from fedray.packages.env import ensure_env
from fedray.serialization import encode
from tests.waiting import wait_connected

SEED = {"w": np.zeros((2, 3), np.float32)}


@pytest.fixture
def wheels(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "wheels"
    make_wheel(folder)
    offline_pip(monkeypatch, folder)
    return folder


# ------------------------------------------------------------------------------ manifest


def test_python_env_takes_requirements_or_a_file_in_the_package(tmp_path):
    base = "name: p\nentrypoints:\n  validate: python v.py {out_meta}\n"
    env = parse_manifest(base + "python_env: {requirements: ['a>=1', ' b ']}\n").python_env
    assert env.requirements == ("a>=1", "b")
    (tmp_path / "fedray.yaml").write_text(base + "python_env: {requirements_file: req.txt}\n")
    (tmp_path / "req.txt").write_text("# pinned\nalpha==1.0  # why\n\nbeta\n")
    from fedray.packages import read_manifest

    assert read_manifest(tmp_path).python_env.requirements == ("alpha==1.0", "beta")
    (tmp_path / "req.txt").write_text("alpha\n--extra-index-url http://evil.example\n")
    with pytest.raises(PackageError, match="req.txt: line 2: .* is a pip option"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("field, why", [
    ("python_env: [a]", "must be a mapping with one of"),
    ("python_env: {requirements: [a], requirements_file: r.txt}", "must be a mapping with one"),
    ("python_env: {requirements: a}", "must be a list"),
    ("python_env: {requirements: ['-e git+https://x']}", "is a pip option"),
    ("python_env: {requirements: ['']}", "non-empty string"),
    ("python_env: {requirements_file: ../r.txt}", "relative path inside the package"),
    ("python_env: {requirements_file: /etc/r.txt}", "relative path inside the package"),
])
def test_a_bad_python_env_is_refused_naming_the_field(field, why):
    with pytest.raises(PackageError, match=f"fedray.yaml: field 'python_env.*{why}"):
        parse_manifest("name: p\nentrypoints:\n  validate: python v.py {out_meta}\n"
                       + field + "\n", "fedray.yaml")


@pytest.mark.parametrize("line, kind", [
    ("x @ https://example.com/x-1.0-py3-none-any.whl", "a direct reference (name @ URL)"),
    ("x @ file:///tmp/x", "a direct reference (name @ URL)"),
    ("git+https://github.com/o/x", "a version-control URL"),
    ("https://example.com/x-1.0.tar.gz", "a URL"),
    ("file:/tmp/x", "a URL"),
    ("./x", "a local path"),
    ("/opt/x", "a local path"),
    ("../x", "a local path"),
    ("x-1.0-py3-none-any.whl", "a local path"),
    ("x==1.0 --hash=sha256:00", "a pip option"),
    ("x==${HOME}", "an environment variable reference"),
])
def test_urls_vcs_and_local_paths_are_refused_naming_the_line(tmp_path, line, kind):
    base = "name: p\nentrypoints:\n  validate: python v.py {out_meta}\n"
    with pytest.raises(PackageError) as err:
        parse_manifest(base + f"python_env: {{requirements: ['ok>=1', '{line}']}}\n",
                       "fedray.yaml")
    assert "field 'python_env.requirements[1]'" in str(err.value)
    assert f"{line[:40]!r} is {kind}" in str(err.value) and "by name" in str(err.value)
    (tmp_path / "fedray.yaml").write_text(base + "python_env: {requirements_file: req.txt}\n")
    (tmp_path / "req.txt").write_text(f"ok\n{line}\n")
    from fedray.packages import read_manifest

    with pytest.raises(PackageError, match=r"req.txt: line 2: .* is " + kind[:12]):
        read_manifest(tmp_path)


def test_requirements_by_name_with_extras_versions_and_markers_are_accepted():
    lines = ["scikit-learn>=1.4", "torch==2.3.1+cpu", "zope.interface", "numpy ~= 1.26",
             "a[b,c]>=1,<2", 'x; python_version >= "3.10" and sys_platform == "linux"']
    base = "name: p\nentrypoints:\n  validate: python v.py {out_meta}\n"
    env = parse_manifest(base + f"python_env: {{requirements: {lines!r}}}\n").python_env
    assert env.requirements == tuple(lines)


# ------------------------------------------------------------------------------ the venv


def _ensure(cache: Path, requirements, lines: list[str], package_id: str = "a" * 64):
    return ensure_env(package_id, requirements, cache, label="package 't'", cwd=cache,
                      environ=dict(__import__("os").environ), say=lines.append)


def test_a_venv_is_built_once_reused_and_rebuilt_when_the_requirements_change(tmp_path,
                                                                              wheels):
    cache, lines = tmp_path / "cache", []
    first = _ensure(cache, ["fedray-envprobe==0.1"], lines)
    assert first.built and (first.path / "fedray-env.json").is_file()
    log = cache / "envs" / f"{first.key}.log"
    built_log = log.read_bytes()
    again = _ensure(cache, ["fedray-envprobe==0.1"], lines)
    assert (again.built, again.key) == (False, first.key) and log.read_bytes() == built_log
    other = _ensure(cache, ["fedray-envprobe"], lines)
    assert other.built and other.key != first.key
    moved = _ensure(cache, ["fedray-envprobe==0.1"], lines, package_id="b" * 64)
    assert moved.built and moved.key not in (first.key, other.key)
    assert [line.split(" the python env")[0] for line in lines] == \
        ["building", "built", "reusing", "building", "built", "building", "built"]


def test_clients_racing_for_one_venv_build_it_once(tmp_path, wheels):
    cache, results, lines = tmp_path / "cache", [], []
    threads = [threading.Thread(target=lambda: results.append(
        _ensure(cache, ["fedray-envprobe==0.1"], lines))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(r.built for r in results) == [False, False, True]
    assert len({r.key for r in results}) == 1
    assert sum(line.startswith("building") for line in lines) == 1


def test_an_unsatisfiable_requirement_is_one_line_of_pip_and_leaves_no_venv(tmp_path, wheels):
    cache, lines = tmp_path / "cache", []
    with pytest.raises(PythonEnvError) as info:
        _ensure(cache, ["fedray-envprobe==9.9"], lines)
    first = str(info.value).splitlines()[0]
    assert first == ("pip install for package 't' failed: ERROR: No matching distribution "
                     "found for fedray-envprobe==9.9"), first
    assert [p.name for p in (cache / "envs").iterdir() if p.is_dir()] == []


def test_a_package_runs_in_its_venv_unless_told_not_to(tmp_path, wheels):
    from fedray.edge.workers import PackageWorker

    root = write_env_package(tmp_path / "pkg", ["fedray-envprobe==0.1"])
    archive = tmp_path / "pkg.tgz"
    sha = build_package(root, archive)
    package = load_package(archive, cache_dir=tmp_path / "cache", expected_sha256=sha)
    worker = PackageWorker(package, cache_dir=tmp_path / "cache")
    lines: list[str] = []
    worker.prepare(lines.append)
    model = encode(SEED)
    new, examples, metrics = worker.train(model, {})
    assert (new, examples, metrics) == (model, 5, {"probe": 42, "in_venv": 1})
    assert worker.package.env.key[:12] in lines[-1]

    bare = PackageWorker(package, use_env=False)
    bare.prepare(lines.append)
    assert "running it in this environment (--no-env)" in lines[-1]
    with pytest.raises(PackageError, match="No module named 'fedray_envprobe'"):
        bare.train(model, {})


def test_a_failed_build_is_not_retried_at_once(tmp_path, wheels):
    from fedray.edge.workers import PackageWorker

    root = write_env_package(tmp_path / "pkg", ["fedray-envprobe==9.9"])
    worker = PackageWorker(load_package(root), cache_dir=tmp_path / "cache")
    with pytest.raises(PythonEnvError):
        worker.prepare(lambda line: None)
    started = time.monotonic()
    lines: list[str] = []
    with pytest.raises(PythonEnvError, match="No matching distribution"):
        worker.prepare(lines.append)
    assert lines == [] and time.monotonic() - started < 0.5  # no pip this time


def test_without_a_recent_pip_here_the_venv_gets_its_own(tmp_path, wheels, monkeypatch):
    from fedray.packages import env as env_module

    monkeypatch.setattr(env_module, "_pip_can_target", lambda: False)
    made = _ensure(tmp_path / "cache", ["fedray-envprobe==0.1"], [])
    assert made.built and list((made.path / "lib").glob("python3*/site-packages/pip"))


# ------------------------------------------------------------------------------ federation


class AddOne:
    """A callback-free worker: adds 1 to every weight, from 10 examples."""

    def train(self, model, config):
        from fedray.serialization import decode

        return encode({k: v + 1 for k, v in decode(model).items()}), 10, {}

    def validate(self, model, config):
        return 10, {}


def _federation(name: str, tmp_path: Path, min_clients: int, **session):
    from fedray.deploy.config_file import config_from_dict

    return config_from_dict({
        "federation": name, "seed_model": "unused", "data_dir": str(tmp_path / "fed"),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 1, "host": "127.0.0.1", "base_port": 0,
                      "heartbeat_interval_s": 0.5},
        "tracking": {"database": f"t_{name.replace('-', '_')}"},
        "session": {"rounds": 1, "min_clients": min_clients, "round_timeout_s": 60,
                    "validate": False, "wait_for_clients_s": 60, **session},
    })


@pytest.mark.integration
def test_a_package_env_is_built_once_for_two_sessions_and_a_client_restart(
        ray_session, tracking_uri, tmp_path, wheels):
    import os
    import subprocess
    import sys

    from fedray.deploy.federation import Federation
    from fedray.storage import open_model_store
    from fedray.tracking.store import TrackingStore

    root = Path(__file__).resolve().parent.parent
    archive = tmp_path / "envpkg.tgz"
    sha = build_package(write_env_package(tmp_path / "pkg", ["fedray-envprobe==0.1"]), archive)
    config = _federation("env-twice", tmp_path, 1, validate=True)
    seed_id = open_model_store("file", config.resolved_data_dir()).put(encode(SEED))
    env = {**os.environ, "FEDRAY_PACKAGE_CACHE": str(tmp_path / "cache"),
           "PYTHONUNBUFFERED": "1"}
    fed = Federation(config, None, tracking_uri).deploy((sha, archive.read_bytes()))
    logs, sessions = [], []
    try:
        for _ in range(2):  # each session with a freshly started client on the same cache
            client = subprocess.Popen(
                [sys.executable, "-m", "fedray", "edge", "start", "--gateway", fed.gateway,
                 "--name", "env-site", "--package-sha256", sha], cwd=root, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                sessions.append(fed.start_session(seed_id, sha,
                                                  package_size=archive.stat().st_size))
                status = fed.follow(lambda s: None)
            finally:
                client.terminate()
                logs.append(client.communicate(timeout=30)[0])
            assert status["state"] == "finished", (status, logs[-1])
    finally:
        fed.shutdown()
    assert "building the python env of package 'envpkg'" in logs[0], logs[0]
    assert "built the python env of package 'envpkg' in " in logs[0]
    assert "reusing the python env of package 'envpkg'" in logs[1], logs[1]
    assert "building" not in logs[1] and "round 1 validate" in logs[1]
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    try:
        rounds = [tracking.find("rounds", {"session_id": s})[0] for s in sessions]
        said = [e["message"] for e in tracking.find("events", {"source": "combiner-0"})]
    finally:
        tracking.close()
    assert [r["train_metrics"] for r in rounds] == [{"probe": 42, "in_venv": 1}] * 2
    assert sum("building the python env" in m for m in said) == 1, said
    assert sum("reusing the python env" in m for m in said) == 1, said


@pytest.mark.integration
def test_an_unsatisfiable_requirement_fails_that_clients_task_and_the_others_commit(
        ray_session, tracking_uri, fleet, tmp_path, wheels):
    from fedray.deploy.federation import Federation
    from fedray.edge.workers import PackageWorker
    from fedray.storage import open_model_store
    from fedray.tracking.store import TrackingStore

    broken = PackageWorker(load_package(write_env_package(tmp_path / "pkg",
                                                          ["fedray-envprobe==9.9"])),
                           cache_dir=tmp_path / "cache")
    config = _federation("env-broken", tmp_path, 2)
    seed_id = open_model_store("file", config.resolved_data_dir()).put(encode(SEED))
    fed = Federation(config, None, tracking_uri).deploy()
    try:
        for name, worker in [("broken", broken), ("ok-1", AddOne()), ("ok-2", AddOne())]:
            fleet.add(name, worker, fed.gateway)
        wait_connected(fleet, 3)
        session_id = fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()
    assert status["state"] == "finished", status
    failed = [line for line in fleet.lines if "FAILED" in line]
    assert failed == ["[broken] round 1 train FAILED: PythonEnvError: pip install for package "
                      "'envpkg' failed: ERROR: No matching distribution found for "
                      "fedray-envprobe==9.9"], fleet.lines
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    try:
        (round_,) = tracking.find("rounds", {"session_id": session_id})
        errors = tracking.find("events", {"session_id": session_id, "level": "error"})
    finally:
        tracking.close()
    assert round_["status"] == "finished" and round_["updates"] == 2
    share = round_["combiners"]["combiner-0"]
    assert share["failed"] == 1 and share["failures"]["broken"].startswith(
        "PythonEnvError: pip install for package 'envpkg' failed: ERROR: No matching")
    (event,) = [e for e in errors if "failed task" in e["message"]]
    assert event["data"]["error_class"] == "PythonEnvError"
    assert "fedray-envprobe==9.9" in event["message"] and "its output" not in event["message"]
