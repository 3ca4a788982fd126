"""topk: the largest ``fraction`` of a delta's values, with error feedback on the client.

The delta sends its ``ceil(fraction x size)`` values of largest magnitude over the whole
model (float32) and their positions (uint32, ascending). What was not sent is not lost:
the client keeps it as a residual and adds it to its next delta of the session (error feedback,
Stich et al. 2018; Karimireddy et al. 2019), so every coordinate moves eventually. The
residual costs the client one float32 copy of the model. At fraction 0.01, 50x fewer
bytes than float32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedray.errors import UpdateRejected
from fedray.strategies.codecs.base import Codec, Parts, PartsSpec, dot64, refuse_non_finite


class TopK(Codec):
    name = "topk"
    option_examples = {"fraction": 0.01}

    def __init__(self, fraction: float = 0.01, **options: Any) -> None:
        super().__init__(**options)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) \
                or not 0 < fraction <= 1:
            raise ValueError(f"codec topk: fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def options(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

    def kept(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.fraction * size))) if size else 0

    def parts_spec(self, size: int) -> PartsSpec:
        k = self.kept(size)
        return {"i": ("U32", (k,)), "v": ("F32", (k,))}

    def encode(self, delta: np.ndarray, state: dict[str, Any]) -> dict[str, np.ndarray]:
        x = delta.astype(np.float32, copy=True)
        residual = state.get("residual")
        if residual is not None and residual.shape == x.shape:
            x += residual
        k = self.kept(x.size)
        if k == x.size:
            index = np.arange(x.size, dtype=np.uint32)
        else:
            index = np.argpartition(np.abs(x), x.size - k)[x.size - k :]
            index = np.sort(index).astype(np.uint32)
        values = x[index]
        x[index] = 0.0
        state["residual"] = x  # what this round did not send, sent later
        return {"i": index, "v": values}

    def check(self, parts: Parts, size: int) -> float:
        index = parts["i"]
        if index.size:
            if int(index[-1]) >= size:
                raise UpdateRejected("malformed", f"topk position {int(index[-1])} is past "
                                     f"the tensor's {size} values")
            if index.size > 1 and not bool(np.all(index[1:] > index[:-1])):
                raise UpdateRejected("malformed", "topk positions must be strictly ascending")
        return refuse_non_finite("the topk values", parts["v"])

    def norm_sq(self, parts: Parts) -> float:
        return dot64(parts["v"])

    def add_range(self, acc: np.ndarray, parts: Parts, start: int, stop: int,
                  scale: float) -> None:
        index = parts["i"]
        lo, hi = np.searchsorted(index, [start, stop])  # positions ascend
        where = index[lo:hi].astype(np.intp) - start
        acc[where] += parts["v"][lo:hi].astype(np.float64) * scale  # positions are unique
