"""fp16: the delta in half precision (2 bytes a value instead of 4).

Half precision keeps about three significant digits, plenty for a training step, and
reaches 65,504: a client whose delta is larger is told to use another codec.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedray.errors import FedrayError
from fedray.strategies.codecs.base import (
    FOLD_BLOCK,
    Codec,
    Parts,
    PartsSpec,
    dot64,
    refuse_non_finite,
)

FP16_MAX = float(np.finfo(np.float16).max)


class Fp16(Codec):
    name = "fp16"

    def parts_spec(self, size: int) -> PartsSpec:
        return {"d": ("F16", (size,))}

    def encode(self, delta: np.ndarray, state: dict[str, Any]) -> dict[str, np.ndarray]:
        top = float(np.max(np.abs(delta))) if delta.size else 0.0
        if not top <= FP16_MAX:
            raise FedrayError(f"a delta of {top:.4g} does not fit float16 (at most "
                              f"{FP16_MAX:g}); use session.codec int8 or none")
        return {"d": delta.astype(np.float16)}

    def check(self, parts: Parts, size: int) -> float:
        return refuse_non_finite("the fp16 delta", parts["d"])

    def norm_sq(self, parts: Parts) -> float:
        return dot64(parts["d"])

    def add_range(self, acc: np.ndarray, parts: Parts, start: int, stop: int,
                  scale: float) -> None:
        d = parts["d"]
        for at in range(start, stop, FOLD_BLOCK):
            end = min(at + FOLD_BLOCK, stop)
            block = d[at:end].astype(np.float64)
            block *= scale
            acc[at - start : end - start] += block
