"""FEDn's format end to end, with FEDn's own helpers: examples/fedn-digits/client, whose
python_env.yaml installs ``fedn`` (0.33.0, from the package index) into the package venv.

One venv is built for the whole test session (``fedn_digits``: a copy of the package, its
seed made by ``fedray package seed``); the federation's clients then reuse it. The copy
keeps the repository clean: FEDn's build writes ``../seed.npz`` beside the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from netutil import free_ports
from procs import assert_none_left, marked, new_mark

from fedray.cli.main import main
from fedray.packages import load_package
from fedray.serialization import decode, decode_npz, encode

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
FEDN_DIGITS = ROOT / "examples" / "fedn-digits" / "client"
DIGITS = ROOT / "examples" / "digits" / "client"
DIGITS_NAMES = ("hidden.weight", "hidden.bias", "out.weight", "out.bias")  # FEDn's 0, 1, 2, 3
ROUNDS, CLIENTS = 5, 3


@dataclass(frozen=True)
class FednDigits:
    root: Path  # the package copy
    cache: Path  # FEDRAY_PACKAGE_CACHE with its venv
    seed: Path  # ../seed.npz, written by its build entry point
    seed_output: str  # what `fedray package seed` printed
    python: Path  # the venv's interpreter, with fedn's helpers


@pytest.fixture(scope="session")
def fedn_digits(tmp_path_factory) -> FednDigits:
    base = tmp_path_factory.mktemp("fedn-digits")
    root = base / "fedn-digits" / "client"
    shutil.copytree(FEDN_DIGITS, root, ignore=shutil.ignore_patterns("__pycache__", "data"))
    cache = base / "cache"
    env = {**os.environ, "FEDRAY_PACKAGE_CACHE": str(cache)}
    env.pop("PIP_NO_INDEX", None)
    out = subprocess.run([sys.executable, "-m", "fedray", "package", "seed", str(root)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        pytest.fail(f"fedray package seed (the fedn venv) failed:\n{out.stderr[-3000:]}")
    package = load_package(root).with_env(cache)
    return FednDigits(root, cache, root.parent / "seed.npz", out.stdout + out.stderr,
                      package.env.python)


def test_package_seed_builds_the_fedn_venv_and_the_seed_is_the_digits_seed(fedn_digits):
    from examples.digits.client.model import init_model

    assert "building the python env of package 'fedn-digits' from python_env.yaml (6 " \
        in fedn_digits.seed_output
    assert f"package 'fedn-digits' build wrote ../seed.npz ({fedn_digits.seed}; numpy-helper " \
        "npz, 4 arrays, 9.6 kB)" in fedn_digits.seed_output, fedn_digits.seed_output
    seed, expected = decode_npz(str(fedn_digits.seed)), init_model(0)
    assert list(seed) == ["0", "1", "2", "3"]
    for i, name in enumerate(DIGITS_NAMES):
        assert seed[str(i)].tobytes() == expected[name].tobytes()
    version = subprocess.run([str(fedn_digits.python), "-c", "import importlib.metadata as m; "
                              "print(m.version('fedn'))"], capture_output=True, text=True)
    assert version.stdout.strip() == "0.33.0", version.stderr


# What FEDn's numpy helper makes of a file: each array's dtype, shape and bytes' sha256, in
# helper.load's order; then helper.save writes them back.
HELPER_ROUND_TRIP = """
import hashlib, json, sys
from fedn.utils.helpers.helpers import get_helper
helper = get_helper("numpyhelper")
weights = helper.load(sys.argv[1])
print(json.dumps([[w.dtype.str, list(w.shape), hashlib.sha256(w.tobytes()).hexdigest()]
                  for w in weights]))
helper.save(weights, sys.argv[2])
"""


def test_models_get_format_fedn_round_trips_through_fedns_helper_bit_exactly(fedn_digits,
                                                                              tmp_path):
    from fedray.storage import FileModelStore

    rng = np.random.default_rng(7)
    model = {"0": rng.normal(size=(64, 32)).astype(np.float32),
             "1": rng.normal(size=(3,)).astype(np.float64),
             "2": rng.normal(size=(2, 2)).astype(np.float16),
             "3": np.arange(5, dtype=np.int64), "4": np.array(3, np.int32),
             "5": np.array([True, False]), "6": np.zeros((0, 4), np.float32),
             **{str(i): np.full(i, i, np.uint8) for i in range(7, 12)}}
    store = FileModelStore(tmp_path / "store")
    model_id = store.put(encode(model))
    out, back = tmp_path / "model.npz", tmp_path / "back.npz"
    result = CliRunner().invoke(main, ["models", "get", model_id, "--storage",  # no tracking
                                       store.root.as_uri(), "--format", "fedn", "-o", str(out)])
    assert result.exit_code == 0, result.output
    seen = subprocess.run([str(fedn_digits.python), "-c", HELPER_ROUND_TRIP, str(out),
                           str(back)], capture_output=True, text=True, timeout=120)
    assert seen.returncode == 0, seen.stderr
    expected = [[model[str(i)].dtype.str, list(model[str(i)].shape),
                 hashlib.sha256(model[str(i)].tobytes()).hexdigest()] for i in range(12)]
    assert json.loads(seen.stdout) == expected
    assert hashlib.sha256(encode(decode_npz(str(back)))).hexdigest() == model_id


def _fedavg_of_the_fedray_digits_package(paths: list[Path], round_config: dict) -> bytes:
    """The fedray-format digits package (examples/digits/client) over the same clients,
    rounds and settings, with FedAvg (weighted by examples) in between."""
    from examples.digits.seed import seed_model

    package = load_package(DIGITS)
    model = encode(seed_model())
    for _ in range(ROUNDS):
        updates = [package.train(model, round_config, str(path)) for path in paths]
        total = sum(n for _, n, _ in updates)
        arrays = [decode(data) for data, _, _ in updates]
        model = encode({name: (sum(a[name].astype(np.float64) * n for a, (_, n, _)
                                   in zip(arrays, updates, strict=True)) / total
                               ).astype(np.float32) for name in DIGITS_NAMES})
    return model


def test_a_federation_of_fedn_digits_clients_reaches_the_fedray_digits_accuracy(
        ray_session, fedn_digits, tmp_path):
    from examples.digits.data import write_partitions
    from fedray.deploy.config_file import load_config

    gateway_port, combiner_port = free_ports(2)
    data_dir = tmp_path / "fed"
    paths = write_partitions(tmp_path / "data", CLIENTS, seed=1)
    held_out = tmp_path / "data" / "test.npz"
    env = {**os.environ, "FEDRAY_TOKEN": secrets.token_hex(16),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "FEDRAY_PACKAGE_CACHE": str(fedn_digits.cache), "PYTHONUNBUFFERED": "1"}
    mark = new_mark()
    config = ROOT / "configs" / "fedn-digits.yaml"
    run = subprocess.Popen(
        [sys.executable, "-m", "fedray", "run", str(config), "--json", "--data-dir",
         str(data_dir), "--set", f"ray.address={ray_session}", "--set",
         f"session.rounds={ROUNDS}", "--set", f"seed_model={fedn_digits.seed}",
         "--set", f"package={fedn_digits.root}",
         "--set", f"controller.port={gateway_port}", "--set", "controller.host=127.0.0.1",
         "--set", "combiners.host=127.0.0.1", "--set", f"combiners.base_port={combiner_port}",
         "--set", "combiners.count=1", "--set", f"session.min_clients={CLIENTS}",
         "--set", "session.wait_for_clients_s=180"], cwd=ROOT, env=marked(env, mark),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clients = [subprocess.Popen(
        [sys.executable, "-m", "fedray", "edge", "start", "--gateway",
         f"127.0.0.1:{gateway_port}", "--name", f"fedn-site-{i}", "--package",
         str(fedn_digits.root), "--data", str(path)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i, path in enumerate(paths)]
    try:
        out, err = run.communicate(timeout=420)
    finally:
        run.kill() if run.poll() is None else None
        for proc in clients:
            proc.terminate()
        logs = [proc.communicate(timeout=30)[0] for proc in clients]
    assert run.returncode == 0, (err[-3000:], logs)
    assert_none_left(mark, data_dir)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["state"] == "finished" and summary["rounds"] == ROUNDS, summary
    for log in logs:
        assert "reusing the python env of package 'fedn-digits'" in log, log
        assert "ran the startup entry point of package 'fedn-digits'" in log, log
        assert f"round {ROUNDS} train" in log and "update accepted" in log, log
        assert "FAILED" not in log and "REJECTED" not in log, log
    final = summary["history"][-1]
    assert set(final["train_metrics"]) >= {"loss", "accuracy", "epochs", "lr"}, final

    model_file = tmp_path / "final.npz"
    got = subprocess.run([sys.executable, "-m", "fedray", "models", "get", "latest", "--format",
                          "fedn", "-o", str(model_file), "--data-dir", str(data_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    fedn_package = load_package(fedn_digits.root).with_env(fedn_digits.cache)
    fedn_model = encode(decode_npz(str(model_file)))
    assert hashlib.sha256(fedn_model).hexdigest() == summary["model_id"]
    fedn_accuracy = fedn_package.validate(fedn_model, {}, str(held_out))[1]["accuracy"]

    round_config = load_config(config).session.round_config
    reference = _fedavg_of_the_fedray_digits_package(paths, dict(round_config))
    fedray_accuracy = load_package(DIGITS).validate(reference, {}, str(held_out))[1]["accuracy"]
    print(f"held-out accuracy after {ROUNDS} rounds: FEDn-format {fedn_accuracy:.4f}, "
          f"fedray-format {fedray_accuracy:.4f}")
    assert fedray_accuracy > 0.9
    assert abs(fedn_accuracy - fedray_accuracy) <= 0.02, (fedn_accuracy, fedray_accuracy)
