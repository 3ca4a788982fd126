"""Aggregation strategies, one per module, found by name through an explicit registry.

``session.aggregator`` is either a registered name or ``package.module:Class`` naming a
user's own ``Aggregator`` subclass.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedray.aggregators.base import Accumulator, Aggregator, Partial
from fedray.errors import ConfigError

REGISTRY: dict[str, str] = {
    "fedavg": "fedray.aggregators.fedavg:FedAvg",
    "fedavgm": "fedray.aggregators.fedavgm:FedAvgM",
}

__all__ = ["Accumulator", "Aggregator", "Partial", "REGISTRY", "known_aggregator", "make_aggregator"]


def known_aggregator(name: str) -> bool:
    return name in REGISTRY or (":" in name and all(name.split(":", 1)))


def make_aggregator(name: str, kwargs: dict[str, Any] | None = None) -> Aggregator:
    target = REGISTRY.get(name, name)
    if ":" not in target:
        raise ConfigError(f"unknown aggregator {name!r}; known: {', '.join(sorted(REGISTRY))}")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load aggregator {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        raise ConfigError(f"aggregator {name!r} is not a fedray Aggregator subclass")
    try:
        return cls(**(kwargs or {}))
    except TypeError as exc:
        raise ConfigError(f"session.aggregator_kwargs do not fit {name!r}: {exc}") from None
