"""What SecAgg+'s protocol core costs, in one process (no Ray, no network).

    python bench/secagg_core.py                       # n = 100, P = 100k, 0/10/30% dropouts
    python bench/secagg_core.py --clients 500 --params 1000000 --dropouts 0.1
    python bench/secagg_core.py --repeat 3          # the median of 3 rounds per case

One JSON line per case: the PRG's speed at P = 1M, then for each dropout fraction the
graph (planned for ``--plan-dropout``, 30% by default, so the cases share one graph),
the per-client CPU seconds of its three stages (advertise, share keys, mask: the mean
over clients), the combiners' fold, and the controller's unmasking (``finish``: rebuild
seeds and keys, take the masks away). Dropouts leave after sharing keys, before their
masked input: the costly case, where their pairwise masks must be rebuilt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from fedray.strategies.secagg import graph, masks
from fedray.strategies.secagg.inprocess import Dropouts, Trace, run_round
from fedray.strategies.secagg.messages import RoundSetup
from fedray.strategies.secagg.quantize import Quantizer


def prg_speed(length: int = 1_000_000, repeat: int = 20) -> dict:
    out = np.empty(length, np.uint32)
    masks.prg(b"k" * 32, length, out)
    started = time.perf_counter()
    for _ in range(repeat):
        masks.prg(b"k" * 32, length, out)
    seconds = (time.perf_counter() - started) / repeat
    return {"case": "prg", "params": length, "ms": round(seconds * 1e3, 3),
            "mb_per_s": round(4 * length / seconds / 1e6)}


def one_round(n: int, params: int, dropout: float, plan_dropout: float, combiners: int) -> dict:
    plan = graph.plan(n, plan_dropout)
    setup = RoundSetup(round_id=b"bench/1", graph_seed=b"bench", clients=tuple(range(1, n + 1)),
                       degree=plan.degree, threshold=plan.threshold,
                       quantizer=Quantizer(clip=1.0, bits=16), length=params)
    rng = np.random.default_rng(0)
    updates = {i: rng.normal(0, 0.01, params).astype(np.float32) for i in setup.clients}
    gone = frozenset(rng.choice(setup.clients, int(round(dropout * n)), replace=False).tolist())
    trace = Trace()
    result = run_round(setup, updates, combiners, Dropouts(before_input=gone), trace=trace)
    s = trace.seconds
    return {"case": "round", "clients": n, "params": params, "dropout": dropout,
            "degree": plan.degree, "threshold": plan.threshold, "combiners": combiners,
            "survivors": len(result.survivors),
            "client_s": round((s["advertise"] + s["share_keys"]) / n
                              + s["masked_input"] / max(1, n - len(gone)), 4),
            "client_mask_s": round(s["masked_input"] / max(1, n - len(gone)), 4),
            "fold_s": round(s["fold"], 4), "reduce_s": round(s["reduce"], 4),
            "unmask_s": round(s["finish"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    parser.add_argument("--plan-dropout", type=float, default=0.3)
    parser.add_argument("--combiners", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="rounds per case; the median")
    args = parser.parse_args()
    print(json.dumps(prg_speed()), flush=True)
    for dropout in args.dropouts:
        runs = [one_round(args.clients, args.params, dropout, args.plan_dropout,
                          args.combiners) for _ in range(args.repeat)]
        line = dict(runs[0], runs=len(runs))
        for key in ("client_s", "client_mask_s", "fold_s", "reduce_s", "unmask_s"):
            line[key] = statistics.median(r[key] for r in runs)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
