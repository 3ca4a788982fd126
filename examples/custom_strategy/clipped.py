"""ClippedFedAvg: FedAvg over clipped client deltas, with a decaying client learning rate.

A complete user strategy for fedray (docs/strategies.md walks through it). Name it in a
federation config and ship it with the job:

    session:
      aggregator: examples.custom_strategy.clipped:ClippedFedAvg
      aggregator_kwargs: {clip: 5.0, lr: 0.3, lr_decay: 0.9}

Each hook is one decision or one piece of math; none does I/O.

- ``configure``: the default selection, plus this round's client learning rate
  ``lr * lr_decay ** (round - 1)`` in the task config (the digits example reads ``lr``).
- ``accept``: refuse updates that report fewer than ``min_examples`` examples.
- ``start``/``fold``: on each combiner, a weighted sum of the deltas ``update - global``,
  each clipped to L2 norm ``clip`` first; it counts how many needed clipping.
- ``reduce``: sums add up across combiners, so the result is exact at any number of them.
- ``finish``: ``global + weighted mean of the clipped deltas``.
- ``state_dict``: the running mean of the fraction of clipped updates, saved with every
  commit and restored when the controller resumes; ``round_report`` puts the figures of
  each round into its tracking document (``fedray rounds`` shows them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedray.strategies import (
    Accumulator,
    RoundContext,
    RoundPlan,
    ShareStart,
    Strategy,
    Update,
    UpdateMeta,
    Verdict,
)
from fedray.strategies.numeric import delta_norm
from fedray.strategies.selection import plan_round


@dataclass
class ClippedSums:
    """One combiner's share: weighted sums of clipped deltas (they add up exactly)."""

    sums: dict[str, np.ndarray]
    weight: float = 0.0
    count: int = 0
    clipped: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class ClippedSum(Accumulator[ClippedSums]):
    def __init__(self, share: ShareStart, clip: float) -> None:
        self.base, self.clip = share.base, clip
        self.total = ClippedSums({name: np.zeros(shape, np.float64)
                                  for name, (_, shape) in share.spec.items()})

    def fold(self, update: Update) -> None:
        norm = update.meta.norm if update.meta.norm is not None \
            else delta_norm(update.model, self.base)
        scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
        weight = float(update.meta.num_examples)
        for name, acc in self.total.sums.items():
            delta = update.model[name].astype(np.float64) - self.base[name]
            acc += delta * (scale * weight)
        self.total.weight += weight
        self.total.count += 1
        self.total.clipped += int(scale < 1.0)

    def partial(self) -> ClippedSums:
        return self.total


class ClippedFedAvg(Strategy[ClippedSums, ClippedSums]):
    name = "clipped_fedavg"
    needs_norm = True  # the combiner computes each update's delta norm once, for fold

    def __init__(self, clip: float = 5.0, lr: float = 0.3, lr_decay: float = 1.0,
                 min_examples: int = 1) -> None:
        super().__init__()
        if not clip > 0 or not lr > 0 or not 0 < lr_decay <= 1 or min_examples < 1:
            raise ValueError("needs clip > 0, lr > 0, 0 < lr_decay <= 1, min_examples >= 1")
        self.clip, self.lr, self.lr_decay = float(clip), float(lr), float(lr_decay)
        self.min_examples = int(min_examples)
        self.clipped_mean = 0.0  # server state: running mean of the clipped fraction
        self.rounds_seen = 0
        self._last: dict[str, float] = {}

    def configure(self, ctx: RoundContext) -> RoundPlan:
        plan = plan_round(ctx)
        lr = self.lr * self.lr_decay ** (ctx.round - 1)
        return RoundPlan(clients=plan.clients, config={**plan.config, "lr": lr},
                         buffer=plan.buffer)

    def accept(self, meta: UpdateMeta) -> Verdict:
        if meta.num_examples < self.min_examples:
            return Verdict(False, "few_examples", f"{meta.num_examples} < {self.min_examples}")
        return Verdict(True)

    def start(self, share: ShareStart) -> Accumulator[ClippedSums]:
        return ClippedSum(share, self.clip)

    def reduce(self, partials: Sequence[ClippedSums]) -> ClippedSums:
        partials = [p for p in partials if p.count]
        if not partials:
            raise ValueError("no update arrived")
        total = ClippedSums({k: np.array(v, copy=True) for k, v in partials[0].sums.items()})
        for p in partials:
            if p is not partials[0]:
                for name, value in p.sums.items():
                    total.sums[name] += value
            total.weight += p.weight
            total.count += p.count
            total.clipped += p.clipped
        return total

    def finish(self, global_model: Mapping[str, np.ndarray], reduced: ClippedSums) -> dict:
        fraction = reduced.clipped / reduced.count
        self.rounds_seen += 1
        self.clipped_mean += (fraction - self.clipped_mean) / self.rounds_seen
        self._last = {"clipped_fraction": fraction, "clipped_mean": self.clipped_mean}
        out = {}
        for name, current in global_model.items():
            moved = current.astype(np.float64) + reduced.sums[name] / reduced.weight
            out[name] = (np.rint(moved) if np.issubdtype(current.dtype, np.integer)
                         else moved).astype(current.dtype)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"clipped_mean": np.array(self.clipped_mean),
                "rounds_seen": np.array(self.rounds_seen, dtype=np.int64)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.clipped_mean = float(state.get("clipped_mean", 0.0))
        self.rounds_seen = int(state.get("rounds_seen", 0))

    def round_report(self) -> dict[str, float]:
        return {k: v for k, v in self._last.items() if math.isfinite(v)}
