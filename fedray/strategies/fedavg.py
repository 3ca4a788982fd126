"""FedAvg: the example-weighted mean of client models (McMahan et al., 2017).

Each combiner keeps one float64 running sum of ``num_examples * update`` (one model's
worth of memory, whatever the number of clients); sums and weights add up across
combiners, so the controller's mean is exact at any number of tiers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedray.strategies.base import Strategy
from fedray.strategies.numeric import BLOCK, Model, Spec, add_scaled, fold_scaled
from fedray.strategies.updates import Accumulator, ShareStart, Update


@dataclass
class WeightedSums:
    """One share's (or the whole round's) sums: weights, not means, so reduce stays exact."""

    sums: Model
    weight: float = 0.0
    count: int = 0


class WeightedSum(Accumulator[WeightedSums]):
    """Running sum of ``weight * update`` in float64."""

    def __init__(self, spec: Spec) -> None:
        self._partial = WeightedSums({name: np.zeros(shape, np.float64)
                                      for name, (_, shape) in spec.items()})

    def weight_of(self, update: Update) -> float:
        return float(update.meta.num_examples)

    def fold(self, update: Update) -> None:
        weight = self.weight_of(update)
        if not weight > 0:
            raise ValueError("an update needs a positive weight")
        for name, acc in self._partial.sums.items():
            fold_scaled(acc, update.model, name, weight)
        self._partial.weight += weight
        self._partial.count += 1

    def partial(self) -> WeightedSums:
        return self._partial


def add_sums(partials: Sequence[WeightedSums]) -> WeightedSums:
    """Sums and weights of several shares added up (the first one's arrays are copied)."""
    partials = [p for p in partials if p.count > 0]
    if not partials:
        raise ValueError("no partial carries an update")
    total = WeightedSums({k: np.array(v, dtype=np.float64, copy=True)
                          for k, v in partials[0].sums.items()})
    for i, p in enumerate(partials):
        if i > 0:
            for name, value in p.sums.items():
                add_scaled(total.sums[name], value, 1.0)
        total.weight += p.weight
        total.count += p.count
    return total


def weighted_mean(reference: Mapping[str, np.ndarray], reduced: WeightedSums) -> Model:
    """``sums / weight`` in ``reference``'s dtypes, without model-sized float64 temporaries."""
    if not reduced.weight > 0:
        raise ValueError("cannot average zero examples")
    out: Model = {}
    for name, ref in reference.items():
        total = reduced.sums[name].reshape(-1)
        mean = np.empty(total.size, dtype=ref.dtype)
        for start in range(0, total.size, BLOCK):
            block = total[start : start + BLOCK] / reduced.weight
            if np.issubdtype(ref.dtype, np.integer):
                block = np.rint(block)
            mean[start : start + BLOCK] = block
        out[name] = mean.reshape(ref.shape)
    return out


class FedAvg(Strategy[WeightedSums, WeightedSums]):
    name = "fedavg"

    def start(self, share: ShareStart) -> Accumulator[WeightedSums]:
        return WeightedSum(share.spec)

    def reduce(self, partials: Sequence[WeightedSums]) -> WeightedSums:
        return add_sums(partials)

    def finish(self, global_model: Mapping[str, np.ndarray], reduced: WeightedSums) -> Model:
        return weighted_mean(global_model, reduced)
