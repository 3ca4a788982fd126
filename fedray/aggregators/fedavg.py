"""FedAvg: the example-weighted mean of client models (McMahan et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedray.aggregators.base import (
    BLOCK,
    Accumulator,
    Aggregator,
    Model,
    Partial,
    Spec,
    add_scaled,
    fold_metrics,
)


class WeightedSum(Accumulator):
    """Running sum of ``weight * update`` in float64, one model's worth of memory."""

    def __init__(self, spec: Spec) -> None:
        self._partial = Partial(sums={name: np.zeros(shape, np.float64) for name, (_, shape) in spec.items()})

    def fold(self, update: Mapping[str, np.ndarray], weight: float,
             metrics: Mapping[str, object] | None = None) -> None:
        if weight <= 0:
            raise ValueError("an update needs a positive weight")
        for name, acc in self._partial.sums.items():
            add_scaled(acc, update[name], float(weight))
        self._partial.weight += float(weight)
        self._partial.count += 1
        fold_metrics(self._partial, metrics or {}, float(weight))

    def partial(self) -> Partial:
        return self._partial


class FedAvg(Aggregator):
    name = "fedavg"

    def start(self, spec: Spec) -> Accumulator:
        return WeightedSum(spec)

    def finish(self, global_model: Mapping[str, np.ndarray], reduced: Partial) -> Model:
        if reduced.weight <= 0:
            raise ValueError("cannot average zero examples")
        out: Model = {}
        for name, reference in global_model.items():
            total = reduced.sums[name].reshape(-1)
            mean = np.empty(total.size, dtype=reference.dtype)
            for start in range(0, total.size, BLOCK):  # no model-sized float64 temporaries
                block = total[start : start + BLOCK] / reduced.weight
                if np.issubdtype(reference.dtype, np.integer):
                    block = np.rint(block)
                mean[start : start + BLOCK] = block
            out[name] = mean.reshape(reference.shape)
        return out
