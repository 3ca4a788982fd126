"""Pairwise seeds agree and are bound to round and pair; masks cancel; envelopes are
end to end (a relay cannot read or change them)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedray.errors import SecAggError
from fedray.strategies.secagg import keys, masks

ROUND = b"session-1/round-3"


def test_both_sides_of_a_pair_derive_the_same_seed():
    a, b = keys.KeyPair.generate(), keys.KeyPair.generate()
    assert keys.pair_seed(a.private, b.public, ROUND, 4, 9) == \
        keys.pair_seed(b.private, a.public, ROUND, 9, 4)
    assert keys.public_of(a.private) == a.public


def test_seeds_differ_by_round_pair_and_purpose():
    a, b = keys.KeyPair.generate(), keys.KeyPair.generate()
    seeds = {keys.pair_seed(a.private, b.public, ROUND, 1, 2),
             keys.pair_seed(a.private, b.public, b"session-1/round-4", 1, 2),
             keys.pair_seed(a.private, b.public, ROUND, 1, 3),
             keys.channel_key(a.private, b.public, ROUND, 1, 2)}
    assert len(seeds) == 4


def test_a_low_order_public_key_is_refused():
    with pytest.raises(SecAggError) as info:
        keys.pair_seed(keys.KeyPair.generate().private, bytes(32), ROUND, 1, 2)
    assert info.value.reason == "bad_key"


def test_the_prg_is_deterministic_and_differs_by_seed():
    assert np.array_equal(masks.prg(b"s" * 32, 1000), masks.prg(b"s" * 32, 1000))
    assert not np.array_equal(masks.prg(b"s" * 32, 1000), masks.prg(b"t" * 32, 1000))
    assert masks.prg(b"s" * 32, 10).tolist() == masks.prg(b"s" * 32, 1000)[:10].tolist()


def test_the_prg_looks_uniform():
    values = masks.prg(bytes(range(32)), 1 << 18)
    counts = np.bincount(values.view(np.uint8), minlength=256)
    expected = values.nbytes / 256
    assert ((counts - expected) ** 2 / expected).sum() < 360  # chi-square, 255 dof


def test_the_prg_fills_a_million_values_fast():
    out = np.empty(1_000_000, np.uint32)
    masks.prg(b"k" * 32, out.size, out)  # warm
    started = time.perf_counter()
    for _ in range(10):
        masks.prg(b"k" * 32, out.size, out)
    seconds = (time.perf_counter() - started) / 10
    print(f"\nPRG: 1M uint32 in {seconds * 1e3:.2f} ms ({4 / seconds:.0f} MB/s)")
    assert seconds < 0.05  # ~1.5 ms here; 30x slack for a loaded machine


def test_pairwise_masks_cancel_in_a_sum():
    n, size = 5, 777
    pairs = {i: keys.KeyPair.generate() for i in range(1, n + 1)}
    values = {i: np.full(size, i, np.uint32) for i in pairs}
    selfs = {i: bytes([i]) * 32 for i in pairs}
    total = np.zeros(size, np.uint32)
    for i, kp in pairs.items():
        seeds = {j: keys.pair_seed(kp.private, other.public, ROUND, i, j)
                 for j, other in pairs.items() if j != i}
        total += masks.masked(values[i], i, selfs[i], seeds)
    for seed in selfs.values():
        masks.apply(total, seed, -1)
    assert total.tolist() == [sum(pairs)] * size


def test_the_sign_of_a_pair():
    assert (masks.sign(1, 2), masks.sign(2, 1)) == (1, -1)
    with pytest.raises(ValueError):
        masks.sign(3, 3)


def _channel():
    a, b = keys.KeyPair.generate(), keys.KeyPair.generate()
    return keys.channel_key(a.private, b.public, ROUND, 1, 2), \
        keys.channel_key(b.private, a.public, ROUND, 2, 1)


def test_an_envelope_opens_for_its_receiver():
    mine, theirs = _channel()
    assert mine == theirs
    sealed = keys.seal(mine, ROUND, 1, 2, b"a share")
    assert b"a share" not in sealed
    assert keys.unseal(theirs, ROUND, 1, 2, sealed) == b"a share"


@pytest.mark.parametrize("change", [
    lambda s, r, a, b: (bytes([s[0] ^ 1]) + s[1:], r, a, b),  # the nonce
    lambda s, r, a, b: (s[:-1] + bytes([s[-1] ^ 1]), r, a, b),  # the tag
    lambda s, r, a, b: (s[:20] + bytes([s[20] ^ 1]) + s[21:], r, a, b),  # the ciphertext
    lambda s, r, a, b: (s, b"session-1/round-4", a, b),  # replayed in another round
    lambda s, r, a, b: (s, r, b, a),  # presented as sent the other way
    lambda s, r, a, b: (s[:5], r, a, b),  # cut short
])
def test_a_changed_envelope_is_detected(change):
    key, _ = _channel()
    sealed = keys.seal(key, ROUND, 1, 2, b"a share of a seed")
    with pytest.raises(SecAggError) as info:
        _unseal(key, *change(sealed, ROUND, 1, 2))
    assert info.value.reason == "tampered"


def _unseal(key, sealed, round_id, sender, receiver):
    return keys.unseal(key, round_id, sender, receiver, sealed)
