"""What a secure-aggregation update looks like on the wire: one vector of ring elements.

A client sends ``{"::masked": uint32[P]}`` and nothing else: ``P`` is every floating
value of the model (its floating tensors, flattened and concatenated in name order, as
the codecs lay out a delta), and the vector is the client's weighted, clipped, quantized
delta from the round's model, masked. Tensors that are not floating (counters, integer
buffers) are not aggregated under secure aggregation: they would travel in the clear,
so the committed model keeps the round's values of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedray.strategies.codecs.coded import offsets, spec_of
from fedray.strategies.declaration import NormCheck, UpdateLayout
from fedray.strategies.numeric import Model, Spec

MASKED = "::masked"


def floating_size(model: Spec) -> int:
    """P: the floating values of a model with this spec."""
    return max((stop for _, stop in offsets(model).values()), default=0)


@dataclass(frozen=True)
class MaskedLayout(UpdateLayout):
    """Intake checks a masked update's shape only: every uint32 is a valid ring element,
    and a distance from the base model means nothing for a masked vector."""

    finite: bool = False
    norm: NormCheck = NormCheck.OFF

    def expected(self, model: Spec) -> dict[str, tuple[str, tuple[int, ...]]]:
        size = floating_size(model)
        if not size:
            raise ValueError("secure aggregation needs a model with floating tensors")
        return {MASKED: ("U32", (size,))}


def flat_delta(update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
               ) -> np.ndarray:
    """The update's floating tensors minus the base's, flat in float64 (P values)."""
    where = offsets(spec_of(base))
    out = np.empty(max((stop for _, stop in where.values()), default=0), np.float64)
    for name, (start, stop) in where.items():
        if name not in update or np.shape(update[name]) != base[name].shape:
            raise ValueError(f"the update's {name!r} is missing or not shaped as the model's "
                             f"{list(base[name].shape)}")
        out[start:stop] = np.asarray(update[name], np.float64).reshape(-1)
        out[start:stop] -= base[name].reshape(-1)
    return out


def stepped(base: Mapping[str, np.ndarray], step: np.ndarray) -> Model:
    """``base`` moved by the flat ``step`` on its floating tensors, in its own dtypes; other
    tensors as they are."""
    where = offsets(spec_of(base))
    out: Model = {}
    for name, value in base.items():
        if name not in where:
            out[name] = np.array(value, copy=True)
            continue
        start, stop = where[name]
        moved = value.reshape(-1).astype(np.float64) + step[start:stop]
        out[name] = moved.astype(value.dtype).reshape(value.shape)
    return out
