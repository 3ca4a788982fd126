"""Integration: every built-in strategy runs on the stock `configs/digits.yaml` with
`--set session.aggregator=NAME` alone (issue 15, "Defaults that work").

Each test loads the shipped config with that one override plus test-only settings (where
the federation lives and listens, its tracking, 2 rounds) and runs it as `fedray run`
does (``run_federation``, in this process, on the test session's Ray) with 8 in-process
edge clients training the digits MLP over real gRPC, to a finished session. The DP
strategies have no safe default (docs/privacy.md, "No defaults"): for them the config
names the options to set with an example, and that example, pasted, runs.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from fedray.deploy.config_file import load_config, parse_override
from fedray.deploy.runner import run_federation
from fedray.edge.workers import CallbackWorker
from fedray.errors import ConfigError
from fedray.serialization import decode
from fedray.storage import open_model_store
from fedray.strategies import REGISTRY
from fedray.tracking.store import TrackingStore
from tests.waiting import connections, wait_connected

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # examples/ is not installed

from examples.digits import app  # noqa: E402
from examples.digits.client import model as mlp  # noqa: E402
from examples.digits.data import load_split, write_partitions  # noqa: E402

pytestmark = pytest.mark.integration

CLIENTS = 8
# The option each one's message names first (secagg's options have a block of their own).
NEEDS_OPTIONS = {"dp_fixed": "session.aggregator_kwargs noise_multiplier",
                 "dp_adaptive": "session.aggregator_kwargs noise_multiplier",
                 "secagg": "session.secagg clip"}


@pytest.fixture(scope="module")
def partitions(tmp_path_factory) -> list[Path]:
    return write_partitions(tmp_path_factory.mktemp("digits"), CLIENTS, "iid", seed=0)


def test_only_options_is_what_this_file_expects():
    from fedray.strategies import make_strategy, options_problem, strategy_class

    needs = {n for n in REGISTRY if options_problem(n, strategy_class(n), {})}
    assert needs == set(NEEDS_OPTIONS)  # a new required option: decide, then update both
    assert make_strategy("fedprox").mu == 0.01


def _test_only(name: str, tmp_path: Path, tracking_uri: str) -> dict:
    """What a test must set besides the strategy: its own federation name, data and
    tracking, loopback with free ports, and fewer rounds."""
    label = name.replace("_", "-")
    return {"federation": f"digits-{label}", "data_dir": str(tmp_path / "fed"),
            "controller.host": "127.0.0.1", "controller.port": 0,
            "combiners.host": "127.0.0.1", "combiners.base_port": 0,
            "combiners.advertise": "127.0.0.1",
            "tracking.uri": tracking_uri, "tracking.database": f"t_defaults_{name}",
            "session.rounds": 2}


class Recording:
    """The digits client's train, noting the config every task brought."""

    def __init__(self, train) -> None:
        self.train, self.configs, self.lock = train, [], threading.Lock()

    def __call__(self, params, config):
        with self.lock:
            self.configs.append(dict(config))
        return self.train(params, config)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_built_in_strategy_runs_the_stock_digits_config_with_its_name_alone(
        name, ray_session, tracking_uri, fleet, partitions, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's package and seed are relative to the checkout
    monkeypatch.delenv("FEDRAY_TOKEN", raising=False)
    monkeypatch.delenv("FEDRAY_DATA_DIR", raising=False)
    started = time.monotonic()
    overrides = {"session.aggregator": name}
    if name in NEEDS_OPTIONS:
        with pytest.raises(ConfigError) as info:
            load_config(ROOT / "configs" / "digits.yaml", overrides)
        message = str(info.value)
        assert message.startswith(f"--set session.aggregator: {name} needs "
                                  f"{NEEDS_OPTIONS[name]}"), message
        field, value = parse_override(message.split("e.g. --set ", 1)[1].strip("'"))
        overrides[field] = value  # the example, pasted
    config = load_config(ROOT / "configs" / "digits.yaml",
                         {**overrides, **_test_only(name, tmp_path, tracking_uri)})
    stock = load_config(ROOT / "configs" / "digits.yaml")
    assert (config.session.min_clients, config.session.clients_per_round,
            config.session.max_kept_updates, config.session.round_config) == (
        stock.session.min_clients, stock.session.clients_per_round,
        stock.session.max_kept_updates, stock.session.round_config)

    trains = [Recording(app.make_client_fns(str(p))[0]) for p in partitions]
    names = [f"{name}-{i}" for i in range(CLIENTS)]

    def ready(gateway: str) -> None:
        before = connections(fleet.lines)
        for client, path, train in zip(names, partitions, trains, strict=True):
            fleet.add(client, CallbackWorker(train, app.make_client_fns(str(path))[1]),
                      gateway)
        wait_connected(fleet, before + CLIENTS, timeout=60)

    try:
        result = run_federation(config, console=Console(file=io.StringIO()), on_ready=ready)
    finally:
        for client in names:
            fleet.stop(client)
    status = result.status
    seconds = time.monotonic() - started
    assert status["state"] == "finished", status.get("reason")
    assert status["rounds_done"] == 2
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    try:
        rounds = tracking.find("rounds", {"session_id": status["session_id"]})
    finally:
        tracking.close()
    committed = [r for r in rounds if r.get("status") == "finished"]
    assert len(committed) == 2, rounds
    if name == "fedbuff":  # a version every min_clients (2) updates
        assert all(r["updates"] >= 1 for r in committed), rounds
    else:  # all 8 connected before the session started, and every round asks them all
        assert [r["updates"] for r in committed] == [CLIENTS, CLIENTS], rounds
    split = load_split()
    final = decode(open_model_store("file", result.data_dir).get(status["model_id"]))
    accuracy = mlp.evaluate(final, split.X_test, split.y_test)["accuracy"]
    print(f"\n{name}: finished in {seconds:.1f}s, held-out accuracy {accuracy:.3f}")
    if name == "fedprox":  # FedAvg that sends mu with every train task
        assert all(c.get("mu") == 0.01 for t in trains for c in t.configs)
