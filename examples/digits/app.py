"""The digits workload as Python callbacks, for ``fedray.EdgeClient(train=…, validate=…)``.

The same model and settings as the compute package in ``client/``, without a subprocess:
``make_client_fns(data)`` binds a client's ``.npz`` file (written by ``data.py``), and the
module-level ``train``/``validate`` read that path from ``FEDRAY_DATA`` at call time (the
edge CLI sets it from ``--data``). Round settings come from the round's config: ``epochs``
(5), ``lr`` (0.3), ``batch_size`` (32), ``seed`` (0), and ``mu`` (0: plain local SGD;
above 0, FedProx's proximal term); other keys are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from functools import cache

import numpy as np

from examples.digits.client import model
from examples.digits.data import ClientData, load_client_data

Params = dict[str, np.ndarray]
TrainFn = Callable[[Mapping[str, np.ndarray], Mapping], tuple[Params, int, dict]]
ValidateFn = Callable[[Mapping[str, np.ndarray], Mapping], tuple[int, dict]]


@cache
def _load(path: str) -> ClientData:
    return load_client_data(path)


def make_client_fns(data: str) -> tuple[TrainFn, ValidateFn]:
    """(train, validate) callbacks bound to one client's data file."""
    if not data:
        raise ValueError("the digits client needs a data file (client-<i>.npz)")

    def train(params: Mapping[str, np.ndarray], config: Mapping) -> tuple[Params, int, dict]:
        settings = model.round_settings(config)
        d = _load(data)
        new, metrics = model.train(
            params,
            d.X,
            d.y,
            epochs=int(settings["epochs"]),
            lr=float(settings["lr"]),
            batch_size=int(settings["batch_size"]),
            seed=int(settings["seed"]),
            mu=float(settings["mu"]),
        )
        return new, len(d.y), metrics

    def validate(params: Mapping[str, np.ndarray], config: Mapping) -> tuple[int, dict]:
        d = _load(data)
        X, y = (d.X_val, d.y_val) if len(d.y_val) else (d.X, d.y)
        return len(y), model.evaluate(params, X, y)

    return train, validate


def _env_data() -> str:
    data = os.environ.get("FEDRAY_DATA", "")
    if not data:
        raise ValueError("FEDRAY_DATA is not set (start the edge client with --data FILE.npz)")
    return data


def train(params: Mapping[str, np.ndarray], config: Mapping) -> tuple[Params, int, dict]:
    """Train on the file named by ``FEDRAY_DATA``; returns (params, num_examples, metrics)."""
    return make_client_fns(_env_data())[0](params, config)


def validate(params: Mapping[str, np.ndarray], config: Mapping) -> tuple[int, dict]:
    """Evaluate on the local validation split of ``FEDRAY_DATA``'s file."""
    return make_client_fns(_env_data())[1](params, config)
