"""Encoded updates on both sides: the layout intake checks, the client's encoding, and the
combiner's view that folds an encoded update without decoding it into a copy.

An encoded update is a safetensors payload like any other: the floating tensors' delta
(flattened, concatenated in name order) is replaced by the codec's parts ``::q``,
``::scale`` (int8), ``::d`` (fp16) or ``::i``, ``::v`` (topk); other tensors travel as
they are. ``CodedLayout`` tells intake what to
expect, ``CodedModel`` is what the strategy folds, and ``encode_update`` is what a client
runs on its trained model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedray.errors import ConfigError
from fedray.serialization import encode
from fedray.strategies.codecs import NONE, make_codec
from fedray.strategies.codecs.base import Codec
from fedray.strategies.declaration import Declaration, UpdateLayout
from fedray.strategies.numeric import BlockwiseModel, Spec, add_scaled, add_scaled_delta

SEP = "::"  # parts are named "::q", "::scale" (int8), "::d" (fp16), "::i", "::v" (topk)
FLOATING = {"F64", "F32", "F16"}


def coded(dtype: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of this dtype and shape is encoded (floating and not empty)."""
    return dtype in FLOATING and math.prod(shape) > 0


def offsets(model: Spec) -> dict[str, tuple[int, int]]:
    """Where each encoded tensor sits in the delta vector: its floating tensors,
    flattened, concatenated in name order."""
    out, at = {}, 0
    for name in sorted(model):
        dtype, shape = model[name]
        if coded(dtype, tuple(shape)):
            out[name] = (at, at + math.prod(shape))
            at += math.prod(shape)
    return out


def spec_of(model: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (_code(value.dtype), value.shape) for name, value in model.items()}


@dataclass(frozen=True)
class CodedLayout(UpdateLayout):
    """The default layout, with the floating tensors' delta in the codec's parts. The
    norm of an update's difference from its base is read from the encoded delta."""

    codec: Codec | None = field(default=None, compare=False)

    def expected(self, model: Spec) -> dict[str, tuple[str, tuple[int, ...]]]:
        assert self.codec is not None
        where = offsets(model)
        out = {name: (dtype, tuple(shape)) for name, (dtype, shape) in model.items()
               if name not in where}
        size = max((stop for _, stop in where.values()), default=0)
        for part, spec in self.codec.parts_spec(size).items():
            if SEP + part in out:
                raise ValueError(f"the model has a tensor named {SEP + part!r}, the name of "
                                 f"codec {self.codec.name}'s part")
            out[SEP + part] = spec
        return out

    def view(self, model: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
             ) -> CodedModel:
        assert self.codec is not None
        return CodedModel(self.codec, model, base)


def with_codec(layout: UpdateLayout, codec: Codec | None) -> UpdateLayout:
    """``layout`` with updates encoded by ``codec`` (the same layout when there is none).
    Only the default layout composes: a strategy with a layout of its own (masked
    updates) already decides how its updates are written."""
    if codec is None:
        return layout
    if type(layout) is not UpdateLayout:
        raise ValueError(f"the strategy declares its own update layout "
                         f"({type(layout).__name__}); session.codec must be none")
    return CodedLayout(finite=layout.finite, norm=layout.norm, codec=codec)


class CodedModel(BlockwiseModel):
    """An encoded update read as the model it stands for: ``base + delta`` per tensor.

    Strategies fold it through ``numeric.fold_scaled`` / ``fold_delta`` block by block
    (no float32 copy of the update); indexing it decodes one tensor (for strategies that
    need arrays). Construction checks the parts (``Codec.check``): a refused value never
    reaches a fold.
    """

    def __init__(self, codec: Codec, parts: Mapping[str, np.ndarray],
                 base: Mapping[str, np.ndarray]) -> None:
        self.codec = codec
        self.base = base
        self.tensors = parts  # the ones that travel as they are
        self.where = offsets(spec_of(base))
        self.size = max((stop for _, stop in self.where.values()), default=0)
        self.parts = {part: parts[SEP + part] for part in codec.parts_spec(self.size)}
        self.bound = codec.check(self.parts, self.size)  # the largest |delta| it can hold

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.where:
            return self.tensors[name]
        ref = self.base[name]
        start, stop = self.where[name]
        total = ref.reshape(-1).astype(np.float64)
        self.codec.add_range(total, self.parts, start, stop, 1.0)
        if np.issubdtype(ref.dtype, np.integer):
            np.rint(total, out=total)
        return total.astype(ref.dtype).reshape(ref.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def add_scaled_into(self, name: str, acc: np.ndarray, scale: float) -> None:
        if name not in self.where:
            add_scaled(acc, self.tensors[name], scale)
            return
        add_scaled(acc, self.base[name], scale)
        self.codec.add_range(acc.reshape(-1), self.parts, *self.where[name], scale)

    def add_delta_into(self, name: str, acc: np.ndarray, base: np.ndarray,
                       scale: float) -> None:
        if name not in self.where:
            add_scaled_delta(acc, self.tensors[name], base, scale)
            return
        own = self.base[name]
        if base is not own:  # another base than the one the delta is from
            add_scaled_delta(acc, own, base, scale)
        self.codec.add_range(acc.reshape(-1), self.parts, *self.where[name], scale)

    def delta_norm(self, base: Mapping[str, np.ndarray]) -> float | None:
        if any(base.get(name) is not self.base[name] for name in self.where):
            return None
        return math.sqrt(self.codec.norm_sq(self.parts))

    def payload(self) -> np.ndarray:
        """The decoded model as safetensors bytes (a uint8 array, as updates arrive)."""
        return np.frombuffer(encode({name: self[name] for name in self.base}), np.uint8)


def _code(dtype: np.dtype) -> str:
    return {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}.get(
        np.dtype(dtype), "")


def encode_update(codec: Codec, state: dict[str, Any], update: Mapping[str, np.ndarray],
                  base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A client's trained ``update`` as ``codec`` writes it against ``base`` (the round's
    model): the floating tensors' delta in parts, the others as they are. ``state`` is
    this client's memory for the session (error feedback)."""
    where = offsets(spec_of(base))
    size = max((stop for _, stop in where.values()), default=0)
    delta = np.empty(size, np.float32)
    out: dict[str, np.ndarray] = {}
    for name, ref in base.items():
        if name not in update:
            raise ValueError(f"the trained model has no tensor {name!r}")
        value = np.asarray(update[name])
        if value.shape != ref.shape:
            raise ValueError(f"{name}: the trained model's shape {list(value.shape)} is not "
                             f"the round model's {list(ref.shape)}")
        if name not in where:
            out[name] = value.astype(ref.dtype, copy=False)
            continue
        start, stop = where[name]
        np.subtract(value.reshape(-1), ref.reshape(-1), out=delta[start:stop],
                    casting="unsafe")
    for part, array in codec.encode(delta, state).items():
        out[SEP + part] = array
    return out


def coded_declaration(declared: Declaration, codec: str,
                      options: Mapping[str, Any] | None) -> Declaration:
    """The session's declaration with its updates in ``codec`` (``session.codec``): what a
    combiner checks and folds a round's updates by. The config was checked at load, so
    a codec that does not fit here is a ValueError, not a user's mistake."""
    if not codec or codec == NONE:
        return declared
    try:
        made = make_codec(codec, dict(options or {}))
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return dataclasses.replace(declared, layout=with_codec(declared.layout, made))


def codec_of(layout: UpdateLayout) -> tuple[str, dict[str, Any]]:
    """(name, options) of the codec a layout's updates are in; ("", {}) for none."""
    if isinstance(layout, CodedLayout) and layout.codec is not None:
        return layout.codec.name, layout.codec.options()
    return "", {}
