"""Differentially private FedAvg: server-side clipping, central Gaussian noise, RDP ledger.

``dp_fixed`` (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models") and ``dp_adaptive`` (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping"), as Flower's server-side DP wrappers do them, split over our tiers:

- ``configure`` (controller) samples the round with ``plan_round`` and sends the round's
  clipping norm ``C`` to the combiners in ``RoundPlan.params``;
- each combiner's accumulator clips every update's delta ``u - base`` (L2 over all
  floating tensors) to norm ``C`` and adds the clipped deltas into one float64 sum (and
  counts the updates that needed no clipping);
- ``reduce`` adds the sums; ``finish`` adds Gaussian noise of std ``z·C`` to the sum,
  once, divides by ``m``, the number of clients asked, and steps the accountant.

The noise is drawn once, on the whole round's sum, so one combiner or ten give the same
guarantee. Weights are uniform: with example weights a client could claim a huge
``num_examples`` and own the mean, and the sum's sensitivity would no longer be ``C``.
The denominator is the number of clients *asked*, a figure fixed before any update
arrives; dividing by the accepted count would let a client's presence change the divisor
as well as the sum (a non-answer simply contributes a zero delta). Integer tensors are
neither clipped nor noised, so they keep the global model's values.

The privacy model, the accounting and its limits are in docs/privacy.md.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from fedray.config import SessionConfig
from fedray.errors import ConfigError
from fedray.strategies.accountant import RDPAccountant
from fedray.strategies.base import Strategy
from fedray.strategies.declaration import Declaration, NormCheck, UpdateLayout
from fedray.strategies.numeric import BLOCK, Model, add_scaled, delta_norm, fold_delta
from fedray.strategies.selection import eligible, plan_round
from fedray.strategies.snapshots import RoundContext, RoundPlan
from fedray.strategies.updates import Accumulator, ShareStart, Update

CLIPPING_NORM = "dp.clipping_norm"  # the RoundPlan.params key combiners clip with


@dataclass
class ClippedSums:
    """Sum of clipped deltas (floating tensors only), how many, and how many were within C."""

    sums: Model
    clipping_norm: float
    count: int = 0
    unclipped: int = 0


class ClippedSum(Accumulator[ClippedSums]):
    """Clips each delta to ``clipping_norm`` and adds it to a float64 running sum."""

    def __init__(self, share: ShareStart, clipping_norm: float) -> None:
        self.base = share.base
        self._partial = ClippedSums({name: np.zeros(shape, np.float64)
                                     for name, (_, shape) in share.spec.items()
                                     if _floating(share.base[name])}, clipping_norm)

    def fold(self, update: Update) -> None:
        norm = update.meta.norm  # the intake computed it against this base (NormCheck.ALWAYS)
        if norm is None:
            norm = delta_norm(update.model, self.base)
        if not math.isfinite(norm):
            raise ValueError("the update's norm is not finite")
        c = self._partial.clipping_norm
        scale = 1.0 if norm <= c else c / norm
        for name, acc in self._partial.sums.items():
            fold_delta(acc, update.model, name, self.base[name], scale)
        self._partial.count += 1
        self._partial.unclipped += int(norm <= c)

    def partial(self) -> ClippedSums:
        return self._partial


@dataclass(frozen=True)
class _Round:
    """What ``configure`` decided, for ``finish``: the round, its sample and its rate."""

    number: int
    attempt: int
    asked: int
    q: float


def _floating(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def _positive(name: str, value: object, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        raise ValueError(f"{name} must be {'>= 0' if zero else '> 0'} and finite, got {value!r}")
    return number


class DPFedAvgFixed(Strategy[ClippedSums, ClippedSums]):
    """FedAvg over deltas clipped to a fixed norm, with central Gaussian noise.

    Options: ``noise_multiplier`` z (noise std z·C on the sum; 0 turns the noise off and
    ε is infinite), ``clipping_norm`` C, ``delta`` (the δ that ε is reported at),
    ``sampling_amplification`` (account each round at rate asked/eligible; false: at rate
    1, for observers who know who was asked), ``seed`` (tests only: reproducible noise
    and sampling; by default both come from the OS's entropy).
    """

    name = "dp_fixed"
    adaptive: ClassVar[bool] = False
    # No defaults (docs/privacy.md, "No defaults"): z is the privacy decision itself and
    # C depends on the model's scale. These are docs/privacy.md's measured digits values.
    option_examples: ClassVar[Mapping[str, object]] = {"noise_multiplier": 1.0,
                                                       "clipping_norm": 1.0}

    def declare(self) -> Declaration:
        """Train then validate, like FedAvg; the intake computes every update's
        ``||update - base||`` (``NormCheck.ALWAYS``) and the fold clips with it."""
        return Declaration(layout=UpdateLayout(norm=NormCheck.ALWAYS))

    def __init__(self, noise_multiplier: float, clipping_norm: float, delta: float = 1e-5,
                 sampling_amplification: bool = True, seed: int | None = None) -> None:
        super().__init__()
        self._setup(noise_multiplier, ("clipping_norm", clipping_norm), delta,
                    sampling_amplification, seed)

    def _setup(self, noise_multiplier: object, clipping_norm: tuple[str, object], delta: object,
               sampling_amplification: object, seed: object) -> None:
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier, zero=True)
        self.initial_clipping_norm = _positive(*clipping_norm)
        self.delta = _positive("delta", delta)
        if not self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not isinstance(sampling_amplification, bool):
            raise TypeError("sampling_amplification must be true or false")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or seed < 0):
            raise TypeError(f"seed must be an integer >= 0, got {seed!r}")
        self.sampling_amplification = sampling_amplification
        self.seed = seed
        self.clipping_norm = self.initial_clipping_norm
        self.accountant = RDPAccountant()
        self._round: _Round | None = None
        self._report: dict[str, float] = {}

    # ------------------------------------------------------------------ decisions

    def configure(self, ctx: RoundContext) -> RoundPlan:
        if self.seed is None:  # who is asked must stay secret for the sampling to amplify
            ctx = replace(ctx, seed=secrets.randbits(63))
        plan = plan_round(ctx)
        pool = len(eligible(ctx.online, ctx.settings.select))
        sampled = not ctx.settings.select.policy and self.sampling_amplification
        q = min(1.0, plan.asked / pool) if sampled and pool else 1.0
        self.check_round(plan.asked)
        self._round = _Round(ctx.round, ctx.attempt, plan.asked, q)
        return replace(plan, params={**plan.params, CLIPPING_NORM: self.clipping_norm})

    def check_round(self, asked: int) -> None:
        """Refuse a round whose sample cannot carry this strategy's noise."""

    # ------------------------------------------------------------------ math

    def start(self, share: ShareStart) -> Accumulator[ClippedSums]:
        norm = share.params.get(CLIPPING_NORM)
        if norm is None:
            if self.adaptive:  # the combiner's copy never adapts: the round must say it
                raise ValueError(f"{self.name} needs {CLIPPING_NORM} in the round's params")
            norm = self.clipping_norm
        return ClippedSum(share, _positive(CLIPPING_NORM, norm))

    def reduce(self, partials: Sequence[ClippedSums]) -> ClippedSums:
        partials = [p for p in partials if p.count > 0]
        if not partials:
            raise ValueError("no partial carries an update")
        if len({p.clipping_norm for p in partials}) != 1:
            raise ValueError("combiners clipped with different norms")
        first = partials[0]
        total = ClippedSums({k: np.array(v, dtype=np.float64, copy=True)
                             for k, v in first.sums.items()}, first.clipping_norm)
        for p in partials:
            if p is not first:
                for name, value in p.sums.items():
                    add_scaled(total.sums[name], value, 1.0)
            total.count += p.count
            total.unclipped += p.unclipped
        return total

    def sum_noise_multiplier(self, asked: int) -> float:
        """The multiplier of the noise on the sum (all of z here; less when adaptive)."""
        return self.noise_multiplier

    def finish(self, global_model: Mapping[str, np.ndarray], reduced: ClippedSums) -> Model:
        if not math.isclose(reduced.clipping_norm, self.clipping_norm, rel_tol=1e-12):
            raise ValueError(f"the updates were clipped to {reduced.clipping_norm:g}, "
                             f"not to this round's {self.clipping_norm:g}")
        # Without configure (pure tests), the accepted updates are the sample and q is 1.
        r = self._round or _Round(0, 0, reduced.count, 1.0)
        m = max(r.asked, reduced.count)
        c = self.clipping_norm
        rng = np.random.default_rng(None if self.seed is None else [self.seed, r.number,
                                                                    r.attempt])
        std = self.sum_noise_multiplier(m) * c
        out: Model = {}
        for name, current in global_model.items():
            if not _floating(current):
                out[name] = np.array(current, copy=True)
                continue
            total = reduced.sums[name].reshape(-1)
            base = current.reshape(-1)
            new = np.empty(total.size, dtype=current.dtype)
            for start in range(0, total.size, BLOCK):
                block = total[start : start + BLOCK].copy()
                if std > 0:
                    block += rng.normal(0.0, std, block.size)
                block /= m
                block += base[start : start + BLOCK]
                new[start : start + BLOCK] = block
            out[name] = new.reshape(current.shape)
        self._report = {"clipping_norm": c, "noise_multiplier": self.noise_multiplier,
                        "noise_std": std / m, "sampling_rate": r.q, "clients_sampled": m}
        self.adapt(reduced, m, rng)
        self.accountant.step(r.q, self.noise_multiplier)
        self._report.update(epsilon=self.accountant.epsilon(self.delta), delta=self.delta,
                            dp_rounds=self.accountant.steps)
        return out

    def adapt(self, reduced: ClippedSums, asked: int, rng: np.random.Generator) -> None:
        """Move the clipping norm after a round (it stays put here)."""

    # ------------------------------------------------------------------ server state

    def state_dict(self) -> Model:
        state = self.accountant.state_dict("dp.")
        if self.adaptive:  # a fixed norm is configuration: the session's kwargs say it
            state["dp.clipping_norm"] = np.array([self.clipping_norm], dtype=np.float64)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """The ledger (and adaptive clipping norm) as of a commit; nothing: a fresh start."""
        self.accountant.load_state_dict(state, "dp.")
        norm = state.get("dp.clipping_norm") if self.adaptive else None
        self.clipping_norm = (self.initial_clipping_norm if norm is None
                              else _positive("dp.clipping_norm",
                                             float(np.asarray(norm).reshape(-1)[0])))

    def round_report(self) -> dict[str, float]:
        return dict(self._report)


class DPFedAvgAdaptive(DPFedAvgFixed):
    """DP-FedAvg whose clipping norm follows a quantile of the update norms (Andrew et al.).

    Each round, ``b`` = number of updates within C, plus noise N(0, σ_b²); then
    ``C ← C · exp(-clip_norm_lr · (b/m - target_unclipped_quantile))``. The count is
    private too: with ``noise_multiplier`` z the sum gets ``z_Δ = (z⁻² - (2σ_b)⁻²)^(-1/2)``,
    so that the two releases together cost what one Gaussian with multiplier z costs
    (Andrew et al., section 3.1), and the accountant charges z. Options as ``dp_fixed``,
    plus ``initial_clipping_norm`` (0.1), ``target_unclipped_quantile`` (0.5),
    ``clip_norm_lr`` (0.2), ``clipped_count_stddev`` σ_b (default m/20, m the clients
    asked; it must exceed z/2).
    """

    name = "dp_adaptive"
    adaptive = True
    # z = 0.5 fits the default count noise m/20 from m = 6 clients asked (it needs m > 10z)
    option_examples: ClassVar[Mapping[str, object]] = {"noise_multiplier": 0.5}

    def __init__(self, noise_multiplier: float, initial_clipping_norm: float = 0.1,
                 target_unclipped_quantile: float = 0.5, clip_norm_lr: float = 0.2,
                 clipped_count_stddev: float | None = None, delta: float = 1e-5,
                 sampling_amplification: bool = True, seed: int | None = None) -> None:
        Strategy.__init__(self)
        self._setup(noise_multiplier, ("initial_clipping_norm", initial_clipping_norm), delta,
                    sampling_amplification, seed)
        self.target_unclipped_quantile = _positive("target_unclipped_quantile",
                                                   target_unclipped_quantile, zero=True)
        if self.target_unclipped_quantile > 1:
            raise ValueError("target_unclipped_quantile must be in [0, 1]")
        self.clip_norm_lr = _positive("clip_norm_lr", clip_norm_lr)
        self.clipped_count_stddev = (None if clipped_count_stddev is None else
                                     _positive("clipped_count_stddev", clipped_count_stddev,
                                               zero=True))
        sigma_b = self.clipped_count_stddev
        z = self.noise_multiplier
        if sigma_b is not None and z > 0 and not 2 * sigma_b > z:
            raise ValueError("clipped_count_stddev must exceed noise_multiplier / 2: the "
                             "clipped count is released too, and shares the privacy budget")

    def count_stddev(self, asked: int) -> float:
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return asked / 20 if self.noise_multiplier > 0 else 0.0

    def _count_noise_problem(self, asked: int) -> str:
        """Why ``asked`` clients cannot carry this noise split ("" if they can): the sum's
        multiplier ``(z⁻² − (2σ_b)⁻²)^(−1/2)`` needs ``2σ_b > z``."""
        z, sigma_b = self.noise_multiplier, self.count_stddev(asked)
        if z == 0 or 2 * sigma_b > z:
            return ""
        default = "" if self.clipped_count_stddev is not None else f" (m/20, m = {asked})"
        return (f"dp_adaptive: clipped_count_stddev {sigma_b:g}{default} must exceed "
                f"noise_multiplier / 2 = {z / 2:g}; set clipped_count_stddev (or lower "
                "noise_multiplier) in session.aggregator_kwargs, or ask more clients per round")

    def check_settings(self, settings: SessionConfig) -> None:
        """A count of clients per round whose m/20 can never carry z is refused now."""
        if settings.clients_per_round <= 1 or settings.select.policy:
            return  # a fraction (or a policy): m depends on who is online
        most = math.ceil(max(int(settings.clients_per_round), settings.min_clients)
                         * (1 + settings.over_select))
        problem = self._count_noise_problem(most)
        if problem:
            raise ValueError(problem)

    def check_round(self, asked: int) -> None:
        problem = self._count_noise_problem(asked) if asked else ""
        if problem:
            raise ConfigError(problem)

    def sum_noise_multiplier(self, asked: int) -> float:
        z = self.noise_multiplier
        if z == 0:
            return 0.0
        problem = self._count_noise_problem(asked)
        if problem:  # the formula would divide by zero or turn complex
            raise ValueError(problem)
        return (z ** -2 - (2 * self.count_stddev(asked)) ** -2) ** -0.5

    def adapt(self, reduced: ClippedSums, asked: int, rng: np.random.Generator) -> None:
        sigma_b = self.count_stddev(asked)
        noisy = reduced.unclipped + (rng.normal(0.0, sigma_b) if sigma_b > 0 else 0.0)
        fraction = noisy / asked
        self.clipping_norm *= math.exp(-self.clip_norm_lr
                                       * (fraction - self.target_unclipped_quantile))
        self._report.update(unclipped_fraction=fraction, next_clipping_norm=self.clipping_norm,
                            count_stddev=sigma_b)
