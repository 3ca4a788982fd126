"""Checks an update's payload against what the strategy declared before it is folded.

Header checks (task, round, model id, duplicates) need the combiner's state and live in
the combiner's intake; this module checks the bytes themselves against an ``Expected``
(``expected_for``: the strategy's ``UpdateLayout`` over the global model's spec, by
default exactly the global model's names, dtypes and shapes): a valid safetensors payload
within the size bound, whose header is no larger than the global model's needs, with the
expected tensors and, when the layout asks, only finite values. It returns zero-copy
views (checking costs no copy of the model) and the largest magnitude seen, so the intake
can tell whether weighting the update could overflow the sums.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedray.actors.combiner.share import Expected, ModelVersion, NormBound
from fedray.errors import SerializationError, UpdateRejected
from fedray.serialization import Buffer, Model, decode, read_layout, spec_nbytes
from fedray.strategies.declaration import NormCheck, UpdateLayout
from fedray.strategies.numeric import l2_norm

FINITE_BLOCK = 1 << 20


HEADER_FACTOR, HEADER_EXTRA = 2, 4096  # an update's header vs the global model's
HEADER_SLACK = 1 << 20  # an update's bytes may exceed its tensors' by this much


def expected_for(layout: UpdateLayout, version: ModelVersion, max_update_bytes: int) -> Expected:
    """What updates trained from ``version`` must look like under ``layout``."""
    spec = layout.expected(version.layout.spec())
    header = version.layout.data_offset * HEADER_FACTOR + HEADER_EXTRA
    return Expected(layout, spec, header,
                    min(max_update_bytes, spec_nbytes(spec) + version.layout.data_offset
                        + HEADER_SLACK))


def bounded(version: ModelVersion, layout: UpdateLayout, max_norm: float | None,
            ratio: float | None) -> ModelVersion:
    """``version`` with the norm bound its updates are checked against: the smaller of
    ``session.max_update_norm`` and ``ratio x (||w|| + sqrt(n))`` (``w`` the version's
    floating tensors, ``n`` their values: the bound grows with the model, and "+ sqrt(n)"
    gives a model of zeros room to move). None where the layout has no such distance."""
    if layout.norm is NormCheck.OFF:
        return version
    if max_norm is None and ratio is None:
        return version
    w, n = l2_norm(version.base)
    bounds = []
    if max_norm is not None:
        bounds.append(NormBound(max_norm, f"session.max_update_norm ({max_norm:g})", w))
    if ratio is not None:
        bounds.append(NormBound(ratio * (w + math.sqrt(n)),
                                f"session.max_update_norm_ratio {ratio:g} x (||w|| {w:.4g} "
                                f"+ sqrt(n) {math.sqrt(n):.4g})", w))
    return dataclasses.replace(version, norm=min(bounds, key=lambda b: b.limit))


def check_update(data: Buffer, expected: Expected, max_bytes: int) -> tuple[Model, float]:
    """The update's tensors (read-only views) and a bound on its largest magnitude (0
    when the layout does not ask for finite values)."""
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise UpdateRejected("too_large", f"{size} bytes, the limit is {max_bytes}")
    try:
        layout = read_layout(data, max_header=expected.header_bound)
    except SerializationError as exc:
        raise UpdateRejected("malformed", str(exc)) from None
    want, got = expected.spec, layout.spec()
    if set(want) != set(got):
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        raise UpdateRejected("wrong_names", f"missing {missing}, unexpected {extra}")
    for name, (dtype, shape) in want.items():
        if got[name][0] != dtype:
            raise UpdateRejected("wrong_dtype", f"{name} is {got[name][0]}, expected {dtype}")
        if got[name][1] != shape:
            raise UpdateRejected("wrong_shape", f"{name} is {list(got[name][1])}, expected {list(shape)}")
    model = decode(data, layout)
    bound = 0.0
    if not expected.layout.finite:
        return model, bound
    for name, arr in model.items():
        top = magnitude_bound(arr)
        if not np.isfinite(top):
            raise UpdateRejected("non_finite", f"{name} holds NaN or infinity")
        bound = max(bound, top)
    return model, bound


def magnitude_bound(arr: np.ndarray) -> float:
    """A bound on the tensor's largest |value|: NaN when it holds NaN or an infinity.

    One pass, as a rule. Float32 and float16 values are bounded by their type (no weight
    fedray allows can push them past a float64 sum), so they only need to be finite: a
    block whose own sum is finite holds no NaN or infinity (both propagate), and only a
    block whose sum overflowed is looked at value by value. Float64 tensors need their
    true magnitude (values near 1e300 are finite but overflow once weighted).
    """
    flat = arr.reshape(-1)
    if not np.issubdtype(flat.dtype, np.floating):
        return float(np.iinfo(flat.dtype).max) if flat.dtype != np.bool_ else 1.0
    if flat.dtype.itemsize < 8:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum is expected
            for i in range(0, flat.size, FINITE_BLOCK):
                block = flat[i : i + FINITE_BLOCK]
                if not np.isfinite(np.add.reduce(block)) and not np.isfinite(block).all():
                    return float("nan")
        return float(np.finfo(flat.dtype).max)
    return max_abs(flat)


def max_abs(arr: np.ndarray) -> float:
    """The largest |value| (NaN when the tensor holds NaN or an infinity), in blocks."""
    flat = arr.reshape(-1)
    top = 0.0
    for i in range(0, flat.size, FINITE_BLOCK):
        block = flat[i : i + FINITE_BLOCK]
        lo, hi = float(block.min()), float(block.max())  # NaN propagates through both
        if lo != lo or hi != hi:
            return float("nan")
        top = max(top, abs(lo), abs(hi))
    return top
