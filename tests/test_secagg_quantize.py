"""Fixed point in Z_{2^32}: clipping, the headroom check, and the stated error bound."""

from __future__ import annotations

import numpy as np
import pytest

from fedray.errors import ConfigError
from fedray.strategies.secagg.quantize import ClipMode, Quantizer


def test_l2_clipping_bounds_the_norm_and_keeps_small_updates():
    q = Quantizer(clip=1.0, bits=16)
    big = np.full(100, 3.0, np.float32)
    assert np.linalg.norm(q.clipped(big)) == pytest.approx(1.0)
    small = np.full(4, 0.1, np.float32)
    assert np.array_equal(q.clipped(small), small.astype(np.float64))


def test_coordinate_clipping_clamps_each_value():
    q = Quantizer(clip=0.5, bits=8, mode="coordinate")
    assert q.mode is ClipMode.COORDINATE
    assert q.clipped(np.array([-2.0, 0.25, 9.0])).tolist() == [-0.5, 0.25, 0.5]


@pytest.mark.parametrize("bits, n, mode", [(16, 100, "l2"), (8, 30, "coordinate"),
                                           (20, 3, "coordinate"), (1, 10, "coordinate")])
def test_the_decoded_ring_sum_is_within_the_stated_bound(bits, n, mode):
    rng = np.random.default_rng(bits * n)
    q = Quantizer(clip=0.75, bits=bits, mode=mode)
    q.check_headroom(n)
    updates = [rng.normal(0, 0.5, 5000).astype(np.float32) for _ in range(n)]
    ring = np.zeros(5000, np.uint32)
    for u in updates:
        ring += q.encode(u)  # uint32 addition wraps: the ring's own arithmetic
    exact = sum(q.clipped(u) for u in updates)
    error = np.abs(q.decode_sum(ring, n) - exact).max()
    assert error <= q.error_bound(n) * (1 + 1e-9)
    assert error > q.error_bound(n) / 10  # the bound is not loose by orders of magnitude


def test_weights_multiply_and_decode():
    q = Quantizer(clip=1.0, bits=12, mode="coordinate")
    a, b = np.array([0.5, -0.25]), np.array([-1.0, 1.0])
    ring = q.encode(a, weight=3) + q.encode(b, weight=2)
    assert np.abs(q.decode_sum(ring, 5) - (3 * a + 2 * b)).max() <= q.error_bound(5)


def test_the_headroom_refuses_a_cohort_that_could_wrap():
    q = Quantizer(clip=1.0, bits=24)
    q.check_headroom(255)  # 255 * (2^24 - 1) < 2^32
    with pytest.raises(ConfigError, match="use at most 23 bits"):
        q.check_headroom(257)


def test_a_full_cohort_at_the_edge_of_the_headroom_sums_exactly():
    q = Quantizer(clip=1.0, bits=24, mode="coordinate")
    q.check_headroom(255)
    ring = sum((q.encode(np.ones(3)) for _ in range(255)), np.zeros(3, np.uint32))
    assert ring.tolist() == [255 * q.levels] * 3  # the largest sum, not wrapped


@pytest.mark.parametrize("kwargs", [{"clip": 0.0, "bits": 8}, {"clip": float("inf"), "bits": 8},
                                    {"clip": 1.0, "bits": 0}, {"clip": 1.0, "bits": 25},
                                    {"clip": 1.0, "bits": 8, "mode": "l1"}])
def test_bad_settings_name_the_option(kwargs):
    with pytest.raises(ConfigError, match="secagg"):
        Quantizer(**kwargs)


def test_non_finite_updates_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        Quantizer(clip=1.0, bits=8).encode(np.array([np.nan]))
