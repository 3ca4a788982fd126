"""The masks: a seed expanded into a uint32 vector, added or taken away in Z_{2^32}.

The PRG is ChaCha20's keystream under the 32-byte seed (nonce zero: each seed is drawn
or derived for one stream only), written by one call straight into the vector's buffer.
A pair's mask is added by the lower index and taken away by the higher, so it cancels
in any sum that holds both; the self-mask is added by its client and taken away by the
controller once survivors reveal its seed's shares.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_NONCE = bytes(16)


def prg(seed: bytes, length: int, out: np.ndarray | None = None) -> np.ndarray:
    """``length`` pseudorandom uint32 values from ``seed`` (into ``out`` when given)."""
    if out is None:
        out = np.empty(length, np.uint32)
    elif out.dtype != np.uint32 or out.size != length or not out.flags.c_contiguous:
        raise ValueError("out must be a contiguous uint32 vector of the mask's length")
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    stream.update_into(np.zeros(4 * length, np.uint8), memoryview(out).cast("B"))
    return out


def sign(me: int, peer: int) -> int:
    """+1 for the lower index of a pair, -1 for the higher: their masks cancel."""
    if me == peer:
        raise ValueError("a client has no pairwise mask with itself")
    return 1 if me < peer else -1


def apply(acc: np.ndarray, seed: bytes, direction: int, scratch: np.ndarray | None = None,
          ) -> None:
    """``acc += direction * prg(seed)`` in place, modulo 2^32 (``direction`` is +1 or -1)."""
    mask = prg(seed, acc.size, scratch)
    if direction == 1:
        np.add(acc, mask, out=acc)
    elif direction == -1:
        np.subtract(acc, mask, out=acc)
    else:
        raise ValueError(f"direction is +1 or -1, got {direction!r}")


def masked(values: np.ndarray, me: int, self_seed: bytes, pair_seeds: Mapping[int, bytes],
           ) -> np.ndarray:
    """``values`` (uint32) plus the self-mask and every pairwise mask, signed by index."""
    out = np.array(values, np.uint32, copy=True).reshape(-1)
    scratch = np.empty(out.size, np.uint32)
    apply(out, self_seed, 1, scratch)
    for peer, seed in pair_seeds.items():
        apply(out, seed, sign(me, peer), scratch)
    return out
