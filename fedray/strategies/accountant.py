"""A Rényi-DP accountant for the (Poisson-subsampled) Gaussian mechanism.

Rényi differential privacy (Mironov 2017, "Rényi Differential Privacy") measures a
mechanism by its Rényi divergence ``ε(α)`` at every order ``α > 1``; it composes by
addition, so ``T`` rounds cost ``T · ε(α)`` at each order. Two mechanisms are covered:

- the Gaussian mechanism of sensitivity 1 and noise ``N(0, z²)``: ``ε(α) = α / (2 z²)``;
- the sampled Gaussian mechanism (SGM: each record is in the sample with probability
  ``q``, independently; noise as above). Mironov, Talwar and Zhang 2019 ("Rényi
  Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530, section 3)
  give ``ε(α) = log A_α / (α - 1)`` with
  ``A_α = E_{x~N(0,z²)}[((1-q) + q·e^{(2x-1)/(2z²)})^α]``: a finite binomial sum for
  integer ``α``, and for fractional ``α`` two convergent series, one on each side of
  ``x₀ = z² log(1/q - 1) + 1/2``, where the two terms of the mixture are equal.
  Everything is summed in log space (no overflow for tiny ``q``, small ``z`` or α = 256).

The accumulated RDP vector is turned into ``(ε, δ)``-DP with the conversion of Balle et
al. 2020 ("Hypothesis Testing Interpretations and Rényi Differential Privacy", Theorem 21)
which Canonne, Kamath and Steinke 2020 also state (Proposition 12), and which TF Privacy
and Opacus use::

    ε = min over α of  ε(α) + log((α-1)/α) - (log δ + log α) / (α - 1)

It is tighter than Mironov's original ``ε(α) + log(1/δ)/(α - 1)`` by up to
``log α / (α-1)``. The minimum is over a fixed grid of orders (``ORDERS``); a finer grid
can only lower ε.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

# 1.25 ... 256: fine steps where large budgets put the optimum, then integers, then a few
# large orders for small budgets (tiny q, many rounds).
ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0, 9.0,
    10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 18.0, 20.0, 22.0, 24.0, 26.0, 28.0, 30.0,
    32.0, 36.0, 40.0, 44.0, 48.0, 56.0, 64.0, 80.0, 96.0, 112.0, 128.0, 160.0, 192.0,
    224.0, 256.0,
)  # fmt: skip

_LOG_HALF = math.log(0.5)
_MAX_TERMS = 1_000_000  # a fractional-order series that has not converged by then is an error


def _log_add(a: float, b: float) -> float:
    """``log(e^a + e^b)``."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = (a, b) if a > b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


def _log_sum(terms: Sequence[float]) -> float:
    """``log(sum(e^t))`` over ``terms``, scaled by the largest."""
    top = max(terms)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(t - top) for t in terms))


def _log_erfc(x: float) -> float:
    """``log(erfc(x))``, accurate where ``erfc`` itself underflows (x > ~26)."""
    if x < 25.0:
        return math.log(math.erfc(x))
    # erfc(x) = e^{-x²}/(x√π) · (1 - 1/(2x²) + 3/(2x²)² - 15/(2x²)³ + 105/(2x²)⁴ - …)
    u = 1.0 / (2.0 * x * x)
    series = 1.0 - u * (1.0 - u * (3.0 - u * (15.0 - 105.0 * u)))
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)


def _log_binom(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_a_integer(q: float, z: float, alpha: int) -> float:
    """``log A_α`` for integer α: ``Σ_k C(α,k) q^k (1-q)^(α-k) e^{(k²-k)/(2z²)}``."""
    log_q, log_1q = math.log(q), math.log1p(-q)
    two_var = 2.0 * z * z
    return _log_sum([_log_binom(alpha, k) + k * log_q + (alpha - k) * log_1q
                     + (k * k - k) / two_var for k in range(alpha + 1)])


def _log_a_fractional(q: float, z: float, alpha: float) -> float:
    """``log A_α`` for fractional α, as ``A = Σ_k C(α,k) (T₀(k) + T₁(k))`` where, with
    ``j = α - k``, the part below ``x₀`` is
    ``T₀ = q^k (1-q)^j e^{(k²-k)/(2z²)} · ½ erfc((k - x₀)/(√2 z))`` and the part above it
    ``T₁ = q^j (1-q)^k e^{(j²-j)/(2z²)} · ½ erfc((x₀ - j)/(√2 z))``. The generalised
    binomial ``C(α,k)`` changes sign past ``k = α``; positive and negative terms are summed
    apart and subtracted once. Past ``k = α`` the terms alternate in sign and shrink
    (``|C(α,k)|`` falls, and ``T₀, T₁`` are expectations of a k-th power of a ratio below
    1), so the omitted tail is smaller than the first omitted term: the sum stops at a term
    30 nats below the total (``A_α ≥ 1``), an error under 1e-13 in ``log A_α``."""
    log_q, log_1q = math.log(q), math.log1p(-q)
    two_var = 2.0 * z * z
    x0 = z * z * (math.log(1.0 / q - 1.0)) + 0.5
    root2z = math.sqrt(2.0) * z
    positive, negative = -math.inf, -math.inf
    log_coef, sign = 0.0, 1.0  # log |C(α, 0)| and its sign
    for k in range(_MAX_TERMS):
        j = alpha - k
        t0 = (log_coef + k * log_q + j * log_1q + (k * k - k) / two_var
              + _LOG_HALF + _log_erfc((k - x0) / root2z))
        t1 = (log_coef + j * log_q + k * log_1q + (j * j - j) / two_var
              + _LOG_HALF + _log_erfc((x0 - j) / root2z))
        term = _log_add(t0, t1)
        if sign > 0:
            positive = _log_add(positive, term)
        else:
            negative = _log_add(negative, term)
        if k > alpha and term < max(positive, 0.0) - 30.0:
            break
        ratio = (alpha - k) / (k + 1)  # C(α, k+1) = C(α, k) · (α - k) / (k + 1)
        log_coef += math.log(abs(ratio))
        if ratio < 0:
            sign = -sign
    else:
        raise ArithmeticError(f"the RDP series at order {alpha} did not converge "
                              f"(q={q}, noise multiplier {z})")
    if negative >= positive:
        raise ArithmeticError(f"the RDP series at order {alpha} lost its precision "
                              f"(q={q}, noise multiplier {z})")
    if negative == -math.inf:
        return positive
    return positive + math.log1p(-math.exp(negative - positive))


@lru_cache(maxsize=4096)
def _sgm_rdp(q: float, z: float, alpha: float) -> float:
    if q == 0.0:
        return 0.0
    if z == 0.0:
        return math.inf
    if q == 1.0:
        return alpha / (2.0 * z * z)
    if float(alpha).is_integer():
        log_a = _log_a_integer(q, z, int(alpha))
    else:
        log_a = _log_a_fractional(q, z, alpha)
    return max(log_a, 0.0) / (alpha - 1.0)


def _check_orders(orders: Sequence[float]) -> np.ndarray:
    out = np.asarray(orders, dtype=np.float64).reshape(-1)
    if out.size == 0 or not np.all(np.isfinite(out)) or not np.all(out > 1.0):
        raise ValueError("RDP orders must be finite and greater than 1")
    return out


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP of one Gaussian mechanism (sensitivity 1, std ``noise_multiplier``): α / (2z²)."""
    return subsampled_gaussian_rdp(1.0, noise_multiplier, orders)


def subsampled_gaussian_rdp(q: float, noise_multiplier: float,
                            orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism, at each order."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"the sampling rate must be in [0, 1], got {q}")
    if not (noise_multiplier >= 0.0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"the noise multiplier must be finite and >= 0, got {noise_multiplier}")
    return np.array([_sgm_rdp(float(q), float(noise_multiplier), float(a))
                     for a in _check_orders(orders)])


def epsilon_from_rdp(rdp: Sequence[float], orders: Sequence[float],
                     delta: float) -> tuple[float, float]:
    """The smallest ε over ``orders`` such that the RDP curve gives (ε, δ)-DP, and the
    order that gives it (Balle et al. 2020, Theorem 21; see the module docstring)."""
    alphas = _check_orders(orders)
    values = np.asarray(rdp, dtype=np.float64).reshape(-1)
    if values.shape != alphas.shape:
        raise ValueError("one RDP value per order is needed")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    with np.errstate(invalid="ignore"):  # inf - inf where a mechanism has no privacy
        eps = values + np.log1p(-1.0 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1.0)
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(float(eps[best]), 0.0), float(alphas[best])


class RDPAccountant:
    """The running RDP of a sequence of (sampled) Gaussian mechanisms, one per round."""

    def __init__(self, orders: Sequence[float] = ORDERS) -> None:
        self.orders = _check_orders(orders)
        self.rdp = np.zeros_like(self.orders)
        self.steps = 0

    def step(self, q: float, noise_multiplier: float, steps: int = 1) -> None:
        """Compose ``steps`` rounds that each sample at rate ``q`` with this noise."""
        if steps < 0:
            raise ValueError("steps must be >= 0")
        self.rdp = self.rdp + steps * subsampled_gaussian_rdp(q, noise_multiplier, self.orders)
        self.steps += steps

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` after every step so far (0 when nothing was released)."""
        if not np.any(self.rdp > 0):  # the conversion over a finite grid would say ~0.02
            return 0.0
        return epsilon_from_rdp(self.rdp, self.orders, delta)[0]

    def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}orders": self.orders.copy(), f"{prefix}rdp": self.rdp.copy(),
                f"{prefix}steps": np.array([self.steps], dtype=np.int64)}

    def load_state_dict(self, state: Mapping[str, np.ndarray], prefix: str = "") -> None:
        """Restore ``state_dict``; an empty ``state`` resets to no steps at all."""
        if f"{prefix}rdp" not in state:
            self.rdp, self.steps = np.zeros_like(self.orders), 0
            return
        orders = np.asarray(state[f"{prefix}orders"], dtype=np.float64)
        if orders.shape != self.orders.shape or not np.array_equal(orders, self.orders):
            raise ValueError("the saved privacy ledger was kept over other RDP orders")
        self.rdp = np.array(state[f"{prefix}rdp"], dtype=np.float64).reshape(self.orders.shape)
        self.steps = int(np.asarray(state[f"{prefix}steps"]).reshape(-1)[0])
