"""A small CNN for 8x8 digits in PyTorch, and the two functions a ``TorchClient`` runs.

Part of the digits-torch compute package, copied to edge machines and run there by
``entrypoint.py``; it needs torch, numpy and fedray (for ``fedray.frameworks.torch``).
The Python app (``examples/digits_torch/app.py``) uses the same functions, so both train
exactly the same model.

The model: conv 3x3 (16) -> BatchNorm -> ReLU -> conv 3x3 (32) -> BatchNorm -> ReLU ->
max-pool 2 -> linear (512 -> 10), about 10k parameters. Its tensors, as fedray sees them,
are the state_dict: ``conv1.weight``, ``bn1.running_mean``, ``bn1.num_batches_tracked``
(int64)... Inputs are the 64 pixels scaled to [0, 1], reshaped to (1, 8, 8). Round
settings come from the round's config: ``epochs`` (5), ``lr`` (0.05), ``batch_size``
(32), ``seed`` (0); other keys are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedray.frameworks.torch import TorchClient, get_arrays

DEFAULT_SETTINGS: dict[str, float | int] = {"epochs": 5, "lr": 0.05, "batch_size": 32, "seed": 0}


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


def build_model(seed: int = 0) -> DigitsCNN:
    """A fresh model whose initial weights depend only on ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DigitsCNN()


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


def dataset(X: np.ndarray, y: np.ndarray) -> TensorDataset:
    """(n, 64) pixels and labels as a dataset of (1, 8, 8) images."""
    images = torch.from_numpy(np.asarray(X, dtype=np.float32).reshape(-1, 1, 8, 8).copy())
    return TensorDataset(images, torch.from_numpy(np.asarray(y, dtype=np.int64).copy()))


def train_one_round(model: nn.Module, data: TensorDataset, config: dict) -> dict[str, float]:
    """Local SGD with momentum (a fresh optimizer every round, as FedAvg assumes)."""
    settings = round_settings(config)
    loader = DataLoader(data, batch_size=int(settings["batch_size"]), shuffle=True,
                        generator=torch.Generator().manual_seed(int(settings["seed"])))
    optimizer = torch.optim.SGD(model.parameters(), lr=float(settings["lr"]), momentum=0.9)
    loss_sum, correct, seen = 0.0, 0, 0
    for _ in range(int(settings["epochs"])):
        loss_sum, correct, seen = 0.0, 0, 0  # metrics of the last epoch
        for xb, yb in loader:
            optimizer.zero_grad()
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1)}


def evaluate(model: nn.Module, data: TensorDataset) -> dict[str, float]:
    """Accuracy and mean cross-entropy (the client runs it in eval mode, without grad)."""
    images, labels = data.tensors
    if len(labels) == 0:
        return {"accuracy": 0.0, "loss": 0.0}
    logits = model(images)
    return {"accuracy": float((logits.argmax(1) == labels).float().mean()),
            "loss": float(nn.functional.cross_entropy(logits, labels))}


def make_client(data: str | Path) -> TorchClient:
    """A client on one ``.npz`` written by ``examples/digits/data.py`` (X, y, X_val, y_val);
    it validates on the local validation split, or on X, y when there is none."""
    with np.load(Path(data).expanduser(), allow_pickle=False) as f:
        arrays = {key: f[key] for key in f.files}
    if "X" not in arrays or "y" not in arrays:
        raise ValueError(f"data file {data} needs arrays 'X' and 'y'")
    train = dataset(arrays["X"], arrays["y"])
    has_val = len(arrays.get("y_val", ())) > 0
    val = dataset(arrays["X_val"], arrays["y_val"]) if has_val else None
    return TorchClient(build_model(), train, train_one_round, evaluate, val_data=val)
