"""The cheap first norm check: never below the exact distance, so it only ever spares the
exact computation for updates that pass anyway."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedray.strategies.numeric import SUM_BLOCK, delta_norm, l2_norm, norm_upper_bound


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e15])
def test_the_bound_is_never_below_the_exact_distance(scale):
    rng = np.random.default_rng(7)
    for size in (1, 5, SUM_BLOCK - 1, SUM_BLOCK + 3, 3 * SUM_BLOCK):
        base = {"w": (rng.standard_normal(size) * scale).astype(np.float32),
                "d": rng.standard_normal(7),  # float64 tensors count too
                "i": np.arange(4)}  # integer tensors do not
        model = {k: v + (rng.standard_normal(v.shape) * scale).astype(v.dtype)
                 if v.dtype.kind == "f" else v for k, v in base.items()}
        exact = delta_norm(model, base)
        bound = norm_upper_bound(model, l2_norm(base)[0])
        assert exact <= bound <= l2_norm(model)[0] * 1.01 + l2_norm(base)[0] * 1.01


def test_equal_positive_float32_squares_summed_in_float32_stay_under_the_bound():
    # The worst case for a float32 sum: many equal terms, each rounding the same way.
    model = {"w": np.full(3 * SUM_BLOCK, 1.0 + 2.0**-12, np.float32)}
    exact = math.sqrt(float(np.sum(model["w"].astype(np.float64) ** 2)))
    assert norm_upper_bound(model, 0.0) >= exact


def test_a_sum_that_overflows_float32_says_inf_and_leaves_it_to_the_exact_norm():
    model = {"w": np.full(16, np.finfo(np.float32).max, np.float32)}
    assert norm_upper_bound(model, 0.0) == math.inf
    assert math.isfinite(delta_norm(model, {"w": np.zeros(16, np.float32)}))
