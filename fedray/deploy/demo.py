"""`fedray demo`: a whole federation on one machine, driven through the user-facing paths.

It partitions scikit-learn's bundled digits across clients, runs the federation through
``run_federation`` (the code behind `fedray run`), starts every edge client as its own
process with `fedray edge start`, and measures each round's committed model on held-out
data that no client ever saw. It ends by drawing the training curves (``fedray.tracking.plot``,
as `fedray plot` does) into ``<data_dir>/curve.png``.
"""

from __future__ import annotations

import importlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedray.children import fate_shared
from fedray.deploy import lifecycle
from fedray.deploy.config_file import config_from_dict
from fedray.deploy.exposure import federation_token
from fedray.deploy.lifecycle import Teardown
from fedray.deploy.runner import RunResult, print_summary, run_federation
from fedray.errors import ConfigError, FedrayError
from fedray.frameworks import require
from fedray.serialization import decode
from fedray.storage import open_model_store


@dataclass(frozen=True, slots=True)
class Workload:
    """What `fedray demo --framework NAME` runs: the clients' ``--app``, the seed model, the
    round settings, and ``evaluate(params, X, y) -> {"accuracy": …}`` (``module:function``),
    with which the demo scores each committed model on the held-out digits. ``client_env``
    is the clients' default environment (their own environment wins)."""

    app: str
    seed_model: str
    evaluate: str
    round_config: dict[str, Any]
    client_env: dict[str, str] = field(default_factory=dict)


# A torch client starts one compute thread per core; four of them on two cores thrash (the
# Keras demo took 85 s instead of 39 s here). One thread each is plenty for this model.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


WORKLOADS: dict[str, Workload] = {
    "numpy": Workload("examples.digits.app", "examples.digits.seed:seed_model",
                      "examples.digits.client.model:evaluate",
                      {"epochs": 5, "lr": 0.3, "batch_size": 32}),
    "torch": Workload("examples.digits_torch.app", "examples.digits_torch.seed:seed_model",
                      "examples.digits_torch.app:evaluate_arrays",
                      {"epochs": 5, "lr": 0.05, "batch_size": 32}, ONE_THREAD),
    "keras": Workload("examples.digits_keras.app", "examples.digits_keras.seed:seed_model",
                      "examples.digits_keras.app:evaluate_arrays",
                      {"epochs": 5, "lr": 0.05, "batch_size": 32}, ONE_THREAD),
}


def _examples(workload: Workload) -> tuple[Any, Callable[..., dict]]:
    """The digits data module and the workload's evaluate function, importable when fedray
    runs from the repository root."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module, _, function = workload.evaluate.partition(":")
    try:
        from examples.digits import data
        evaluate = getattr(importlib.import_module(module), function)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("examples"):
            raise ConfigError("fedray demo needs the examples/ folder: run it from the root "
                              "of the fedray repository") from None
        raise ConfigError(f"fedray demo: cannot import {module} ({exc})") from None
    return data, evaluate


def demo_config(clients: int, rounds: int, combiners: int, data_dir: Path,
                storage: str = "file", tracking: str = "embedded",
                framework: str = "numpy") -> dict[str, Any]:
    workload = WORKLOADS[framework]
    return {
        "federation": "demo",
        "seed_model": workload.seed_model,
        "data_dir": str(data_dir),
        "ray": {"address": "local", "num_cpus": 2},
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": combiners, "host": "127.0.0.1", "base_port": 0},
        "session": {"rounds": rounds, "min_clients": clients, "round_timeout_s": 120,
                    "wait_for_clients_s": 120, "validate": True,
                    "round_config": dict(workload.round_config)},
        "storage": {"uri": storage},
        "tracking": {"uri": tracking},
    }


def start_clients(gateway: str, paths: list[Path], logs: Path, token: str | None,
                  procs: list[subprocess.Popen] | None = None,
                  workload: Workload = WORKLOADS["numpy"]) -> list[subprocess.Popen]:
    """One `fedray edge start` process per data file, appended to ``procs`` as each starts.

    Each runs in a session of its own (a Ctrl-C in the terminal reaches only the demo, which
    then stops them in order) and gets SIGTERM from the kernel if the demo dies first.
    """
    logs.mkdir(parents=True, exist_ok=True)
    env = {**workload.client_env, **os.environ, "PYTHONUNBUFFERED": "1"}
    if token:
        env["FEDRAY_TOKEN"] = token
    procs = procs if procs is not None else []
    for i, path in enumerate(paths):
        cmd = [sys.executable, "-m", "fedray", "edge", "start", "--gateway", gateway,
               "--name", f"client-{i}", "--app", workload.app, "--data", str(path)]
        with open(logs / f"client-{i}.log", "wb") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          cwd=os.getcwd(), start_new_session=True,
                                          preexec_fn=fate_shared(signal.SIGTERM)))
    return procs


def _clients_label(count: int) -> str:
    return "" if count == 0 else "1 edge client" if count == 1 else f"{count} edge clients"


def stop_clients(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_demo(*, clients: int, rounds: int, combiners: int, partition: str,
             data_dir: Path | None, console: Console, storage: str = "file",
             tracking: str = "embedded", teardown: Teardown | None = None,
             framework: str = "numpy") -> dict[str, Any]:
    """Run the demo; ``storage``/``tracking`` are ``storage.uri``/``tracking.uri`` values
    (e.g. ``s3://bucket?endpoint=host:9000&secure=false`` and ``mongodb://host:27017/``),
    ``framework`` one of ``WORKLOADS``. Its edge clients join ``teardown`` with the
    federation (see ``run_federation``)."""
    if framework not in WORKLOADS:
        raise ConfigError(f"--framework {framework}: unknown (use {', '.join(WORKLOADS)})")
    require(framework, f"--framework {framework}")
    workload = WORKLOADS[framework]
    data_mod, evaluate = _examples(workload)
    # The demo is authenticated like any federation: a fresh token unless one is set.
    os.environ.setdefault("FEDRAY_TOKEN", secrets.token_hex(16))
    data_dir = (data_dir or Path(os.environ.get("FEDRAY_DATA_DIR") or Path.home() / ".fedray" / "demo"))
    data_dir = data_dir.expanduser().resolve()
    paths = data_mod.write_partitions(data_dir / "data", clients, scheme=partition, seed=0)
    test = data_mod.load_client_data(data_dir / "data" / "test.npz")
    config = config_from_dict(demo_config(clients, rounds, combiners, data_dir, storage, tracking,
                                          framework), source="fedray demo",
                              overrides={"data_dir": str(data_dir)})  # chosen above
    model_label = "" if framework == "numpy" else f", a {framework} CNN"
    console.print(escape(f"demo: {clients} clients ({partition} digits{model_label}), "
                         f"{combiners} combiners, {rounds} rounds; client logs in "
                         f"{data_dir / 'logs'}"))
    procs: list[subprocess.Popen] = []
    teardown = teardown if teardown is not None else Teardown()

    def on_ready(gateway: str) -> None:
        teardown.add(lifecycle.CLIENTS, lambda: _clients_label(len(procs)),
                     lambda: stop_clients(procs))
        start_clients(gateway, paths, data_dir / "logs", federation_token(config), procs,
                      workload)

    result = run_federation(config, console=console, on_ready=on_ready, resume=False,
                            teardown=teardown)
    print_summary(result, console)
    store = open_model_store(config.storage.uri, data_dir)
    accuracy = []
    for record in result.status["history"]:
        params = decode(store.get(record["model_id"]))
        accuracy.append(round(float(evaluate(params, test.X, test.y)["accuracy"]), 4))
    if accuracy:
        console.print("held-out accuracy per round: " + ", ".join(f"{a:.3f}" for a in accuracy))
    curve = plot_curve(result, accuracy, data_dir / "curve.png", console)
    summary = result.summary()
    summary.update(accuracy=accuracy, final_accuracy=accuracy[-1] if accuracy else None,
                   clients=clients, combiners=combiners, partition=partition, framework=framework,
                   curve=str(curve) if curve else None)
    return summary


def plot_curve(result: RunResult, accuracy: list[float], path: Path,
               console: Console) -> Path | None:
    """Draw the session's curves (plus held-out accuracy) like `fedray plot` does."""
    from fedray.tracking.plot import curve_title, plot_rounds

    status = result.status
    records = [{**record, "test_metrics": {"accuracy": acc}}
               for record, acc in zip(status["history"], accuracy, strict=False)]
    title = curve_title("demo", status["session_id"], status["state"])
    try:
        plot_rounds(records, path, title=title,
                    subtitle=f"{status['rounds_done']} of {status['rounds_planned']} rounds done")
    except FedrayError as exc:  # the run itself went fine: say so, don't fail it
        console.print(f"[yellow]warning:[/] no training curve: {escape(str(exc))}")
        return None
    console.print(escape(f"training curve: {path}"))
    return path
