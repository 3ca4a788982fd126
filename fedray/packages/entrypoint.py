"""A compute package's entrypoints from fedray's Python callbacks.

A package whose ``entrypoint.py`` ends with::

    sys.exit(fedray.packages.entrypoint.main(sys.argv[1:], make_client, "digits-torch"))

serves the package contract (see ``manifest``) with ``make_client(data)``: any object
with ``train(params, config) -> (params, num_examples, metrics)`` and, for ``validate``,
``validate(params, config) -> (num_examples, metrics)`` (a ``TorchClient``, a
``KerasClient``, or your own), built once per call from the client's data path:

    train IN_MODEL OUT_MODEL OUT_META DATA CONFIG
    validate IN_MODEL OUT_META DATA CONFIG

A user mistake (``FedrayError``, ``ValueError``, a missing file) is one line on stderr and
exit code 2; anything else is a traceback, as a bug should be. Runs on edge machines: it
imports no ray, pymongo or minio.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fedray.errors import FedrayError
from fedray.serialization import decode, encode

USAGE = """usage: entrypoint.py train IN_MODEL OUT_MODEL OUT_META DATA CONFIG
       entrypoint.py validate IN_MODEL OUT_META DATA CONFIG"""


class Callbacks(Protocol):
    def train(self, params: dict, config: dict[str, Any]) -> tuple[Any, int, dict]: ...
    def validate(self, params: dict, config: dict[str, Any]) -> tuple[int, dict]: ...


def _config(path: str) -> dict[str, Any]:
    config = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError("the round config must be a JSON object")
    return config


def _meta(path: str, num_examples: int, metrics: dict) -> None:
    Path(path).write_text(json.dumps({"num_examples": int(num_examples),
                                      "metrics": {k: float(v) for k, v in metrics.items()}}),
                          encoding="utf-8")


def _train(make: Callable[[str], Callbacks], in_model: str, out_model: str, out_meta: str,
           data: str, config: str) -> None:
    params, num_examples, metrics = make(data).train(
        decode(Path(in_model).read_bytes()), _config(config))
    Path(out_model).write_bytes(encode(params))
    _meta(out_meta, num_examples, metrics)


def _validate(make: Callable[[str], Callbacks], in_model: str, out_meta: str, data: str,
              config: str) -> None:
    num_examples, metrics = make(data).validate(decode(Path(in_model).read_bytes()),
                                                _config(config))
    _meta(out_meta, num_examples, metrics)


COMMANDS = {"train": (_train, 5), "validate": (_validate, 4)}


def main(argv: list[str], make_client: Callable[[str], Callbacks], name: str = "package") -> int:
    """Run one entrypoint; returns the process's exit code."""
    if not argv or argv[0] not in COMMANDS or len(argv) - 1 != COMMANDS[argv[0]][1]:
        print(USAGE, file=sys.stderr)
        return 2
    func, _ = COMMANDS[argv[0]]
    if not argv[-2]:  # DATA
        print(f"{name} {argv[0]}: no data path given (start the edge client with --data)",
              file=sys.stderr)
        return 2
    try:
        func(make_client, *argv[1:])
    except (FedrayError, ValueError, OSError, KeyError) as exc:
        print(f"{name} {argv[0]}: {exc}", file=sys.stderr)
        return 2
    return 0
