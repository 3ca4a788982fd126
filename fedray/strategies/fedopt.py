"""Server optimizers on FedAvg's pseudo-gradient: FedAvgM (Hsu et al., 2019) and friends.

The example-weighted mean of the clients' models gives ``delta = mean - global`` after
the reduce, so one combiner or four give the same step. The optimizer's state (momentum,
moments) is server-side: it is saved with every committed round and restored when a
controller resumes or a session continues from another one.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedray.strategies.base import Model
from fedray.strategies.fedavg import FedAvg, WeightedSums, weighted_mean


class ServerOptimizer(FedAvg):
    """FedAvg whose ``finish`` moves the global model by ``step(name, delta)``."""

    state_keys: tuple[str, ...] = ()  # attributes holding {tensor name: float64 array}

    def step(self, name: str, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def finish(self, global_model: Mapping[str, np.ndarray], reduced: WeightedSums) -> Model:
        mean = weighted_mean(global_model, reduced)
        out: Model = {}
        for name, current in global_model.items():
            if not np.issubdtype(current.dtype, np.floating):
                out[name] = mean[name]  # counters and the like are simply averaged
                continue
            # The float64 mean, not the cast one: a float32 round trip would bias small steps.
            delta = reduced.sums[name] / reduced.weight - current.astype(np.float64)
            out[name] = (current + self.step(name, delta)).astype(current.dtype)
        return out

    def state_dict(self) -> Model:
        return {f"{key}.{name}": value for key in self.state_keys
                for name, value in getattr(self, key).items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        for key in self.state_keys:
            setattr(self, key, {k.removeprefix(f"{key}."): np.array(v, dtype=np.float64)
                                for k, v in state.items() if k.startswith(f"{key}.")})


class FedAvgM(ServerOptimizer):
    """``v = momentum * v + (global - mean)``; the server moves ``global - server_lr * v``."""

    name = "fedavgm"
    state_keys = ("velocity",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        if not server_lr > 0 or not 0 <= momentum < 1:
            raise TypeError("fedavgm needs server_lr > 0 and 0 <= momentum < 1")
        self.server_lr = float(server_lr)
        self.momentum = float(momentum)
        self.velocity: Model = {}

    def step(self, name: str, delta: np.ndarray) -> np.ndarray:
        velocity = self.velocity.get(name)
        velocity = -delta if velocity is None else self.momentum * velocity - delta
        self.velocity[name] = velocity
        return -self.server_lr * velocity
