"""A one-hidden-layer MLP for 8x8 digits, in pure numpy.

This file is part of the digits compute package, which is copied to edge machines and run
there by ``entrypoint.py``; it therefore depends on numpy only and on nothing in fedray.
The same functions serve the Python-callback client (``examples/digits/app.py``) and the
tests' FedAvg simulation, so every flavour trains exactly the same model.

Parameters are an ordered mapping of names to float32 arrays (the shape fedray ships
between server and clients): ``hidden.weight`` (64, H), ``hidden.bias`` (H,),
``out.weight`` (H, 10), ``out.bias`` (10,). Inputs are the 64 pixel values scaled to
[0, 1]. Inputs are never modified; ``train`` returns new arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

N_FEATURES = 64
N_CLASSES = 10
HIDDEN = 32
_NAMES = ("hidden.weight", "hidden.bias", "out.weight", "out.bias")

Params = dict[str, np.ndarray]

# Round settings and their defaults; a round's config may override any of them.
DEFAULT_SETTINGS: dict[str, float | int] = {"epochs": 5, "lr": 0.3, "batch_size": 32, "seed": 0,
                                             "mu": 0.0}


def round_settings(config: Mapping[str, object] | None) -> dict[str, float | int]:
    """The training settings in ``config`` (defaults filled in), checked and typed.

    Unknown keys are ignored: the runtime may put its own entries in a round's config.
    """
    config = config or {}
    out: dict[str, float | int] = {}
    for key, default in DEFAULT_SETTINGS.items():
        value = config.get(key, default)
        kind = type(default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"round setting {key!r} must be a number, got {value!r}")
        if kind is int and float(value) != int(value):
            raise ValueError(f"round setting {key!r} must be an integer, got {value!r}")
        out[key] = kind(value)
    if out["epochs"] < 0 or out["batch_size"] < 1 or not out["lr"] > 0 or out["mu"] < 0:
        raise ValueError(f"round settings out of range: {out}")
    return out


def init_model(seed: int = 0, hidden: int = HIDDEN) -> Params:
    """He-initialised weights and zero biases, all float32, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0.0, np.sqrt(2.0 / N_FEATURES), size=(N_FEATURES, hidden))
    w2 = rng.normal(0.0, np.sqrt(2.0 / hidden), size=(hidden, N_CLASSES))
    return {
        "hidden.weight": w1.astype(np.float32),
        "hidden.bias": np.zeros(hidden, dtype=np.float32),
        "out.weight": w2.astype(np.float32),
        "out.bias": np.zeros(N_CLASSES, dtype=np.float32),
    }


def _forward(params: Mapping[str, np.ndarray], X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hidden activations and class probabilities for a batch."""
    h = np.maximum(X @ params["hidden.weight"] + params["hidden.bias"], 0.0)
    logits = h @ params["out.weight"] + params["out.bias"]
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return h, exp / exp.sum(axis=1, keepdims=True)


def _loss(probs: np.ndarray, y: np.ndarray) -> float:
    picked = probs[np.arange(len(y)), y]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def train(
    params: Mapping[str, np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    epochs: int = 5,
    lr: float = 0.3,
    batch_size: int = 32,
    seed: int = 0,
    mu: float = 0.0,
) -> tuple[Params, dict[str, float]]:
    """Mini-batch SGD on cross-entropy; returns new parameters and training metrics.

    With ``mu > 0`` this is FedProx's local objective (Li et al., 2020): the loss plus
    ``mu / 2 * ||w - w_global||^2``, whose gradient ``mu * (w - w_global)`` pulls every
    step back towards the model the round started from (``params``).
    """
    if len(X) == 0:
        raise ValueError("cannot train on an empty dataset")
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    p = {name: np.array(params[name], dtype=np.float32, copy=True) for name in _NAMES}
    anchor = {name: p[name].copy() for name in _NAMES} if mu > 0 else None
    rng = np.random.default_rng(seed)
    n = len(X)
    for _ in range(int(epochs)):
        order = rng.permutation(n)
        for start in range(0, n, int(batch_size)):
            idx = order[start : start + int(batch_size)]
            xb, yb = X[idx], y[idx]
            h, probs = _forward(p, xb)
            grad_logits = probs
            grad_logits[np.arange(len(yb)), yb] -= 1.0
            grad_logits /= len(yb)
            grad_h = (grad_logits @ p["out.weight"].T) * (h > 0)
            grads = {"out.weight": h.T @ grad_logits, "out.bias": grad_logits.sum(axis=0),
                     "hidden.weight": xb.T @ grad_h, "hidden.bias": grad_h.sum(axis=0)}
            for name, grad in grads.items():
                if anchor is not None:
                    grad = grad + mu * (p[name] - anchor[name])  # the proximal term
                p[name] -= lr * grad
    metrics = evaluate(p, X, y)
    return p, {"loss": metrics["loss"], "accuracy": metrics["accuracy"]}


def evaluate(params: Mapping[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and mean cross-entropy on (X, y)."""
    if len(X) == 0:
        return {"accuracy": 0.0, "loss": 0.0}
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    _, probs = _forward(params, X)
    accuracy = float((probs.argmax(axis=1) == y).mean())
    return {"accuracy": accuracy, "loss": _loss(probs, y)}
