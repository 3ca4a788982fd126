"""`pip install fedray` (no extras) is a working edge: a venv with only that trains real
rounds against a federation of the full environment, and refuses server commands with
one line that names the extra.

The venv is built once for the module from a copy of the source (so the build leaves
nothing in the worktree); pip resolves the edge's dependencies from the machine's
indexes and its cache, as any `pip install .` does.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from fedray.serialization import encode
from fedray.storage import open_model_store
from fedray.tracking.store import TrackingStore

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
SERVER_MODULES = ("ray", "pymongo", "minio", "nx_27017")


def _env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment of a shell with only ``venv`` active (none of the test's paths)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "FEDRAY_TOKEN"}}
    return {**env, "VIRTUAL_ENV": str(venv), "PYTHONUNBUFFERED": "1",
            "PATH": os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]), **extra}


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install .` of this source tree and nothing else."""
    base = tmp_path_factory.mktemp("slim")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "fedray", src / "fedray",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(src)], env=_env(venv),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return venv


def test_the_slim_install_has_no_server_parts_and_says_which_extra_to_install(slim_venv,
                                                                               tmp_path):
    python = str(slim_venv / "bin" / "python")
    code = ("import importlib.util, sys, fedray, fedray.edge.cli\n"
            "from fedray.cli.main import main\n"
            "try:\n"
            "    main(['edge', 'start', '--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            f"installed = [m for m in {SERVER_MODULES!r} if importlib.util.find_spec(m)]\n"
            f"loaded = [m for m in sys.modules if m.split('.')[0] in {SERVER_MODULES!r}\n"
            "          or m.startswith('fedray.actors')]\n"
            "print('RESULT', installed, loaded, fedray.__file__)\n")
    out = subprocess.run([python, "-c", code], cwd=tmp_path, env=_env(slim_venv),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = out.stdout.strip().splitlines()[-1]
    assert result.startswith("RESULT [] [] ") and str(slim_venv) in result, result

    (tmp_path / "fed.yaml").write_text("federation: x\nseed_model: s.safetensors\n")
    for args, line in [
        (["run", "fed.yaml"], 'fedray run needs the server parts: pip install "fedray[server]"'),
        (["demo"], 'fedray demo needs the server parts and the examples: '
                   'pip install "fedray[server,examples]"'),
        (["rounds"], 'fedray rounds needs the server parts: pip install "fedray[server]"'),
        (["models"], 'fedray models needs the server parts: pip install "fedray[server]"'),
        (["models", "get", "latest", "-o", "m.safetensors"],
         'fedray models get needs the server parts: pip install "fedray[server]"'),
    ]:
        out = subprocess.run([str(slim_venv / "bin" / "fedray"), *args], cwd=tmp_path,
                             env=_env(slim_venv), capture_output=True, text=True, timeout=60)
        assert (out.returncode, out.stderr) == (11, line + "\n"), (args, out.stderr)
    assert not (tmp_path / "m.safetensors").exists()


def test_a_slim_edge_client_trains_real_rounds_against_a_full_federation(
        slim_venv, ray_session, tracking_uri, tmp_path):
    from examples.digits.data import write_partitions
    from examples.digits.seed import seed_model

    work = tmp_path / "site"  # the edge site: the digits app, no fedray source tree
    shutil.copytree(ROOT / "examples", work / "examples",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    data = write_partitions(tmp_path / "data", 1, seed=3)[0]
    token = secrets.token_hex(16)
    config = config_from_dict({
        "federation": "slim-edge", "seed_model": "unused", "data_dir": str(tmp_path / "fed"),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 1, "host": "127.0.0.1", "base_port": 0,
                      "heartbeat_interval_s": 0.5},
        "tracking": {"database": "t_slim_edge"},
        "session": {"rounds": 2, "min_clients": 1, "round_timeout_s": 60, "validate": True,
                    "wait_for_clients_s": 60, "round_config": {"epochs": 2}},
    })
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(seed_model()))
    fed = Federation(config, token, tracking_uri).deploy()
    client = None
    try:
        client = subprocess.Popen(
            [str(slim_venv / "bin" / "fedray"), "edge", "start", "--gateway", fed.gateway,
             "--name", "slim-site", "--app", "examples.digits.app", "--data", str(data)],
            cwd=work, env=_env(slim_venv, FEDRAY_TOKEN=token), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        session_id = fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()
        if client is not None:
            client.terminate()
            log = client.communicate(timeout=30)[0]
    assert status["state"] == "finished" and status["rounds_done"] == 2, (status, log)
    assert "round 2 train" in log and "update accepted" in log, log
    assert "Traceback" not in log, log
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    try:
        rounds = tracking.find("rounds", {"session_id": session_id}, sort=[("round", 1)])
        validations = tracking.find("validations", {"session_id": session_id})
    finally:
        tracking.close()
    assert [(r["round"], r["status"], r["updates"]) for r in rounds] == \
        [(1, "finished", 1), (2, "finished", 1)]
    assert len(validations) == 2 and all(v["client_id"] == "slim-site" for v in validations)
