"""Shamir sharing: any t shares reconstruct, t - 1 say nothing, bad shares are refused."""

from __future__ import annotations

import collections
import itertools
import os
import random

import pytest

from fedray.errors import SecAggError
from fedray.strategies.secagg.shamir import FIELD, PrimeField, Share, reconstruct, split

SMALL = PrimeField(257, 1)  # one byte of secret per element: small enough to enumerate


@pytest.mark.parametrize("length", [1, 15, 16, 32, 45, 100])
def test_any_t_of_n_shares_reconstruct(length):
    secret = os.urandom(length)
    shares = split(secret, 3, [1, 2, 5, 9, 17])
    for subset in itertools.combinations(shares.values(), 3):
        assert reconstruct(subset, 3) == secret
    assert reconstruct(list(shares.values()), 3) == secret  # more than t: fine


def test_shares_cross_the_wire_as_bytes():
    secret = os.urandom(32)
    shares = split(secret, 2, [3, 4])
    wire = [s.to_bytes() for s in shares.values()]
    assert all(len(w) == 4 + 3 * 16 for w in wire)
    assert reconstruct([Share.from_bytes(w) for w in wire], 2) == secret


def test_t_minus_1_shares_leave_every_secret_possible():
    """For a fixed set of t - 1 shares, every candidate secret has exactly one polynomial
    of degree t - 1 through them: each candidate is equally consistent."""
    t, points = 3, [1, 2]
    held = split(b"\x2a", t, [1, 2, 3], SMALL)
    known = [held[x] for x in points]
    p = SMALL.prime
    for candidate in range(256):
        # the polynomial through (0, candidate) and the held points, evaluated at 3
        fitted = [Share(0, (candidate,), 1), *known]
        third = sum(s.ys[0] * _basis(fitted, j, 3, p) for j, s in enumerate(fitted)) % p
        rebuilt = reconstruct([*known, Share(3, (third,), 1)], t, SMALL)
        assert rebuilt == bytes([candidate])


def _basis(shares, j, at, p):
    num, den = 1, 1
    for m, s in enumerate(shares):
        if m != j:
            num = num * (at - s.x) % p
            den = den * (shares[j].x - s.x) % p
    return num * pow(den, -1, p) % p


def test_t_minus_1_shares_are_distributed_alike_whatever_the_secret():
    """Drawn many times, the share at one point is uniform for a secret of 0 and of 255
    (a fixed or secret-derived coefficient would skew it): chi-square over 257 cells."""
    trials = 20_000
    for secret in (b"\x00", b"\xff"):
        counts = collections.Counter(split(secret, 2, [1, 2], SMALL)[1].ys[0]
                                     for _ in range(trials))
        expected = trials / SMALL.prime
        chi2 = sum((counts.get(v, 0) - expected) ** 2 / expected for v in range(SMALL.prime))
        assert chi2 < 360, (secret, chi2)  # 256 degrees of freedom: p ~ 1e-5 to exceed


def test_too_few_shares_are_refused():
    shares = list(split(os.urandom(32), 4, range(1, 8)).values())
    with pytest.raises(SecAggError) as info:
        reconstruct(shares[:3], 4)
    assert info.value.reason == "too_few_shares"


def test_too_few_shares_give_a_wrong_secret_not_the_right_one():
    """Interpolating t - 1 shares as if the threshold were t - 1 gives garbage."""
    secret = os.urandom(32)
    shares = list(split(secret, 4, range(1, 8)).values())
    try:
        guess = reconstruct(shares[:3], 3)
    except SecAggError:
        guess = None  # the interpolated value did not even fit the secret's size
    assert guess != secret


def test_duplicates_are_refused():
    shares = list(split(os.urandom(32), 3, [1, 2, 3]).values())
    with pytest.raises(SecAggError) as info:
        reconstruct([shares[0], shares[1], shares[1]], 3)
    assert info.value.reason == "duplicate_share"


@pytest.mark.parametrize("bad", [
    lambda s: Share(s.x, s.ys[:-1], s.length),  # a chunk missing
    lambda s: Share(s.x, (FIELD.prime, *s.ys[1:]), s.length),  # not a field element
    lambda s: Share(s.x, s.ys, s.length + 1),  # of another secret's length
    lambda s: Share(0, s.ys, s.length),  # the secret's own point
])
def test_malformed_shares_are_refused(bad):
    shares = list(split(os.urandom(32), 2, [1, 2]).values())
    with pytest.raises(SecAggError) as info:
        reconstruct([shares[0], bad(shares[1])], 2)
    assert info.value.reason == "malformed_share"


def test_truncated_bytes_are_refused():
    wire = split(os.urandom(32), 2, [1, 2])[1].to_bytes()
    with pytest.raises(SecAggError) as info:
        Share.from_bytes(wire[:-3])
    assert info.value.reason == "malformed_share"


@pytest.mark.parametrize("threshold, points", [(0, [1, 2]), (3, [1, 2]), (2, [1, 1]),
                                               (2, [0, 1]), (2, [1, 1 << 16])])
def test_bad_split_arguments_are_refused(threshold, points):
    with pytest.raises(ValueError):
        split(b"secret", threshold, points)


def test_a_random_subset_reconstructs_at_scale():
    secret = os.urandom(32)
    shares = split(secret, 40, range(1, 101))
    assert reconstruct(random.sample(list(shares.values()), 40), 40) == secret
