"""Building tracking documents: BSON-ready values, UTC timestamps, events.

Kept apart from ``store`` so the writer can build an event (and validate its level) in
the caller's thread without touching the database, and so every document gets its
timestamps from one clock: ``utcnow``, which a queued write overrides with the time it
was submitted (``written_at``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId

LEVELS = ("debug", "info", "warning", "error")

_write_time: ContextVar[datetime | None] = ContextVar("fedray_tracking_write_time", default=None)


def utcnow() -> datetime:
    """Now in UTC, or the time a queued write was submitted (see ``written_at``)."""
    return _write_time.get() or datetime.now(UTC)


@contextlib.contextmanager
def written_at(ts: datetime) -> Iterator[None]:
    """Stamp documents written inside this block with ``ts`` instead of the clock.

    The TrackingWriter uses it so that a write delayed by an outage still carries the
    time it happened, not the time the database came back.
    """
    token = _write_time.set(ts)
    try:
        yield
    finally:
        _write_time.reset(token)


def make_event(
    level: str,
    source: str,
    message: str,
    *,
    session_id: str | None = None,
    round: int | None = None,
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An event document, stamped now and with its ``_id`` chosen here (retry-safe)."""
    if level not in LEVELS:
        raise ValueError(f"event level must be one of {', '.join(LEVELS)}, got {level!r}")
    doc: dict[str, Any] = {
        "_id": ObjectId(),
        "ts": utcnow(),
        "level": level,
        "source": source,
        "session_id": session_id,
        "round": round,
        "message": message,
    }
    if data is not None:
        doc["data"] = clean(dict(data))
    return doc


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what a BSON integer holds


def clean(value: Any) -> Any:
    """``value`` made BSON-ready: numpy scalars and arrays become Python numbers and lists,
    tuples and sets become lists, and mapping keys become strings. An integer outside
    BSON's 64 bits (a client's ``num_examples`` of 2**64 - 1) is stored as its decimal
    text: exact, visibly not a count, and never the reason a write fails. A NaN or an
    infinity (a client's validation loss of a diverged model) is stored as null:
    nx-27017 refuses the whole document otherwise."""
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [clean(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) \
            and not INT64_MIN <= value <= INT64_MAX:
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | bytes | bool | int | float | datetime) or value is None:
        return value
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return clean(tolist())
    return value


def tensor_list(tensors: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A tensor spec as ``[{name, dtype, shape}]``; values may be ``(dtype, shape)`` pairs,
    ``{"dtype", "shape"}`` mappings or objects with ``dtype``/``shape`` (numpy arrays)."""
    out = []
    for name, spec in tensors.items():
        if isinstance(spec, Mapping):
            dtype, shape = spec["dtype"], spec["shape"]
        elif hasattr(spec, "dtype") and hasattr(spec, "shape"):
            dtype, shape = spec.dtype, spec.shape
        else:
            dtype, shape = spec
        out.append({"name": str(name), "dtype": str(dtype), "shape": [int(d) for d in shape]})
    return out
