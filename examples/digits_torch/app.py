"""The digits-torch client as Python callbacks: ``--app examples.digits_torch.app``.

The module-level ``train``/``validate`` run a ``TorchClient`` on the ``.npz`` named by
``FEDRAY_DATA`` (the edge CLI sets it from ``--data``), built once per process, so the
model, its data and torch's threads are set up once, not every round. ``make_client(path)``
gives the same client for a file of your choice (``fedray.EdgeClient(train=c.train,
validate=c.validate)``). ``evaluate_arrays`` scores a global model on held-out data, as
``fedray demo --framework torch`` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache

import numpy as np

from examples.digits_torch.client import model
from examples.digits_torch.client.model import make_client
from fedray.frameworks.torch import TorchClient, set_arrays

__all__ = ["evaluate_arrays", "make_client", "train", "validate"]


@cache
def _client(data: str) -> TorchClient:
    return make_client(data)


def _env_client() -> TorchClient:
    data = os.environ.get("FEDRAY_DATA", "")
    if not data:
        raise ValueError("FEDRAY_DATA is not set (start the edge client with --data FILE.npz)")
    return _client(data)


def train(params: Mapping[str, np.ndarray], config: dict) -> tuple[dict, int, dict]:
    """One round of local training on ``FEDRAY_DATA``'s file."""
    return _env_client().train(params, config)


def validate(params: Mapping[str, np.ndarray], config: dict) -> tuple[int, dict]:
    """Evaluate on the local validation split of ``FEDRAY_DATA``'s file."""
    return _env_client().validate(params, config)


def evaluate_arrays(params: Mapping[str, np.ndarray], X: np.ndarray,
                    y: np.ndarray) -> dict[str, float]:
    """Accuracy and loss of the model ``params`` on (X, y), computed by torch."""
    import torch

    net = model.build_model()
    set_arrays(net, params)
    net.eval()
    with torch.no_grad():
        return model.evaluate(net, model.dataset(X, y))
