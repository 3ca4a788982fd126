"""A small CNN for 8x8 digits in Keras 3, and the two functions a ``KerasClient`` runs.

Part of the digits-keras compute package, copied to edge machines and run there by
``entrypoint.py``; it needs keras, torch (the backend, unless ``KERAS_BACKEND`` says
otherwise), numpy and fedray. The Python app (``examples/digits_keras/app.py``) uses the
same functions, so both train exactly the same model.

The model mirrors the torch example: conv 3x3 (16) -> BatchNormalization -> ReLU -> conv
3x3 (32) -> BatchNormalization -> ReLU -> max-pool 2 -> dense (512 -> 10, softmax). Its
tensors, as fedray names them: ``conv2d/kernel``, ``batch_normalization/moving_mean``
(non-trainable), ``conv2d_1/kernel``, ``dense/bias``... Inputs are the 64 pixels scaled to
[0, 1], reshaped to (8, 8, 1). Round settings come from the round's config: ``epochs``
(5), ``lr`` (0.05), ``batch_size`` (32), ``seed`` (0); other keys are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

from fedray.frameworks.keras import KerasClient, get_arrays  # noqa: E402

DEFAULT_SETTINGS: dict[str, float | int] = {"epochs": 5, "lr": 0.05, "batch_size": 32, "seed": 0}
Data = tuple[np.ndarray, np.ndarray]


def build_model(seed: int = 0) -> keras.Model:
    """A fresh, built model whose initial weights depend only on ``seed``."""
    def init(i: int) -> keras.initializers.Initializer:
        return keras.initializers.HeNormal(seed=seed * 100 + i)

    return keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(16, 3, padding="same", kernel_initializer=init(1)),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.Conv2D(32, 3, padding="same", kernel_initializer=init(2)),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(10, activation="softmax", kernel_initializer=init(3)),
    ])


def seed_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    return get_arrays(build_model(seed))


def round_settings(config: Mapping[str, object] | None) -> dict[str, float | int]:
    """The round's training settings, defaults filled in, checked and typed."""
    out: dict[str, float | int] = {}
    for key, default in DEFAULT_SETTINGS.items():
        value = (config or {}).get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"round setting {key!r} must be a number, got {value!r}")
        if isinstance(default, int) and float(value) != int(value):
            raise ValueError(f"round setting {key!r} must be an integer, got {value!r}")
        out[key] = type(default)(value)
    if out["epochs"] < 0 or out["batch_size"] < 1 or not out["lr"] > 0:
        raise ValueError(f"round settings out of range: {out}")
    return out


def images(X: np.ndarray, y: np.ndarray) -> Data:
    """(n, 64) pixels and labels as (n, 8, 8, 1) images and int64 labels."""
    return (np.asarray(X, dtype=np.float32).reshape(-1, 8, 8, 1),
            np.asarray(y, dtype=np.int64))


def train_one_round(model: keras.Model, data: Data, config: dict) -> dict[str, float]:
    """``model.fit`` with SGD and momentum, compiled afresh each round (a new optimizer
    every round, as FedAvg assumes); one ``fit`` per epoch, in an order drawn from
    ``seed``."""
    settings = round_settings(config)
    model.compile(optimizer=keras.optimizers.SGD(float(settings["lr"]), momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = data
    rng = np.random.default_rng(int(settings["seed"]))  # the shuffling, without global seeds
    metrics = {"loss": 0.0, "accuracy": 0.0}
    for _ in range(int(settings["epochs"])):
        order = rng.permutation(len(y))
        history = model.fit(x[order], y[order], batch_size=int(settings["batch_size"]),
                            epochs=1, shuffle=False, verbose=0)
        metrics = {name: history.history[name][-1] for name in metrics}
    return metrics


def evaluate(model: keras.Model, data: Data) -> dict[str, float]:
    """Accuracy and mean cross-entropy, from one inference pass in numpy."""
    x, y = data
    if len(y) == 0:
        return {"accuracy": 0.0, "loss": 0.0}
    probs = keras.ops.convert_to_numpy(model(x, training=False)).astype(np.float64)
    picked = np.clip(probs[np.arange(len(y)), y], 1e-12, None)
    return {"accuracy": float((probs.argmax(axis=1) == y).mean()),
            "loss": float(-np.log(picked).mean())}


def make_client(data: str | Path) -> KerasClient:
    """A client on one ``.npz`` written by ``examples/digits/data.py`` (X, y, X_val, y_val);
    it validates on the local validation split, or on X, y when there is none."""
    with np.load(Path(data).expanduser(), allow_pickle=False) as f:
        arrays = {key: f[key] for key in f.files}
    if "X" not in arrays or "y" not in arrays:
        raise ValueError(f"data file {data} needs arrays 'X' and 'y'")
    has_val = len(arrays.get("y_val", ())) > 0
    val = images(arrays["X_val"], arrays["y_val"]) if has_val else None
    return KerasClient(build_model(), images(arrays["X"], arrays["y"]), train_one_round,
                       evaluate, val_data=val)
