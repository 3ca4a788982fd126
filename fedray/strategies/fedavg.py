"""FedAvg: the example-weighted mean of client models (McMahan et al., 2017).

Each combiner keeps one running sum of ``num_examples * update`` (one model's worth of
memory, whatever the number of clients); sums and weights add up across combiners, so the
controller's mean is the same at any number of tiers.

The sums are of the update's difference from the round's model, in float32, when the round
bounds how far an update may move the model (``session.max_update_norm_ratio``, on by
default: ``ShareStart.max_term``), else of the update itself in float64. Float32 halves
the memory of every partial and of the controller's reduce, and summing deltas keeps it
accurate: each float32 addition rounds by at most 2^-24 of the running sum, so a sum of
n weighted deltas is within (n - 1) x 2^-24 x sum_i w_i |d_i| of exact (per value; the
recursive-summation bound, Higham, *Accuracy and Stability of Numerical Algorithms*, 4.2),
plus 2 x 2^-24 for each term's own float32 difference and product, and the mean within
``delta_sum_error(n) x max_i |d_i|``: an error on the *step*, not on
the weights, far below the float32 rounding of the committed model for any step smaller
than the weights over n. Across k combiners, n counts every update and k - 1 more additions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedray.strategies.base import Strategy
from fedray.strategies.numeric import BLOCK, Model, add_scaled, fold_delta, fold_scaled
from fedray.strategies.updates import Accumulator, ShareStart, Update

# The largest weighted term float32 sums take: 10^8 of them stay under float32's 3.4e38.
MAX_TERM32 = 1e30


def delta_sum_error(n: int) -> float:
    """The relative error bound of a float32 sum of n weighted deltas (see the module)."""
    return (max(n - 1, 0) + 2) * 2.0**-24


@dataclass
class WeightedSums:
    """One share's (or the whole round's) sums: weights, not means, so reduce stays exact."""

    sums: Model
    weight: float = 0.0
    count: int = 0
    # The floating tensors' sums are of num_examples x (update - base), base the round's
    # model (float32 unless the model's own tensor is float64); else of num_examples x update.
    relative: bool = False


def sums_in_float32(share: ShareStart) -> bool:
    """Whether a share's floating sums can be float32 deltas: one base for every update
    and a bound that keeps every weighted term far from float32's overflow."""
    return (share.base_of is None and share.max_term is not None
            and share.max_term <= MAX_TERM32)


def sum_dtype(dtype: np.dtype, relative: bool) -> np.dtype:
    if relative and np.issubdtype(dtype, np.floating) and dtype.itemsize <= 4:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


class WeightedSum(Accumulator[WeightedSums]):
    """Running sum of ``weight * update`` (or of ``weight * (update - base)``)."""

    def __init__(self, share: ShareStart) -> None:
        relative = sums_in_float32(share)
        self._base = share.base
        self._partial = WeightedSums(
            {name: np.zeros(shape, sum_dtype(share.base[name].dtype, relative))
             for name, (_, shape) in share.spec.items()}, relative=relative)

    def weight_of(self, update: Update) -> float:
        return float(update.meta.num_examples)

    def fold(self, update: Update) -> None:
        weight = self.weight_of(update)
        if not weight > 0:
            raise ValueError("an update needs a positive weight")
        for name, acc in self._partial.sums.items():
            base = self._base[name]
            if self._partial.relative and np.issubdtype(base.dtype, np.floating):
                fold_delta(acc, update.model, name, base, weight)
            else:
                fold_scaled(acc, update.model, name, weight)
        self._partial.weight += weight
        self._partial.count += 1

    def partial(self) -> WeightedSums:
        return self._partial


def add_sums(partials: Sequence[WeightedSums]) -> WeightedSums:
    """Sums and weights of several shares added up (the first one's arrays are copied, in
    their own dtype: float32 delta sums stay float32)."""
    partials = [p for p in partials if p.count > 0]
    if not partials:
        raise ValueError("no partial carries an update")
    relative = partials[0].relative
    if any(p.relative != relative for p in partials):
        raise ValueError("partials of one round mix sums of deltas and sums of models")
    total = WeightedSums({k: np.array(v, copy=True) for k, v in partials[0].sums.items()},
                         relative=relative)
    for i, p in enumerate(partials):
        if i > 0:
            for name, value in p.sums.items():
                add_scaled(total.sums[name], value, 1.0)
        total.weight += p.weight
        total.count += p.count
    return total


def _mean_block(reference: np.ndarray, reduced: WeightedSums, name: str, start: int,
                stop: int) -> np.ndarray:
    """``sums / weight`` over ``[start, stop)`` of one tensor, as float64 model values."""
    block = reduced.sums[name].reshape(-1)[start:stop].astype(np.float64)
    block /= reduced.weight
    if reduced.relative and np.issubdtype(reference.dtype, np.floating):
        block += reference.reshape(-1)[start:stop]
    return block


def mean_step(reference: Mapping[str, np.ndarray], reduced: WeightedSums,
              name: str) -> np.ndarray:
    """The float64 mean minus ``reference`` for one floating tensor (what server optimizers
    step by): never through a float32 round trip, which would bias small steps."""
    if reduced.relative:
        return reduced.sums[name].astype(np.float64) / reduced.weight
    return reduced.sums[name] / reduced.weight - reference[name].astype(np.float64)


def weighted_mean(reference: Mapping[str, np.ndarray], reduced: WeightedSums) -> Model:
    """``sums / weight`` in ``reference``'s dtypes, without model-sized float64 temporaries."""
    if not reduced.weight > 0:
        raise ValueError("cannot average zero examples")
    out: Model = {}
    for name, ref in reference.items():
        size = reduced.sums[name].size
        mean = np.empty(size, dtype=ref.dtype)
        for start in range(0, size, BLOCK):
            block = _mean_block(ref, reduced, name, start, start + BLOCK)
            if np.issubdtype(ref.dtype, np.integer):
                block = np.rint(block)
            mean[start : start + BLOCK] = block
        out[name] = mean.reshape(ref.shape)
    return out


class FedAvg(Strategy[WeightedSums, WeightedSums]):
    name = "fedavg"

    def start(self, share: ShareStart) -> Accumulator[WeightedSums]:
        return WeightedSum(share)

    def reduce(self, partials: Sequence[WeightedSums]) -> WeightedSums:
        return add_sums(partials)

    def finish(self, global_model: Mapping[str, np.ndarray], reduced: WeightedSums) -> Model:
        return weighted_mean(global_model, reduced)
