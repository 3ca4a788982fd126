"""Flower 1.42's Ray simulation on the same workload as ``round_overhead.py``: the figure
issue 16 compares fedray's round time against.

N virtual clients, P float32 parameters in 4 tensors, FedAvg over every client every
round, and the same noise "training" (uniform in +-1e-3, seeded by client and round, 100
examples). Flower's simulation moves no bytes over a network: its clients are Ray actors
in this process's Ray, handed the parameters in memory.

Runs in a venv of its own (Flower pins its own Ray)::

    python3 -m venv /work/venv-flower
    /work/venv-flower/bin/pip install "flwr[simulation]==1.42.0"
    /work/venv-flower/bin/python bench/flower_sim.py --clients 100 --params 1000000 --rounds 5

Prints one JSON line: ``round_s`` (per round, from the strategy's ``configure_fit`` to
the end of its ``aggregate_fit``), ``median_round_s``, ``total_s``, ``loadavg_1m``.
Everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import numpy as np

NOISE = 1e-3
EXAMPLES = 100
T0 = time.time()
LOAD_AT_START = round(os.getloadavg()[0], 2)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--client-cpus", type=float, default=1.0,
                   help="CPUs per virtual client (Flower's client_resources num_cpus)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the simulation's Ray")
    return p.parse_args(argv)


def seed_arrays(params: int) -> list[np.ndarray]:
    sizes = [params // 4 + (1 if i < params % 4 else 0) for i in range(4)]
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n, dtype=np.float32) for n in sizes]


def main(argv: list[str]) -> int:
    args = parse(argv)
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    rounds: dict[int, list[float]] = {}

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001
            rounds[server_round] = [time.perf_counter()]
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001
            out = super().aggregate_fit(server_round, results, failures)
            rounds[server_round].append(time.perf_counter())
            print(f"round {server_round}: {len(results)} results, {len(failures)} failures, "
                  f"{rounds[server_round][1] - rounds[server_round][0]:.3f}s", file=sys.stderr)
            return out

    class NoiseClient(NumPyClient):
        def __init__(self, index: int) -> None:
            self.index = index

        def fit(self, parameters, config):  # noqa: ANN001 - Flower's signature
            rnd = int(config.get("server_round", 0))
            rng = np.random.default_rng([self.index, rnd])
            out = []
            for arr in parameters:
                noise = rng.random(arr.size, dtype=np.float32)
                noise -= 0.5
                noise *= 2 * NOISE
                out.append(arr + noise.reshape(arr.shape))
            return out, EXAMPLES, {}

    def client_fn(context: Context):
        return NoiseClient(int(context.node_config["partition-id"])).to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0,
                               min_fit_clients=args.clients, min_available_clients=args.clients,
                               initial_parameters=ndarrays_to_parameters(
                                   seed_arrays(args.params)),
                               on_fit_config_fn=lambda r: {"server_round": r})
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(server_app=ServerApp(server_fn=server_fn),
                   client_app=ClientApp(client_fn=client_fn), num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": args.client_cpus},
                                   "init_args": {"num_cpus": args.cpus,
                                                 "include_dashboard": False}})
    round_s = [round(v[1] - v[0], 3) for _, v in sorted(rounds.items()) if len(v) == 2]
    print(json.dumps({
        "bench": "flower_sim", "flwr": __import__("flwr").__version__,
        "clients": args.clients, "params": args.params, "rounds": args.rounds,
        "client_cpus": args.client_cpus, "round_s": round_s,
        "median_round_s": round(statistics.median(round_s), 3) if round_s else None,
        "rounds_done": len(round_s), "total_s": round(time.time() - T0, 2),
        "loadavg_1m": [LOAD_AT_START, round(os.getloadavg()[0], 2)],
        "state": "finished" if len(round_s) == args.rounds else "failed"}))
    return 0 if len(round_s) == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
