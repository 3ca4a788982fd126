"""The streaming aggregation protocol every strategy implements.

On a combiner: ``acc = aggregator.start(spec)``, then ``acc.fold(update, weight)`` once per
accepted update (the update can be dropped right after), then ``acc.partial()``. On the
controller: ``aggregator.reduce(partials)`` then ``aggregator.finish(global_model,
reduced)``. Memory is one accumulator per combiner, whatever the number of clients. No I/O,
no Ray, no gRPC here: strategies are pure and tested without a federation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

Model = dict[str, np.ndarray]
Spec = Mapping[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)

BLOCK = 1 << 20  # elements per in-place block: bounds temporaries to a few MiB


@dataclass
class Partial:
    """One combiner's contribution: weighted sums, not means, so reduce stays exact."""

    sums: Model
    weight: float = 0.0
    count: int = 0
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_weights: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Example-weighted means of the numeric metrics clients reported."""
        return {k: self.metric_sums[k] / w for k, w in self.metric_weights.items() if w > 0}


def add_scaled(acc: np.ndarray, value: np.ndarray, scale: float) -> None:
    """``acc += value * scale`` in blocks, so no full-size temporary is allocated."""
    a = acc.reshape(-1)
    v = value.reshape(-1)
    for start in range(0, a.size, BLOCK):
        block = v[start : start + BLOCK].astype(acc.dtype, copy=True)
        block *= scale
        a[start : start + BLOCK] += block


def fold_metrics(partial: Partial, metrics: Mapping[str, object], weight: float) -> None:
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        total = partial.metric_sums.get(key, 0.0) + float(value) * weight
        if not math.isfinite(total):  # a non-finite value, or a sum that overflowed
            continue
        partial.metric_sums[key] = total
        partial.metric_weights[key] = partial.metric_weights.get(key, 0.0) + weight


class Accumulator(ABC):
    @abstractmethod
    def fold(self, update: Mapping[str, np.ndarray], weight: float,
             metrics: Mapping[str, object] | None = None) -> None:
        """Add one checked update; ``weight`` is its number of examples."""

    @abstractmethod
    def partial(self) -> Partial:
        """What this combiner hands to the controller."""


class Aggregator(ABC):
    """A strategy: how updates combine and how the global model moves."""

    name: ClassVar[str]

    def __init__(self, **kwargs: object) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no options, got {sorted(kwargs)}")

    @abstractmethod
    def start(self, spec: Spec) -> Accumulator:
        """A fresh accumulator for one round on one combiner."""

    def reduce(self, partials: list[Partial]) -> Partial:
        """Combine partials from several combiners (sums add up; weights add up)."""
        partials = [p for p in partials if p.count > 0]
        if not partials:
            raise ValueError("no partial aggregate carries an update")
        total = Partial(sums={k: np.array(v, copy=True) for k, v in partials[0].sums.items()})
        for i, p in enumerate(partials):
            if i > 0:
                for name, value in p.sums.items():
                    add_scaled(total.sums[name], value, 1.0)
            total.weight += p.weight
            total.count += p.count
            for k, v in p.metric_sums.items():
                total.metric_sums[k] = total.metric_sums.get(k, 0.0) + v
            for k, v in p.metric_weights.items():
                total.metric_weights[k] = total.metric_weights.get(k, 0.0) + v
        return total

    @abstractmethod
    def finish(self, global_model: Mapping[str, np.ndarray], reduced: Partial) -> Model:
        """The next global model."""

    def state_dict(self) -> Model:
        """Server-side optimizer state to persist between rounds (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:  # noqa: B027
        """Restore what ``state_dict`` returned (no-op for stateless strategies)."""
