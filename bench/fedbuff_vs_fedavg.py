#!/usr/bin/env python
"""FedBuff against synchronous FedAvg on the digits example, over real Ray and gRPC.

    python bench/fedbuff_vs_fedavg.py                       # the time-budget comparison
    python bench/fedbuff_vs_fedavg.py --only fedbuff --slow 0 --train-s 0 --versions 60

By default: 6 digits clients (IID shares of the training pool, ``examples/digits``;
``--partition label_skew`` for Dirichlet label skew), 2 of
them ``--slowdown`` (5) times slower than the others (each training sleeps ``--train-s``
seconds first, the slow ones ``--train-s x --slowdown``). FedAvg runs ``--rounds`` rounds
(every client, every round); FedBuff then runs with ``session.time_budget_s`` =
``--budget`` (0.8) x FedAvg's wall time and the default FedBuff options unless
``--buffer-size`` / ``--kwargs`` say otherwise. Both sessions' final models are scored
on the held-out digits (``load_split``'s test set, which no client sees), as
``fedray demo`` scores its rounds.

``--only fedbuff`` runs FedBuff alone for ``--versions`` versions (no budget): with
``--slow 0 --train-s 0`` the equally fast clients of issue 15.

The federation is deployed as the tests deploy one (``Federation.deploy`` on a private
local Ray with 2 CPUs, the embedded tracking server, in-process ``EdgeRunner`` clients on
one background event loop, real gRPC on 127.0.0.1). One JSON line goes to stdout, the rest
to stderr. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # examples/ (fedray as installed, or from $PYTHONPATH)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Fleet:
    """Edge clients on one background event loop, as one edge process hosts them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[Any] = []
        self.futures: list[Any] = []
        self.lines: list[str] = []

    def add(self, name: str, worker: Any, gateway: str) -> None:
        from fedray.edge.client import EdgeRunner, EdgeSettings

        async def make() -> Any:
            return EdgeRunner(worker, EdgeSettings(gateway=gateway, name=name),
                              say=self.lines.append)

        runner = asyncio.run_coroutine_threadsafe(make(), self.loop).result()
        self.runners.append(runner)
        self.futures.append(asyncio.run_coroutine_threadsafe(runner.run(), self.loop))

    def connected(self) -> int:
        return sum("connected to" in line for line in list(self.lines))

    def close(self) -> None:
        for runner in self.runners:
            self.loop.call_soon_threadsafe(runner.stop.set)
        for future in self.futures:
            with contextlib.suppress(Exception):
                future.result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def digits_workers(delays: list[float], round_config: dict[str, Any],
                   scheme: str = "iid") -> list[Any]:
    from examples.digits.client import model
    from examples.digits.data import partition
    from fedray.edge.workers import CallbackWorker

    settings = model.round_settings(round_config)

    def make(X, y, seconds):  # noqa: ANN001, ANN202
        def train(params, config):  # noqa: ANN001, ANN202
            if seconds:
                time.sleep(seconds)  # a slower machine
            new, metrics = model.train(params, X, y, epochs=int(settings["epochs"]),
                                       lr=float(settings["lr"]),
                                       batch_size=int(settings["batch_size"]), seed=0)
            return new, len(y), metrics
        return CallbackWorker(train)

    parts = partition(len(delays), scheme=scheme, seed=0)  # type: ignore[arg-type]
    return [make(X, y, s) for s, (X, y) in zip(delays, parts, strict=True)]


def run_session(name: str, data_dir: Path, tracking_uri: str, delays: list[float],
                session: dict[str, Any], scheme: str = "iid") -> dict[str, Any]:
    from examples.digits.client import model
    from examples.digits.data import load_split
    from fedray.deploy.config_file import config_from_dict
    from fedray.deploy.federation import Federation
    from fedray.serialization import decode, encode
    from fedray.storage import open_model_store
    from fedray.tracking.store import TrackingStore

    round_config = {"epochs": 5, "lr": 0.3, "batch_size": 32}
    config = config_from_dict({
        "federation": name, "seed_model": "unused", "data_dir": str(data_dir / name),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 2, "host": "127.0.0.1", "base_port": 0},
        "tracking": {"database": f"b_{name.replace('-', '_')}"},
        "session": {"min_clients": len(delays), "round_timeout_s": 60, "validate": False,
                    "wait_for_clients_s": 60, "round_config": round_config, **session},
    })
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(model.init_model(0)))
    fleet = Fleet()
    fed = Federation(config, None, tracking_uri).deploy()
    try:
        for i, worker in enumerate(digits_workers(delays, round_config, scheme)):
            fleet.add(f"{'slow' if delays[i] > min(delays) else 'fast'}-{i}", worker,
                      fed.gateway)
        deadline = time.monotonic() + 60
        while fleet.connected() < len(delays):
            if time.monotonic() > deadline:
                raise RuntimeError(f"clients did not connect: {fleet.lines[-10:]}")
            time.sleep(0.05)  # the bench polls the clients' output
        started = time.monotonic()
        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
        seconds = time.monotonic() - started
    finally:
        fleet.close()
        fed.shutdown()
    split = load_split()
    final = decode(store.get(status["model_id"]))
    accuracy = model.evaluate(final, split.X_test, split.y_test)["accuracy"]
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    sid = status["session_id"]
    rounds = tracking.find("rounds", {"session_id": sid, "status": "finished"},
                           sort=[("round", 1)])
    staleness = [c["staleness"] for r in rounds for c in r.get("contributions", [])]
    dropped = Counter(e["data"].get("reason", "?") for e in tracking.find(
        "events", {"session_id": sid, "message": {"$regex": "dropped"}}))
    shares = [c for r in rounds for c in (r.get("combiners") or {}).values()]
    out = {
        "state": status["state"], "reason": status.get("reason", ""),
        "versions" if session.get("aggregator") == "fedbuff" else "rounds": len(rounds),
        "seconds": round(seconds, 2), "accuracy": round(float(accuracy), 4),
        "updates": sum(r.get("updates", 0) for r in rounds),
        "dropped": dict(dropped),
        "bytes_in": sum(c.get("bytes_in", 0) for c in shares),
        "bytes_out": sum(c.get("bytes_out", 0) for c in shares),
    }
    session_doc = tracking.find("sessions", {"session_id": sid})[0]
    if rounds:  # seconds from the session's creation to its first and last commit
        created = session_doc["created_at"]
        out["first_commit_s"] = round((rounds[0]["updated_at"] - created).total_seconds(), 3)
        out["last_commit_s"] = round((rounds[-1]["updated_at"] - created).total_seconds(), 3)
    if staleness:
        out["staleness"] = {"median": statistics.median(staleness), "max": max(staleness),
                            "histogram": dict(sorted(Counter(staleness).items()))}
    tracking.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--slow", type=int, default=2, help="how many clients are slower")
    parser.add_argument("--slowdown", type=float, default=5.0)
    parser.add_argument("--train-s", type=float, default=0.2,
                        help="seconds a fast client's training sleeps first")
    parser.add_argument("--rounds", type=int, default=5, help="FedAvg rounds")
    parser.add_argument("--budget", type=float, default=0.8,
                        help="FedBuff's time budget, as a fraction of FedAvg's wall time")
    parser.add_argument("--only", choices=["fedbuff"], default=None)
    parser.add_argument("--versions", type=int, default=1000,
                        help="FedBuff versions at most (the budget usually ends it first)")
    parser.add_argument("--buffer-size", type=int, default=0, help="0: the default")
    parser.add_argument("--kwargs", type=json.loads, default={},
                        help="FedBuff aggregator_kwargs, as JSON")
    parser.add_argument("--partition", choices=["iid", "label_skew"], default="iid")
    args = parser.parse_args()

    import ray

    import fedray
    from fedray.tracking.embedded import EmbeddedMongo

    log(f"fedray from {Path(fedray.__file__).parent}")

    delays = [args.train_s * args.slowdown] * args.slow \
        + [args.train_s] * (args.clients - args.slow)
    data_dir = Path(tempfile.mkdtemp(prefix="fr-bench-fedbuff-"))
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(data_dir / "ray"),
             namespace="fedray-bench", log_to_driver=False)
    tracking = EmbeddedMongo(data_dir / "tracking")
    tracking.start()
    result: dict[str, Any] = {"clients": args.clients, "slow": args.slow,
                              "slowdown": args.slowdown, "train_s": args.train_s,
                              "partition": args.partition,
                              "loadavg_1m": round(os.getloadavg()[0], 2)}
    fedbuff: dict[str, Any] = {"aggregator": "fedbuff", "rounds": args.versions,
                               "aggregator_kwargs": args.kwargs}
    if args.buffer_size:
        fedbuff["buffer_size"] = args.buffer_size
    try:
        if args.only is None:
            log(f"fedavg: {args.rounds} rounds")
            result["fedavg"] = run_session("fedavg", data_dir, tracking.uri, delays,
                                           {"rounds": args.rounds}, args.partition)
            budget = round(args.budget * result["fedavg"]["seconds"], 2)
            fedbuff["time_budget_s"] = budget
            result["budget_s"] = budget
        log(f"fedbuff: {fedbuff}")
        result["fedbuff"] = run_session("fedbuff", data_dir, tracking.uri, delays, fedbuff,
                                        args.partition)
        if args.only is None:
            result["accuracy_gap"] = round(result["fedavg"]["accuracy"]
                                           - result["fedbuff"]["accuracy"], 4)
    finally:
        tracking.stop()
        ray.shutdown()
        shutil.rmtree(data_dir, ignore_errors=True)
    print(json.dumps(result))
    ok = all(result[k]["state"] == "finished" for k in ("fedavg", "fedbuff") if k in result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
