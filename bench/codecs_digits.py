#!/usr/bin/env python
"""Update codecs on the digits example: bytes against held-out accuracy, over real Ray
and gRPC.

    python bench/codecs_digits.py                    # none, fp16, int8, topk at 4 fractions
    python bench/codecs_digits.py --codecs none int8 --clients 20 --rounds 10

One federation (2 combiners, ``--clients`` in-process edge clients on one event loop,
IID shares of ``examples/digits``) runs one session per codec with the same seed model
and settings; each session's bytes come from tracking (the rounds' ``bytes_in`` and
``bytes_out``), its accuracy from scoring the final model on the held-out digits no
client sees. One JSON line goes to stdout: for each codec its accuracy, bytes per round
in and out, and how many times fewer than ``none`` (updates only; in and out; in and out
after round 1, whose seed model every client fetches whole); the rest to stderr. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # examples/ and bench/ (fedray as installed)

from bench.fedbuff_vs_fedavg import Fleet, log  # noqa: E402

CODECS = ["none", "fp16", "int8", "int8/up", "topk:0.3", "topk:0.1", "topk:0.1/up",
          "topk:0.03", "topk:0.01"]


def settings_of(codec: str) -> dict[str, Any]:
    """``int8``, ``topk:0.1``; a trailing ``/up`` sends the model down whole
    (``session.codec_downlink: false``)."""
    codec, up, _ = codec.partition("/up")
    name, _, fraction = codec.partition(":")
    return {"codec": name, "codec_kwargs": {"fraction": float(fraction)} if fraction else {},
            "codec_downlink": not up}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codecs", nargs="+", default=CODECS,
                        help="none, fp16, int8, topk or topk:FRACTION; add /up to compress "
                             "the uplink only")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    import ray

    from examples.digits import app
    from examples.digits.client import model
    from examples.digits.data import load_client_data, write_partitions
    from examples.digits.seed import seed_model
    from fedray.actors.controller.queue import SessionRequest
    from fedray.deploy.config_file import config_from_dict
    from fedray.deploy.federation import Federation
    from fedray.edge.workers import CallbackWorker
    from fedray.serialization import decode, encode
    from fedray.storage import open_model_store
    from fedray.tracking.embedded import EmbeddedMongo
    from fedray.tracking.store import TrackingStore

    data_dir = Path(tempfile.mkdtemp(prefix="fr-bench-codecs-"))
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(data_dir / "ray"),
             namespace="fedray-bench", log_to_driver=False)
    tracking = EmbeddedMongo(data_dir / "tracking")
    tracking.start()
    paths = write_partitions(data_dir / "data", args.clients, "iid", seed=0)
    test = load_client_data(data_dir / "data" / "test.npz")
    config = config_from_dict({
        "federation": "bench-codecs", "seed_model": "unused", "data_dir": str(data_dir),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 2, "host": "127.0.0.1", "base_port": 0},
        "tracking": {"database": "bench_codecs"},
        "session": {"rounds": args.rounds, "min_clients": args.clients, "validate": False,
                    "round_timeout_s": 120, "wait_for_clients_s": 120, "seed": 1},
    })
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(seed_model()))
    rows: list[dict[str, Any]] = []
    fed = Federation(config, None, tracking.uri).deploy()
    fleet = Fleet()
    try:
        for i, path in enumerate(paths):
            fleet.add(f"digits-{i:03d}", CallbackWorker(*app.make_client_fns(str(path))),
                      fed.gateway)
        while fleet.connected() < args.clients:
            time.sleep(0.2)
        records = TrackingStore.from_uri(tracking.uri, "bench_codecs")
        for codec in args.codecs:
            settings = dataclasses.replace(config.session, **settings_of(codec))
            session_id = uuid.uuid4().hex[:16]
            started = time.monotonic()
            ray.get(fed.controller.submit_session.remote(
                SessionRequest(session_id, settings, seed_id)))
            status = fed.follow(lambda s: None)
            if status["state"] != "finished":
                rows.append({"codec": codec, "error": status.get("reason", status["state"])})
                continue
            rounds = [records.get_round(session_id, r) for r in range(1, args.rounds + 1)]
            final = decode(store.get(status["model_id"]))
            row = {"codec": codec,
                   "accuracy": round(model.evaluate(final, test.X, test.y)["accuracy"], 4),
                   "bytes_in_per_round": sum(r["bytes_in"] for r in rounds) // args.rounds,
                   "bytes_out_per_round": sum(r["bytes_out"] for r in rounds) // args.rounds,
                   # after round 1, whose model (the seed) every client fetches whole
                   "bytes_per_round_after_1": sum(r["bytes_in"] + r["bytes_out"]
                                                  for r in rounds[1:]) // max(1, args.rounds - 1),
                   "seconds": round(time.monotonic() - started, 2)}
            rows.append(row)
            log(json.dumps(row))
    finally:
        fleet.close()
        fed.shutdown()
        tracking.stop()
        ray.shutdown()
        shutil.rmtree(data_dir, ignore_errors=True)
    plain = next((r for r in rows if r["codec"] == "none" and "error" not in r), None)
    for row in rows:
        if plain and "error" not in row:
            row["bytes_in_fewer"] = round(plain["bytes_in_per_round"] / row["bytes_in_per_round"], 2)
            row["bytes_fewer"] = round(
                (plain["bytes_in_per_round"] + plain["bytes_out_per_round"])
                / (row["bytes_in_per_round"] + row["bytes_out_per_round"]), 2)
            row["bytes_fewer_after_1"] = round(plain["bytes_per_round_after_1"]
                                               / row["bytes_per_round_after_1"], 2)
            row["accuracy_vs_none"] = round(row["accuracy"] - plain["accuracy"], 4)
    print(json.dumps({"bench": "codecs_digits", "clients": args.clients,
                      "rounds": args.rounds, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
