"""Numeric helpers strategies share: in-place, blocked arithmetic over model tensors.

Every helper works in blocks of ``BLOCK`` elements, so that aggregating a model of any
size allocates temporaries of a few MiB, never a second model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Model = dict[str, np.ndarray]
Spec = Mapping[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)

BLOCK = 1 << 20  # elements per in-place block: bounds temporaries to a few MiB


def add_scaled(acc: np.ndarray, value: np.ndarray, scale: float) -> None:
    """``acc += value * scale`` in blocks, so no full-size temporary is allocated."""
    a = acc.reshape(-1)
    v = value.reshape(-1)
    for start in range(0, a.size, BLOCK):
        block = v[start : start + BLOCK].astype(acc.dtype, copy=True)
        block *= scale
        a[start : start + BLOCK] += block


def add_scaled_delta(acc: np.ndarray, value: np.ndarray, base: np.ndarray, scale: float) -> None:
    """``acc += (value - base) * scale`` in blocks (float64 differences)."""
    a = acc.reshape(-1)
    v = value.reshape(-1)
    b = base.reshape(-1)
    for start in range(0, a.size, BLOCK):
        block = v[start : start + BLOCK].astype(np.float64)
        block -= b[start : start + BLOCK]
        block *= scale
        a[start : start + BLOCK] += block


def delta_norm(model: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``model - base`` over every floating tensor, in blocks."""
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
