"""int8: the delta as 8-bit integers with one float32 scale per block of values.

Each block of ``block`` values (default 256) is written as ``q * scale`` with
``scale = max|x| / 127`` and ``q`` rounded stochastically (up with probability equal
to the fraction), so the decoded delta is unbiased: its expectation is the true delta,
and averaging many clients' updates averages the rounding away. 1 byte a value plus 4
per block: 3.94x fewer bytes than float32 at the default block.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedray.errors import UpdateRejected
from fedray.strategies.codecs.base import FOLD_BLOCK, MAX_DELTA, Codec, Parts, PartsSpec

LEVELS = 127
MIN_BLOCK, MAX_BLOCK = 16, 1 << 16


class Int8(Codec):
    name = "int8"
    option_examples = {"block": 256}

    def __init__(self, block: int = 256, **options: Any) -> None:
        super().__init__(**options)
        if isinstance(block, bool) or not isinstance(block, int) \
                or not MIN_BLOCK <= block <= MAX_BLOCK:
            raise ValueError(f"codec int8: block must be a whole number in "
                             f"{MIN_BLOCK}..{MAX_BLOCK}, got {block!r}")
        self.block = block
        # Fold blocks hold whole codec blocks, so one scale never straddles two of them.
        self._fold = max(block, FOLD_BLOCK // block * block)

    def options(self) -> dict[str, Any]:
        return {"block": self.block}

    def blocks(self, size: int) -> int:
        return math.ceil(size / self.block)

    def parts_spec(self, size: int) -> PartsSpec:
        return {"q": ("I8", (size,)), "scale": ("F32", (self.blocks(size),))}

    def encode(self, delta: np.ndarray, state: dict[str, Any]) -> dict[str, np.ndarray]:
        rng = state.setdefault("rng", np.random.default_rng())
        size, n = delta.size, self.blocks(delta.size)
        q = np.empty(size, np.int8)
        scales = np.empty(n, np.float32)
        for start in range(0, size, self._fold):
            x = delta[start : start + self._fold].astype(np.float32)
            count = math.ceil(x.size / self.block)
            padded = np.zeros(count * self.block, np.float32)
            padded[: x.size] = x
            rows = padded.reshape(count, self.block)
            top = np.max(np.abs(rows), axis=1)
            scale = (top / LEVELS).astype(np.float32)
            safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
            scaled = rows / safe[:, None]
            scaled += rng.random(scaled.shape, dtype=np.float32)
            np.floor(scaled, out=scaled)
            np.clip(scaled, -LEVELS, LEVELS, out=scaled)
            q[start : start + x.size] = scaled.reshape(-1)[: x.size]
            first = start // self.block
            scales[first : first + count] = scale
        return {"q": q, "scale": scales}

    def check(self, parts: Parts, size: int) -> float:
        q, scale = parts["q"], parts["scale"]
        if q.size and int(q.min()) < -LEVELS:
            raise UpdateRejected("malformed", f"int8 values are in -{LEVELS}..{LEVELS}")
        if scale.size == 0:
            return 0.0
        lo, hi = float(scale.min()), float(scale.max())
        if lo != lo or hi != hi or not math.isfinite(hi) or lo < 0:
            raise UpdateRejected("non_finite", "int8 scales must be finite and >= 0")
        if hi * LEVELS > MAX_DELTA:
            raise UpdateRejected("overflow", f"an int8 scale of {hi:.3g} is over "
                                 f"{MAX_DELTA / LEVELS:.3g}")
        return hi * LEVELS

    def norm_sq(self, parts: Parts) -> float:
        q, scale = parts["q"], parts["scale"]
        total = 0.0
        for start in range(0, q.size, self._fold):
            block = q[start : start + self._fold].astype(np.float64)
            rows = self._rows(block)
            per = np.einsum("ij,ij->i", rows, rows)
            first = start // self.block
            total += float(np.dot(per, scale[first : first + per.size].astype(np.float64) ** 2))
        return total

    def _rows(self, block: np.ndarray) -> np.ndarray:
        count = math.ceil(block.size / self.block)
        if block.size == count * self.block:
            return block.reshape(count, self.block)
        padded = np.zeros(count * self.block, block.dtype)
        padded[: block.size] = block
        return padded.reshape(count, self.block)

    def add_range(self, acc: np.ndarray, parts: Parts, start: int, stop: int,
                  scale: float) -> None:
        q, scales = parts["q"], parts["scale"]
        for at in range(start, stop, self._fold):
            end = min(at + self._fold, stop)
            block = q[at:end].astype(np.float64)
            first, last = at // self.block, (end - 1) // self.block
            factors = np.repeat(scales[first : last + 1].astype(np.float64) * scale,
                                self.block)[at - first * self.block : end - first * self.block]
            block *= factors
            acc[at - start : end - start] += block
