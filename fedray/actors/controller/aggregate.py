"""From a round's partials to the next model: reduce, finish, and refuse what must not be
committed (a model that is not finite, or whose names, dtypes or shapes changed).

Pure but for ``resolve_kept``, which reads kept updates through the pool (zero-copy views
of object-store memory when the pool is Ray's).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from fedray.errors import AggregateRefused, FedrayError
from fedray.serialization import decode, encode, read_layout
from fedray.strategies.base import KeptUpdates, Strategy, is_finite_model

log = logging.getLogger(__name__)


async def resolve_kept(pool: Any, partials: list[Any]) -> None:
    """Kept updates are handles (object-store refs): give the strategy their tensors."""
    for partial in partials:
        if isinstance(partial, KeptUpdates):
            for kept in partial.items:
                kept.model = decode(await pool.resolve(kept.handle))


def next_model(strategy: Strategy, model: bytes, partials: list[Any]) -> bytes:
    """``finish(model, reduce(partials))`` as safetensors bytes, or AggregateRefused."""
    name = type(strategy).name or type(strategy).__name__
    try:
        reduced = strategy.reduce(partials)
        new = strategy.finish(decode(model), reduced)
    except FedrayError as exc:
        raise AggregateRefused(f"the strategy refused the round: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - user strategy code, or no updates at all
        log.exception("strategy %s failed to aggregate", name)
        raise AggregateRefused(f"strategy {name!r} failed to aggregate: "
                               f"{type(exc).__name__}: {exc}") from None
    del reduced  # the sums (float64: twice the model) go before the encoded copy comes
    reference = read_layout(model).spec()
    try:
        data = encode(new)
        if read_layout(data).spec() != reference:
            raise ValueError("names, dtypes or shapes differ from the global model's")
    except (FedrayError, ValueError) as exc:
        raise AggregateRefused(f"strategy {name!r} returned a bad model: {exc}") from None
    if not is_finite_model(decode(data)):
        raise AggregateRefused("the aggregate holds NaN or infinity; it was not committed "
                               "and the previous model stays")
    return data


def storable_report(raw: Any) -> dict[str, float | int | None]:
    """A strategy's ``round_report`` as tracking can store it: numbers by name, as Python
    numbers; a value that is not finite (epsilon without noise) becomes None (null), since
    a NaN or an infinity would get the whole round document refused."""
    out: dict[str, float | int | None] = {}
    for key, value in dict(raw).items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            continue
        number = int(value) if isinstance(value, int | np.integer) else float(value)
        out[str(key)] = number if math.isfinite(number) else None
    return out
