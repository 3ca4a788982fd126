"""FedBuff: buffered asynchronous aggregation (Nguyen et al., 2022).

Clients train continuously, each task on the newest committed version; combiners forward
every accepted update; the controller folds each one as it arrives and commits a new
model version every K updates (``session.buffer_size``, else half the clients taking
part)::

    version v+1 = v + server_lr * sum_i s(tau_i) n_i (x_i - base_i) / sum_i n_i

where ``base_i`` is the version update i was trained from, ``tau_i`` its staleness
(versions committed since then) and ``s`` the staleness weight: ``1/sqrt(1+tau)`` by
default, ``constant``, ``hinge`` (1 up to ``hinge_a``, then ``1/(b (tau - a) + 1)``), or a
``package.module:callable`` of tau. Both are the strategy's ``weigh`` decision: updates
staler than ``max_staleness`` are dropped (the controller says so in an event), the others
carry their weight in ``UpdateMeta.weight`` into the fold. With every update fresh and K clients this is FedAvg of the buffer. The
controller keeps the last ``max_staleness + 1`` versions to compute the differences; its
memory is one float64 model (the fold's sums), plus the next version in the model's own
dtypes while ``finish`` writes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedray.strategies.base import Strategy
from fedray.strategies.declaration import TRAIN, VALIDATE, Asynchronous, Declaration
from fedray.strategies.fedavg import WeightedSums, add_sums
from fedray.strategies.loading import load_object
from fedray.strategies.numeric import BLOCK, Model, fold_delta
from fedray.strategies.snapshots import ACCEPT, Staleness, UpdateMeta, Verdict
from fedray.strategies.updates import Accumulator, ShareStart, Update

PROBED = 1000  # the staleness weights checked when a FedBuff is made (0 ... this)

STALENESS = {
    "polynomial": lambda tau: 1.0 / math.sqrt(1.0 + tau),
    "constant": lambda tau: 1.0,
}


def staleness_function(name: str, hinge_a: float, hinge_b: float) -> Callable[[int], float]:
    if name in STALENESS:
        return STALENESS[name]
    if name == "hinge":
        return lambda tau: 1.0 if tau <= hinge_a else 1.0 / (hinge_b * (tau - hinge_a) + 1.0)
    if ":" in name:
        fn = load_object(name, "aggregator_kwargs.staleness")
        if not callable(fn):
            raise ValueError(f"staleness {name!r} is not callable")
        return fn
    raise ValueError(f"staleness must be polynomial, constant, hinge or module:callable, "
                     f"got {name!r}")


def _nonnegative(name: str, value: object) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def _integer(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.integer))


class StaleWeightedDeltas(Accumulator[WeightedSums]):
    """``sum s(tau) n (x - base)`` in float64, ``s(tau)`` being ``UpdateMeta.weight`` (the
    strategy's staleness decision); ``weight`` sums ``n`` (not ``s(tau) n``), so stale
    updates shrink the step instead of being renormalised away."""

    def __init__(self, share: ShareStart) -> None:
        self.share = share
        self._partial = WeightedSums({name: np.zeros(shape, np.float64)
                                      for name, (_, shape) in share.spec.items()})

    def fold(self, update: Update) -> None:
        meta = update.meta
        base = self.share.base_of(meta.base_version) if self.share.base_of else self.share.base
        scale = meta.weight * meta.num_examples
        for name, acc in self._partial.sums.items():
            fold_delta(acc, update.model, name, base[name], scale)
        self._partial.weight += meta.num_examples
        self._partial.count += 1

    def partial(self) -> WeightedSums:
        return self._partial


class FedBuff(Strategy[WeightedSums, WeightedSums]):
    name = "fedbuff"

    # The defaults, and K's, were chosen on the digits example (docs/strategies.md, "How
    # the defaults were chosen"; bench/fedbuff_vs_fedavg.py).
    def __init__(self, max_staleness: int = 10, staleness: str = "polynomial",
                 server_lr: float = 1.0, hinge_a: float = 10.0, hinge_b: float = 4.0) -> None:
        super().__init__()
        if int(max_staleness) != max_staleness or max_staleness < 0:
            raise ValueError("max_staleness must be a whole number >= 0")
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError("server_lr must be > 0 and finite")
        self.max_staleness = int(max_staleness)
        self.server_lr = float(server_lr)
        self.staleness = staleness
        self.hinge_a, self.hinge_b = _nonnegative("hinge_a", hinge_a), _nonnegative("hinge_b",
                                                                                    hinge_b)
        self._weight = staleness_function(staleness, self.hinge_a, self.hinge_b)
        self._probe()

    def _probe(self) -> None:
        """Every staleness an update may have must get a weight: refused at config load,
        not when the first stale update arrives mid-session."""
        for tau in range(min(self.max_staleness, PROBED) + 1):
            try:
                self.weight(tau)
            except Exception as exc:  # noqa: BLE001 - a user callable may raise anything
                raise ValueError(f"staleness {self.staleness!r} gives no usable weight at "
                                 f"staleness {tau}: {type(exc).__name__}: {exc}") from None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_weight"]  # a lambda or a user callable: rebuilt on arrival
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._weight = staleness_function(self.staleness, self.hinge_a, self.hinge_b)

    def weight(self, staleness: int) -> float:
        w = float(self._weight(int(staleness)))
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"staleness weight of {staleness} is {w}, not a finite number >= 0")
        return w

    def declare(self) -> Declaration:
        """Asynchronous serving: combiners forward every accepted update by reference
        (kept), and the runtime keeps the last ``max_staleness + 1`` versions."""
        return Declaration(stages=(TRAIN, VALIDATE), keeps_updates=True,
                           asynchronous=Asynchronous(self.max_staleness))

    def accept(self, meta: UpdateMeta) -> Verdict:
        """At the combiner: an update already too stale is not forwarded at all."""
        decision = self.weigh(meta)
        return Verdict(False, decision.drop, decision.detail) if decision.drop else ACCEPT

    def weigh(self, meta: UpdateMeta) -> Staleness:
        if meta.staleness > self.max_staleness:
            return Staleness.dropped("stale", f"staleness {meta.staleness} is over "
                                     f"max_staleness {self.max_staleness}")
        return Staleness(self.weight(meta.staleness))

    def start(self, share: ShareStart) -> Accumulator[WeightedSums]:
        return StaleWeightedDeltas(share)

    def reduce(self, partials: Sequence[WeightedSums]) -> WeightedSums:
        carrying = [p for p in partials if p.count > 0]
        if len(carrying) == 1:
            return carrying[0]  # the controller's own accumulator: no copy of it
        return add_sums(carrying)

    def finish(self, global_model: Mapping[str, np.ndarray], reduced: WeightedSums) -> Model:
        """``x + server_lr * sums / weight``, in blocks, straight into ``x``'s dtypes:
        beside the sums, only the new model and block-sized temporaries."""
        if not reduced.weight > 0:
            raise ValueError("cannot step over zero examples")
        scale = self.server_lr / reduced.weight
        out: Model = {}
        for name, current in global_model.items():
            sums, base = reduced.sums[name].reshape(-1), current.reshape(-1)
            new = np.empty(base.size, dtype=current.dtype)
            for start in range(0, base.size, BLOCK):
                block = sums[start : start + BLOCK] * scale
                block += base[start : start + BLOCK]
                new[start : start + BLOCK] = np.rint(block) if _integer(current) else block
            out[name] = new.reshape(current.shape)
        return out
