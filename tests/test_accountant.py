"""The RDP accountant (pure) against published values, numerical integration and its own laws.

Expected values come from the test suites of TF Privacy
(tensorflow_privacy/privacy/analysis/rdp_accountant_test.py) and Opacus
(opacus/tests/accountants_test.py, opacus/accountants/analysis/rdp.py's docstring); each
test names its source.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedray.strategies.accountant import (
    ORDERS,
    RDPAccountant,
    epsilon_from_rdp,
    gaussian_rdp,
    subsampled_gaussian_rdp,
)

# Opacus's RDPAccountant.DEFAULT_ALPHAS: its published epsilons are minima over these.
OPACUS_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
# The orders of TF Privacy's test_check_composition.
TF_ORDERS = [1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0, 16.0,
             20.0, 24.0, 28.0, 32.0, 64.0, 256.0]


def test_gaussian_without_sampling_is_the_closed_form():
    # Mironov 2017, Proposition 7: alpha / (2 sigma^2). TF Privacy test_compute_rdp_no_sampling:
    # compute_rdp(q=1, noise_multiplier=10, steps=1, orders=20) == 0.1.
    assert subsampled_gaussian_rdp(1.0, 10.0, [20])[0] == pytest.approx(0.1, rel=1e-15)
    orders = np.array(ORDERS)
    np.testing.assert_allclose(gaussian_rdp(0.7, orders), orders / (2 * 0.7**2), rtol=1e-15)


def test_no_sampling_costs_nothing_and_no_noise_costs_everything():
    # TF Privacy test_compute_rdp_no_data: q = 0 gives 0.
    assert subsampled_gaussian_rdp(0.0, 10.0, [20])[0] == 0.0
    assert np.isinf(subsampled_gaussian_rdp(0.5, 0.0)).all()
    assert epsilon_from_rdp(subsampled_gaussian_rdp(0.5, 0.0), ORDERS, 1e-5)[0] == math.inf


def test_subsampled_rdp_at_one_order_matches_tf_privacy():
    # TF Privacy test_compute_rdp_scalar: compute_rdp(0.1, 2, 10, 5) == 0.07737 (5 places).
    assert 10 * subsampled_gaussian_rdp(0.1, 2.0, [5])[0] == pytest.approx(0.07737, abs=5e-6)


def test_subsampled_rdp_at_fractional_and_large_orders_matches_tf_privacy():
    # TF Privacy test_compute_rdp_sequence: compute_rdp(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100])
    # == [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307] to within 1e-5.
    rdp = 50 * subsampled_gaussian_rdp(0.01, 2.5, [1.5, 2.5, 5, 50, 100])
    np.testing.assert_allclose(rdp, [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307],
                               atol=1e-5)


def test_epsilon_of_dp_sgd_matches_opacus():
    # Opacus accountants_test.py test_rdp_accountant: q=0.04, sigma=1.5, int(90/0.04) steps,
    # delta=1e-5 -> epsilon 7.32911117143 (assertAlmostEqual: 7 places), over DEFAULT_ALPHAS,
    # with the conversion of Balle et al. 2020, Theorem 21.
    accountant = RDPAccountant(OPACUS_ALPHAS)
    accountant.step(0.04, 1.5, steps=int(90 / 0.04))
    assert accountant.epsilon(1e-5) == pytest.approx(7.32911117143, abs=5e-8)


def test_heterogeneous_composition_matches_opacus_docstring():
    # Opacus opacus/accountants/analysis/rdp.py docstring: steps (q, sigma, T) = (1e-5, 1.0, 10)
    # and (1e-4, 3.0, 4), orders 2..32, delta 1e-5 -> (epsilon, order) = (0.336, 23).
    orders = list(range(2, 33))
    accountant = RDPAccountant(orders)
    accountant.step(1e-5, 1.0, steps=10)
    accountant.step(1e-4, 3.0, steps=4)
    eps, order = epsilon_from_rdp(accountant.rdp, orders, 1e-5)
    assert round(eps, 3) == 0.336 and order == 23


def test_composition_matches_tf_privacy_under_mironovs_conversion_and_ours_is_tighter():
    # TF Privacy test_check_composition: 40000 steps at (q=1e-4, sigma=0.4) then 100 at
    # (q=0.1, sigma=2) over TF_ORDERS give epsilon 8.509656 at order 2.5 for delta 1e-5 with
    # Mironov 2017's conversion eps = rdp + log(1/delta)/(alpha-1); the tighter conversion must
    # stay below it.
    accountant = RDPAccountant(TF_ORDERS)
    accountant.step(1e-4, 0.4, steps=40000)
    accountant.step(0.1, 2.0, steps=100)
    mironov = accountant.rdp + math.log(1 / 1e-5) / (np.array(TF_ORDERS) - 1)
    assert mironov.min() == pytest.approx(8.509656, abs=1e-6)
    assert TF_ORDERS[int(mironov.argmin())] == 2.5
    assert accountant.epsilon(1e-5) < 8.509656


def test_no_rdp_conversion_beats_the_exact_gaussian_and_ours_comes_close():
    # TF Privacy test_get_privacy_spent_check_target_delta: sigma 4.530877117 gives exactly
    # (1, 1e-6)-DP (the analytic Gaussian of Balle & Wang 2018), so epsilon from RDP is >= 1;
    # over a fine grid of orders it must also be close to 1.
    orders = [0.001 * i for i in range(1001, 100000, 7)]
    eps, _ = epsilon_from_rdp(gaussian_rdp(4.530877117, orders), orders, 1e-6)
    assert 1.0 - 1e-9 <= eps < 1.0 + 1e-4


def _log_a_by_quadrature(q: float, sigma: float, alpha: float) -> float:
    """log E_{x~N(0,s^2)}[((1-q) + q e^{(2x-1)/(2s^2)})^alpha], by the trapezoid rule in logs."""
    x = np.linspace(-20 * sigma, alpha + 20 * sigma, 400_001)
    log_pdf = -x**2 / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * sigma**2))
    log_f = log_pdf + alpha * log_ratio
    top = log_f.max()
    return float(top + math.log(np.trapezoid(np.exp(log_f - top), x)))


@pytest.mark.parametrize(("q", "sigma", "alpha"), [
    (1e-4, 1.0, 1.5),  # from TF Privacy's test_compute_log_a_equals_mp parameters
    (0.01, 10.0, 20.0),
    (0.1, 100.0, 20.5),
    (0.5, 10.0, 1.25),  # the slowest series: mixture halves equal at x0 = 1/2
    (0.3, 1.0, 2.75),
    (0.9, 2.0, 7.5),
    (0.05, 0.8, 32.0),
])
def test_rdp_equals_the_renyi_divergence_computed_by_quadrature(q, sigma, alpha):
    expected = _log_a_by_quadrature(q, sigma, alpha) / (alpha - 1)
    got = subsampled_gaussian_rdp(q, sigma, [alpha])[0]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize(("q", "sigma"), [(1e-9, 0.1), (1e-6, 0.5), (0.01, 0.3), (0.2, 0.05),
                                          (0.999, 50.0), (0.5, 1.0)])
def test_extreme_parameters_stay_finite_and_rdp_grows_with_the_order(q, sigma):
    rdp = subsampled_gaussian_rdp(q, sigma)
    assert np.isfinite(rdp).all() and (rdp >= 0).all()
    # Rényi divergences do not decrease with the order (float noise aside).
    assert (np.diff(rdp) >= -1e-12 * np.maximum(rdp[1:], 1e-300)).all()
    # ... nor with the sampling rate, up to no sampling at all.
    assert (subsampled_gaussian_rdp(min(1.0, 2 * q), sigma) >= rdp - 1e-15).all()
    assert (gaussian_rdp(sigma) >= rdp - 1e-12 * rdp).all()


def test_steps_compose_by_addition_and_the_ledger_round_trips():
    one = RDPAccountant()
    one.step(0.1, 1.1)
    many = RDPAccountant()
    for _ in range(5):
        many.step(0.1, 1.1)
    np.testing.assert_allclose(many.rdp, 5 * one.rdp, rtol=1e-12)
    assert many.steps == 5 and many.epsilon(1e-5) > one.epsilon(1e-5)
    restored = RDPAccountant()
    restored.load_state_dict(many.state_dict("dp."), "dp.")
    assert restored.steps == 5 and restored.epsilon(1e-5) == many.epsilon(1e-5)
    restored.load_state_dict({}, "dp.")
    assert restored.steps == 0 and restored.epsilon(1e-5) == 0.0
    with pytest.raises(ValueError, match="other RDP orders"):
        RDPAccountant([2, 3]).load_state_dict(many.state_dict())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        subsampled_gaussian_rdp(1.5, 1.0)
    with pytest.raises(ValueError):
        subsampled_gaussian_rdp(0.5, -1.0)
    with pytest.raises(ValueError):
        RDPAccountant([1.0, 2.0])
    with pytest.raises(ValueError):
        epsilon_from_rdp([0.1], [2.0], 0.0)
