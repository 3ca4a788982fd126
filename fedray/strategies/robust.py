"""Robust aggregation: coordinate-wise median and trimmed mean, Krum, Multi-Krum, Bulyan.

These rules do not decompose across combiners, so they are ``KeptStrategy`` subclasses:
every combiner keeps each accepted update by handle (in Ray's object store) and the
controller's ``reduce`` sees all n updates of the round at once. The result is the rule
over all clients in one tier, whatever the number of combiners.

Memory. Updates may be read-only views of object-store memory, so they are never copied
all at once: each rule walks the flattened tensors in blocks and stacks only one block of
every update (an n x block float64 array, block = ``BLOCK // n`` elements, so a few MiB)
at a time. Krum and Bulyan first make one pass for the n x n matrix of squared distances.

Weights. Every rule is unweighted by examples: ``num_examples`` is reported by the client
itself, so a Byzantine client would claim the largest count the runtime allows and a
weighted rule would hand it the round. Each honest client counts once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from fedray.strategies.base import KeptStrategy
from fedray.strategies.declaration import Declaration
from fedray.strategies.numeric import BLOCK, Model
from fedray.strategies.snapshots import RoundContext, RoundPlan, UpdateMeta

Models = list[Mapping[str, np.ndarray]]


# ------------------------------------------------------------------ block-wise helpers


def _blocks(models: Models) -> Iterator[tuple[str, int, np.ndarray]]:
    """(tensor name, offset, the n x block float64 stack of that block of every model)."""
    n = len(models)
    step = max(1, BLOCK // n)
    for name, first in models[0].items():
        size = first.size
        for start in range(0, size, step):
            stop = min(size, start + step)
            stack = np.empty((n, stop - start), dtype=np.float64)
            for i, model in enumerate(models):
                stack[i] = model[name].reshape(-1)[start:stop]
            yield name, start, stack


def coordinatewise(models: Models, rule: Callable[[np.ndarray], np.ndarray]) -> Model:
    """``rule`` (n x block -> block, float64) applied to every block of every tensor."""
    out = {name: np.empty(value.size, dtype=np.float64) for name, value in models[0].items()}
    for name, start, stack in _blocks(models):
        out[name][start : start + stack.shape[1]] = rule(stack)
    return {name: flat.reshape(models[0][name].shape) for name, flat in out.items()}


def mean_of(models: Models, chosen: list[int]) -> Model:
    """The unweighted float64 mean of ``models[i]`` for ``i`` in ``chosen``."""
    out: Model = {}
    for name, first in models[0].items():
        total = np.zeros(first.size, dtype=np.float64)
        for i in chosen:
            flat = models[i][name].reshape(-1)
            for start in range(0, flat.size, BLOCK):
                total[start : start + BLOCK] += flat[start : start + BLOCK]
        out[name] = (total / len(chosen)).reshape(first.shape)
    return out


def squared_distances(models: Models) -> np.ndarray:
    """The n x n matrix of squared L2 distances between the flattened models.

    Per block, through the Gram matrix (one BLAS call) of the block centred on its
    coordinate-wise median: distances do not change under a shift, and centring keeps
    the subtraction ``|a|^2 + |b|^2 - 2 a.b`` exact enough even when one update is huge.
    """
    n = len(models)
    dist = np.zeros((n, n), dtype=np.float64)
    for _, _, stack in _blocks(models):
        stack -= np.median(stack, axis=0)
        norms = np.einsum("ij,ij->i", stack, stack)
        dist += norms[:, None] + norms[None, :] - 2.0 * (stack @ stack.T)
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_scores(dist: np.ndarray, candidates: list[int], neighbours: int) -> np.ndarray:
    """Each candidate's sum of squared distances to its ``neighbours`` nearest others
    among ``candidates`` (Blanchard et al., 2017)."""
    sub = dist[np.ix_(candidates, candidates)]
    nearest = np.sort(sub, axis=1)[:, 1 : neighbours + 1]  # column 0: the candidate itself
    return nearest.sum(axis=1)


def _whole(value: object, what: str, least: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) \
            or value < least:
        raise ValueError(f"{what} must be a whole number >= {least}, got {value!r}")
    return int(value)


class _NeedsUpdates(KeptStrategy):
    """A rule that needs at least ``needed()`` updates. It declares them
    (``Declaration.min_updates``): the runtime then waits for, asks and requires at least
    that many clients per round, even where ``session.min_clients`` is lower; a round whose
    eligible clients are still too few fails its attempt (and runs again), and the count is
    checked again before aggregating."""

    def needed(self) -> int:
        return 1

    def describe(self) -> str:
        return self.name

    def declare(self) -> Declaration:
        return Declaration(keeps_updates=True, min_updates=self.needed())

    def configure(self, ctx: RoundContext) -> RoundPlan:
        """A round with too few eligible clients may pass later (ValueError: the attempt
        fails and runs again)."""
        plan = super().configure(ctx)
        if plan.asked < self.needed():
            raise ValueError(f"{self.describe()} needs at least {self.needed()} updates per "
                             f"round; this attempt can ask only {plan.asked} client(s)")
        return plan

    def check_count(self, n: int) -> None:
        if n < self.needed():
            raise ValueError(f"{self.describe()} needs at least {self.needed()} updates, got {n}")


# ------------------------------------------------------------------ the strategies


class Median(KeptStrategy):
    """The coordinate-wise median of the round's models (Yin et al., 2018); for an even
    count, the mean of the two middle values."""

    name = "median"

    def aggregate(self, models: Models, metas: list[UpdateMeta]) -> Model:
        return coordinatewise(models, lambda s: np.median(s, axis=0, overwrite_input=True))


class TrimmedMean(KeptStrategy):
    """Coordinate-wise: drop the ``k = floor(beta * n)`` smallest and ``k`` largest values,
    average the rest (Yin et al., 2018). Resists ``f`` Byzantine clients when ``k >= f``."""

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.2) -> None:
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 0.5:
            raise ValueError(f"trimmed_mean needs 0 <= beta < 0.5, got {beta!r}")
        self.beta = float(beta)

    def aggregate(self, models: Models, metas: list[UpdateMeta]) -> Model:
        n = len(models)
        k = trim_count(self.beta, n)

        def trimmed(stack: np.ndarray) -> np.ndarray:
            stack.sort(axis=0)
            return stack[k : n - k].mean(axis=0)

        return coordinatewise(models, trimmed)


def trim_count(beta: float, n: int) -> int:
    """``floor(beta * n)``, robust to float error (0.29 * 100 is 28.999999999999996), and
    never so many that nothing is left to average."""
    return min(math.floor(beta * n + 1e-9), (n - 1) // 2)


class MultiKrum(_NeedsUpdates):
    """The unweighted mean of the ``m`` updates with the lowest Krum scores (El Mhamdi et
    al., 2018); a score is the sum of squared distances to the ``n - f - 2`` nearest other
    updates. Needs ``n >= 2f + 3``. ``m`` defaults to ``n - f``."""

    name = "multikrum"

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        super().__init__()
        self.f = _whole(f, f"{self.name} f")
        self.m = None if m is None else _whole(m, f"{self.name} m", least=1)

    def needed(self) -> int:
        return max(2 * self.f + 3, self.m or 0)

    def describe(self) -> str:
        m = f", m={self.m}" if self.m is not None and self.name == "multikrum" else ""
        return f"{self.name} with f={self.f}{m} (n >= 2f + 3)"

    def select(self, models: Models) -> list[int]:
        n = len(models)
        self.check_count(n)
        scores = krum_scores(squared_distances(models), list(range(n)), n - self.f - 2)
        keep = self.m if self.m is not None else n - self.f
        return sorted(np.argsort(scores, kind="stable")[:keep].tolist())

    def aggregate(self, models: Models, metas: list[UpdateMeta]) -> Model:
        return mean_of(models, self.select(models))


class Krum(MultiKrum):
    """The one update with the lowest Krum score (Blanchard et al., 2017): the one closest
    to its ``n - f - 2`` nearest neighbours. Needs ``n >= 2f + 3``."""

    name = "krum"

    def __init__(self, f: int = 1) -> None:
        super().__init__(f=f, m=1)


class Bulyan(_NeedsUpdates):
    """Bulyan (El Mhamdi et al., 2018) over Krum; needs ``n >= 4f + 3``.

    1. Select ``theta = n - 2f`` updates by Krum applied again and again to those not yet
       selected (each time with ``max(1, r - f - 2)`` neighbours among the ``r`` left).
    2. Coordinate-wise, average the ``beta = theta - 2f`` selected values closest to the
       selected values' median.
    """

    name = "bulyan"

    def __init__(self, f: int = 1) -> None:
        super().__init__()
        self.f = _whole(f, "bulyan f")

    def needed(self) -> int:
        return 4 * self.f + 3

    def describe(self) -> str:
        return f"bulyan with f={self.f} (n >= 4f + 3)"

    def select(self, models: Models) -> list[int]:
        n = len(models)
        self.check_count(n)
        dist = squared_distances(models)
        left, chosen = list(range(n)), []
        for _ in range(n - 2 * self.f):
            r = len(left)
            neighbours = min(r - 1, max(1, r - self.f - 2))
            best = left[int(np.argmin(krum_scores(dist, left, neighbours)))]
            chosen.append(best)
            left.remove(best)
        return sorted(chosen)

    def aggregate(self, models: Models, metas: list[UpdateMeta]) -> Model:
        selected = [models[i] for i in self.select(models)]
        beta = len(selected) - 2 * self.f

        def closest_to_median(stack: np.ndarray) -> np.ndarray:
            order = np.argsort(np.abs(stack - np.median(stack, axis=0)), axis=0, kind="stable")
            return np.take_along_axis(stack, order[:beta], axis=0).mean(axis=0)

        return coordinatewise(selected, closest_to_median)
