"""Checks an update's payload against the round's global model before it is folded.

Header checks (task, round, model id, duplicates) need the combiner's state and live in
the combiner core; this module checks the bytes themselves: a valid safetensors payload,
within the size bound, with exactly the global model's names, dtypes and shapes, and only
finite values. It returns zero-copy views, so checking costs no copy of the model.
"""

from __future__ import annotations

import numpy as np

from fedray.errors import SerializationError, UpdateRejected
from fedray.serialization import Buffer, Layout, Model, decode, read_layout

FINITE_BLOCK = 1 << 20


def check_update(data: Buffer, expected: Layout, max_bytes: int) -> Model:
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise UpdateRejected("too_large", f"{size} bytes, the limit is {max_bytes}")
    try:
        layout = read_layout(data)
    except SerializationError as exc:
        raise UpdateRejected("malformed", str(exc)) from None
    want, got = expected.spec(), layout.spec()
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
    for name, arr in model.items():
        if np.issubdtype(arr.dtype, np.floating) and not all_finite(arr):
            raise UpdateRejected("non_finite", f"{name} holds NaN or infinity")
    return model


def all_finite(arr: np.ndarray) -> bool:
    flat = arr.reshape(-1)
    return all(np.isfinite(flat[i : i + FINITE_BLOCK]).all() for i in range(0, flat.size, FINITE_BLOCK))
