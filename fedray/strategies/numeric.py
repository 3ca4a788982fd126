"""Numeric helpers strategies share: in-place, blocked arithmetic over model tensors.

Every helper works in blocks of ``BLOCK`` elements, so that aggregating a model of any
size allocates temporaries of a few MiB, never a second model.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping

import numpy as np

Model = dict[str, np.ndarray]
Spec = Mapping[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)

BLOCK = 1 << 20  # elements per in-place block: bounds temporaries to a few MiB


class BlockwiseModel(Mapping[str, np.ndarray]):
    """A model that folds itself into float64 sums (an encoded update: ``codecs.coded``).

    Indexing it gives arrays, as for any model; ``fold_scaled``, ``fold_delta`` and
    ``delta_norm`` ask it instead, so that it is folded block by block from its own form.
    """

    base: Mapping[str, np.ndarray]  # the model its values are relative to

    @abstractmethod
    def add_scaled_into(self, name: str, acc: np.ndarray, scale: float) -> None:
        """``acc += self[name] * scale``."""

    @abstractmethod
    def add_delta_into(self, name: str, acc: np.ndarray, base: np.ndarray,
                       scale: float) -> None:
        """``acc += (self[name] - base) * scale``."""

    @abstractmethod
    def delta_norm(self, base: Mapping[str, np.ndarray]) -> float | None:
        """``||self - base||`` when it can say it without decoding, else None."""

    @abstractmethod
    def payload(self) -> np.ndarray:
        """The model as safetensors bytes (uint8) in its base's names (what a kept update
        holds)."""


def fold_scaled(acc: np.ndarray, model: Mapping[str, np.ndarray], name: str,
                scale: float) -> None:
    """``acc += model[name] * scale``: what accumulators call, so an encoded update is
    folded from its own form."""
    if isinstance(model, BlockwiseModel):
        model.add_scaled_into(name, acc, scale)
    else:
        add_scaled(acc, model[name], scale)


def fold_delta(acc: np.ndarray, model: Mapping[str, np.ndarray], name: str, base: np.ndarray,
               scale: float) -> None:
    """``acc += (model[name] - base) * scale``, as ``fold_scaled``."""
    if isinstance(model, BlockwiseModel):
        model.add_delta_into(name, acc, base, scale)
    else:
        add_scaled_delta(acc, model[name], base, scale)


def add_scaled(acc: np.ndarray, value: np.ndarray, scale: float) -> None:
    """``acc += value * scale`` in blocks, so no full-size temporary is allocated."""
    a = acc.reshape(-1)
    v = value.reshape(-1)
    for start in range(0, a.size, BLOCK):
        block = v[start : start + BLOCK].astype(acc.dtype, copy=True)
        block *= scale
        a[start : start + BLOCK] += block


def add_scaled_delta(acc: np.ndarray, value: np.ndarray, base: np.ndarray, scale: float) -> None:
    """``acc += (value - base) * scale`` in blocks: float64 differences, or for a float32
    sum of float32 tensors float32 ones (each step rounds by at most 2^-24 of its result,
    the sum's own precision, and it runs three times as fast)."""
    a = acc.reshape(-1)
    v = value.reshape(-1)
    b = base.reshape(-1)
    if a.dtype == v.dtype == b.dtype == np.float32:
        block = np.empty(min(BLOCK, a.size), np.float32)
        for start in range(0, a.size, BLOCK):
            out = block[: min(BLOCK, a.size - start)]
            np.subtract(v[start : start + BLOCK], b[start : start + BLOCK], out=out)
            out *= np.float32(scale)
            a[start : start + BLOCK] += out
        return
    for start in range(0, a.size, BLOCK):
        block = v[start : start + BLOCK].astype(np.float64)
        block -= b[start : start + BLOCK]
        block *= scale
        a[start : start + BLOCK] += block


def delta_norm(model: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``model - base`` over every floating tensor, in blocks."""
    if isinstance(model, BlockwiseModel):
        norm = model.delta_norm(base)
        if norm is not None:
            return norm
    total = 0.0
    for name, value in model.items():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        v = value.reshape(-1)
        b = base[name].reshape(-1)
        for start in range(0, v.size, BLOCK):
            d = v[start : start + BLOCK].astype(np.float64)
            d -= b[start : start + BLOCK]
            total += float(np.dot(d, d))
    return math.sqrt(total)


SUM_BLOCK = 1 << 14  # float32 values per BLAS dot in norm_upper_bound
# A dot of k non-negative float32 terms is within k x 2^-24 of exact (relative); with a
# block of SUM_BLOCK that is under 0.1%, and the float64 sum over blocks adds nothing that
# counts. Twice that is the margin, so the bound is never below the true norm.
SUM_MARGIN = 2.0 * SUM_BLOCK * 2.0**-24


def norm_upper_bound(model: Mapping[str, np.ndarray], base_norm: float) -> float:
    """A cheap upper bound on ``delta_norm(model, base)``: ``||u|| + ||w||`` (triangle
    inequality), ``||u||`` from float32 BLAS dots on the tensors as they are (no copy, no
    subtraction) and ``base_norm`` the base's L2 norm. About ten times faster than the
    exact distance; inf where a float32 sum overflows (then ask delta_norm)."""
    total = 0.0
    for value in model.values():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        v = value.reshape(-1)
        if v.dtype != np.float32:
            total += l2_norm({"": v})[0] ** 2
            continue
        with np.errstate(over="ignore"):  # an overflow is inf, answered below
            for start in range(0, v.size, SUM_BLOCK):
                block = v[start : start + SUM_BLOCK]
                total += float(np.dot(block, block))
    if not math.isfinite(total):
        return math.inf
    return math.sqrt(total * (1.0 + SUM_MARGIN)) + base_norm * (1.0 + 1e-9)


def l2_norm(model: Mapping[str, np.ndarray]) -> tuple[float, int]:
    """(L2 norm, number of values) over every floating tensor, in blocks."""
    total, count = 0.0, 0
    for value in model.values():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        v = value.reshape(-1)
        count += v.size
        for start in range(0, v.size, BLOCK):
            d = v[start : start + BLOCK].astype(np.float64)
            total += float(np.dot(d, d))
    return math.sqrt(total), count


def cast_like(reference: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]) -> Model:
    """``values`` in ``reference``'s dtypes and shapes (integers rounded)."""
    out: Model = {}
    for name, ref in reference.items():
        value = np.asarray(values[name])
        if np.issubdtype(ref.dtype, np.integer):
            value = np.rint(value)
        out[name] = value.astype(ref.dtype, copy=False).reshape(ref.shape)
    return out


def is_finite_model(model: Mapping[str, np.ndarray]) -> bool:
    for arr in model.values():
        if np.issubdtype(arr.dtype, np.floating):
            flat = arr.reshape(-1)
            for start in range(0, flat.size, BLOCK):
                if not np.isfinite(flat[start : start + BLOCK]).all():
                    return False
    return True
