"""What an update codec is: how a floating tensor's delta is written and folded back.

A codec works on an update's *delta* (``update - base``): the model's floating tensors,
flattened and concatenated in name order into one float32 vector (so that a payload
holds a handful of tensors, whatever the model's count: headers cost nothing):

    encode(delta, state) -> parts           on the client, after the user's train and the
                                            strategy's client half (clipping, noise): the
                                            arrays sent instead of the tensors; ``state`` is
                                            the client's per-session memory (error feedback)
    parts_spec(size) -> {part: (dtype, shape)}
                                            what intake expects in place of a delta of
                                            ``size`` values (``UpdateLayout.expected``)
    check(parts, size) -> float             on the combiner, before anything is folded: the
                                            values are in range (UpdateRejected otherwise);
                                            returns a bound on the delta's largest |value|
    norm_sq(parts) -> float                 ``||delta||^2``, from the encoded form
    add_range(acc, parts, start, stop, scale)
                                            ``acc += scale * delta[start:stop]`` in float64,
                                            block by block (one tensor of the model): no
                                            float32 copy of the update is made

Non-floating tensors are never encoded: they travel as they are, under their own name.
A codec is one module; ``fedray.strategies.codecs.CODECS`` names the built-in ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedray.errors import UpdateRejected

Parts = Mapping[str, np.ndarray]
PartsSpec = dict[str, tuple[str, tuple[int, ...]]]

FOLD_BLOCK = 1 << 20  # values decoded at a time by add_into: temporaries of a few MiB
MAX_DELTA = 1e30  # a delta value larger than this cannot be a training step: refused


class Codec(ABC):
    """One way of writing a delta. Options are keyword arguments (``session.codec_kwargs``),
    checked in ``__init__`` with messages that name the option and its range."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    option_examples: ClassVar[Mapping[str, object]] = {}

    def __init__(self, **options: Any) -> None:
        if options:
            known = ", ".join(f"{k} (e.g. {v!r})" for k, v in self.option_examples.items())
            raise ValueError(f"codec {self.name!r} has no option {', '.join(sorted(options))}"
                             f"; {'its options: ' + known if known else 'it takes none'}")

    def options(self) -> dict[str, Any]:
        """The options this codec was made with (sent to clients with every task)."""
        return {}

    @abstractmethod
    def parts_spec(self, size: int) -> PartsSpec: ...

    @abstractmethod
    def encode(self, delta: np.ndarray, state: dict[str, Any]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def check(self, parts: Parts, size: int) -> float: ...

    @abstractmethod
    def norm_sq(self, parts: Parts) -> float: ...

    @abstractmethod
    def add_range(self, acc: np.ndarray, parts: Parts, start: int, stop: int,
                  scale: float) -> None: ...

    def decode(self, parts: Parts, size: int) -> np.ndarray:
        """The whole delta (float64): for tests and for strategies that need arrays."""
        out = np.zeros(size, np.float64)
        self.add_range(out, parts, 0, size, 1.0)
        return out


def refuse_non_finite(what: str, values: np.ndarray) -> float:
    """The largest |value| of ``values`` (float), refusing NaN, infinity or over MAX_DELTA."""
    if values.size == 0:
        return 0.0
    top = 0.0
    flat = values.reshape(-1)
    for start in range(0, flat.size, FOLD_BLOCK):
        block = flat[start : start + FOLD_BLOCK]
        lo, hi = float(block.min()), float(block.max())
        if lo != lo or hi != hi or not np.isfinite(lo) or not np.isfinite(hi):
            raise UpdateRejected("non_finite", f"{what} holds NaN or infinity")
        top = max(top, abs(lo), abs(hi))
    if top > MAX_DELTA:
        raise UpdateRejected("overflow", f"{what} holds {top:.3g}, over {MAX_DELTA:g}")
    return top


def dot64(values: np.ndarray) -> float:
    """``sum(values**2)`` in float64, in blocks."""
    total = 0.0
    flat = values.reshape(-1)
    for start in range(0, flat.size, FOLD_BLOCK):
        block = flat[start : start + FOLD_BLOCK].astype(np.float64)
        total += float(np.dot(block, block))
    return total
