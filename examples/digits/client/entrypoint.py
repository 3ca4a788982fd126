"""Command-line entrypoints of the digits compute package (see ``fedray.yaml``).

fedray runs these with the package directory as the working directory, so ``model.py`` is
imported from beside this file; the package needs only numpy and safetensors on the edge
machine. The contract, shared by every fedray compute package:

    train IN_MODEL OUT_MODEL OUT_META DATA CONFIG
        read the global model (safetensors) from IN_MODEL, train on DATA, write the new
        model to OUT_MODEL and {"num_examples": int, "metrics": {...}} to OUT_META.
    validate IN_MODEL OUT_META DATA CONFIG
        evaluate IN_MODEL on DATA's local validation split and write OUT_META likewise.

DATA is a ``.npz`` written by ``examples/digits/data.py`` (keys X, y and optionally X_val,
y_val); CONFIG is a JSON file with the round's settings. Errors go to stderr with exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model  # noqa: E402  (imported from this package's own folder)


class UsageError(Exception):
    pass


def _load_data(path: str) -> dict[str, np.ndarray]:
    if not path:
        raise UsageError("no data path given (start the edge client with --data FILE.npz)")
    if not Path(path).is_file():
        raise UsageError(f"data file {path!r} does not exist")
    with np.load(path, allow_pickle=False) as f:
        data = {key: f[key] for key in f.files}
    if "X" not in data or "y" not in data:
        raise UsageError(f"data file {path!r} needs arrays 'X' and 'y'")
    return data


def _load_config(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise UsageError("the round config must be a JSON object")
    return config


def _write_meta(path: str, num_examples: int, metrics: dict[str, float]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"num_examples": int(num_examples), "metrics": metrics}, f)


def cmd_train(in_model: str, out_model: str, out_meta: str, data: str, config: str) -> None:
    settings = model.round_settings(_load_config(config))
    arrays = _load_data(data)
    params, metrics = model.train(
        load_file(in_model),
        arrays["X"],
        arrays["y"],
        epochs=settings["epochs"],
        lr=settings["lr"],
        batch_size=settings["batch_size"],
        seed=settings["seed"],
        mu=settings["mu"],
    )
    save_file(params, out_model)
    _write_meta(out_meta, len(arrays["y"]), metrics)


def cmd_validate(in_model: str, out_meta: str, data: str, config: str) -> None:
    _load_config(config)
    arrays = _load_data(data)
    X, y = arrays.get("X_val"), arrays.get("y_val")
    if X is None or y is None or len(y) == 0:
        X, y = arrays["X"], arrays["y"]
    _write_meta(out_meta, len(y), model.evaluate(load_file(in_model), X, y))


COMMANDS = {"train": (cmd_train, 5), "validate": (cmd_validate, 4)}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS or len(argv) - 1 != COMMANDS[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    func, _ = COMMANDS[argv[0]]
    try:
        func(*argv[1:])
    except (UsageError, ValueError, OSError, KeyError) as exc:
        print(f"digits {argv[0]}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
