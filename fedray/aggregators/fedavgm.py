"""FedAvgM: FedAvg with server momentum (Hsu et al., 2019).

The example-weighted mean of the clients' models gives a pseudo-gradient
``g = global - mean``; the server keeps a velocity ``v = momentum * v + g`` and moves
``global - server_lr * v``. The velocity is server-side state: it is saved with every
committed round and restored when a controller resumes, so a crash does not reset it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedray.aggregators.base import Model, Partial
from fedray.aggregators.fedavg import FedAvg


class FedAvgM(FedAvg):
    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        if server_lr <= 0 or not 0 <= momentum < 1:
            raise TypeError("fedavgm needs server_lr > 0 and 0 <= momentum < 1")
        self.server_lr = float(server_lr)
        self.momentum = float(momentum)
        self.velocity: Model = {}

    def finish(self, global_model: Mapping[str, np.ndarray], reduced: Partial) -> Model:
        mean = super().finish(global_model, reduced)
        out: Model = {}
        for name, current in global_model.items():
            if not np.issubdtype(current.dtype, np.floating):
                out[name] = mean[name]  # counters and the like are simply averaged
                continue
            step = current.astype(np.float64) - mean[name]
            velocity = self.velocity.get(name)
            velocity = step if velocity is None else self.momentum * velocity + step
            self.velocity[name] = velocity
            out[name] = (current - self.server_lr * velocity).astype(current.dtype)
        return out

    def state_dict(self) -> Model:
        return {f"velocity.{k}": v for k, v in self.velocity.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.velocity = {k.removeprefix("velocity."): np.array(v, dtype=np.float64)
                         for k, v in state.items() if k.startswith("velocity.")}
