"""Shamir t-of-n sharing of byte secrets (seeds, private keys) over a prime field.

A secret is cut into chunks that fit below the field's prime; each chunk is the constant
term of its own random polynomial of degree ``t - 1``, and a share is the values of all
of them at one point ``x`` (a client's index, never 0). Any ``t`` shares give the
secret back by Lagrange interpolation at 0; ``t - 1`` shares are consistent with every
possible secret, each with the same number of polynomials, so they say nothing about it
(information-theoretic, not computational). The default field is GF(2^127 - 1): a
32-byte secret is three 15-byte chunks, and a share of it 4 + 3 * 16 bytes on the wire.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from fedray.errors import SecAggError

MAX_X = (1 << 16) - 1  # a share's point is a client's index in its round


@dataclass(frozen=True, slots=True)
class PrimeField:
    """GF(prime), and how many whole bytes of a secret one element holds."""

    prime: int
    chunk_bytes: int

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1 or 1 << (8 * self.chunk_bytes) > self.prime:
            raise ValueError(f"{self.chunk_bytes}-byte chunks do not fit below {self.prime}")

    @property
    def element_bytes(self) -> int:
        return (self.prime.bit_length() + 7) // 8


FIELD = PrimeField((1 << 127) - 1, 15)  # a Mersenne prime: 15 bytes of secret an element


@dataclass(frozen=True, slots=True)
class Share:
    """The values at ``x`` of the polynomials that hide a ``length``-byte secret."""

    x: int
    ys: tuple[int, ...]
    length: int

    def to_bytes(self, field: PrimeField = FIELD) -> bytes:
        size = field.element_bytes
        return (self.x.to_bytes(2, "big") + self.length.to_bytes(2, "big")
                + b"".join(y.to_bytes(size, "big") for y in self.ys))

    @classmethod
    def from_bytes(cls, data: bytes, field: PrimeField = FIELD) -> Share:
        size = field.element_bytes
        if len(data) < 4 or (len(data) - 4) % size:
            raise SecAggError("malformed_share", f"a share of {len(data)} bytes is not "
                              f"4 + a multiple of {size}: it was cut or is not a share")
        x, length = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:4], "big")
        ys = tuple(int.from_bytes(data[at : at + size], "big") for at in range(4, len(data), size))
        return cls(x, ys, length)


def _chunks(secret: bytes, field: PrimeField) -> list[int]:
    step = field.chunk_bytes
    return [int.from_bytes(secret[at : at + step], "big") for at in range(0, len(secret), step)]


def split(secret: bytes, threshold: int, points: Sequence[int],
          field: PrimeField = FIELD) -> dict[int, Share]:
    """Shares of ``secret``, one at each of ``points`` (distinct, in 1..65535 and below the
    prime); any ``threshold`` of them reconstruct it."""
    if not secret or len(secret) > 0xFFFF:
        raise ValueError("a shared secret has 1..65535 bytes")
    xs = list(points)
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in 1..{len(xs)} (the shares made)")
    if len(set(xs)) != len(xs) or any(not 0 < x < min(field.prime, MAX_X + 1) for x in xs):
        raise ValueError("share points must be distinct, nonzero and below the prime")
    p = field.prime
    polys = [[c] + [secrets.randbelow(p) for _ in range(threshold - 1)]
             for c in _chunks(secret, field)]
    shares = {}
    for x in xs:
        ys = []
        for coefficients in polys:
            y = 0
            for c in reversed(coefficients):  # Horner
                y = (y * x + c) % p
            ys.append(y)
        shares[x] = Share(x, tuple(ys), len(secret))
    return shares


def _check(shares: Sequence[Share], threshold: int, field: PrimeField) -> None:
    if len(shares) < threshold:
        raise SecAggError("too_few_shares", f"{len(shares)} shares, {threshold} needed: wait "
                          "for more survivors' replies, or the secret stays hidden")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise SecAggError("duplicate_share", f"two shares at the same point among {sorted(xs)}"
                          ": a share is counted once (a replay, or a relay's mistake)")
    first = shares[0]
    chunks = -(-first.length // field.chunk_bytes)
    for s in shares:
        if s.length != first.length or len(s.ys) != chunks or not 0 < s.x < field.prime \
                or any(not 0 <= y < field.prime for y in s.ys):
            raise SecAggError("malformed_share", f"the share at {s.x} is not one of a "
                              f"{first.length}-byte secret in this field")


def reconstruct(shares: Sequence[Share], threshold: int, field: PrimeField = FIELD) -> bytes:
    """The secret from at least ``threshold`` shares (the first ``threshold`` are used)."""
    shares = list(shares)
    _check(shares, threshold, field)
    used = shares[:threshold]
    p = field.prime
    weights = []
    for j, sj in enumerate(used):  # Lagrange basis polynomials at 0
        num, den = 1, 1
        for m, sm in enumerate(used):
            if m != j:
                num = num * sm.x % p
                den = den * (sm.x - sj.x) % p
        weights.append(num * pow(den, -1, p) % p)
    length, step = used[0].length, field.chunk_bytes
    out = bytearray()
    for i in range(len(used[0].ys)):
        value = sum(w * s.ys[i] for w, s in zip(weights, used, strict=True)) % p
        size = min(step, length - i * step)
        if value >> (8 * size):
            raise SecAggError("malformed_share", "the shares do not interpolate to a secret "
                              "(one was altered, or they are of different secrets)")
        out += value.to_bytes(size, "big")
    return bytes(out)
