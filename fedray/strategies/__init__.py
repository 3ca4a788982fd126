"""Strategies, one per module, found by name through an explicit registry.

``session.aggregator`` is a registered name or ``package.module:Class`` naming a user's
own ``Strategy`` subclass; ``session.aggregator_kwargs`` are its constructor's options.
Both are checked when the config is loaded, so a typo never reaches the actors.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from fedray.errors import ConfigError
from fedray.strategies.base import (
    ACCEPT,
    Accumulator,
    ClientInfo,
    CloseReason,
    Kept,
    KeptStrategy,
    KeptUpdates,
    RoundContext,
    RoundPlan,
    ShareSnapshot,
    ShareStart,
    Strategy,
    Update,
    UpdateMeta,
    Verdict,
)

REGISTRY: dict[str, str] = {
    "fedavg": "fedray.strategies.fedavg:FedAvg",
    "fedavgm": "fedray.strategies.fedopt:FedAvgM",
    "fedadam": "fedray.strategies.fedopt:FedAdam",
    "fedyogi": "fedray.strategies.fedopt:FedYogi",
    "fedadagrad": "fedray.strategies.fedopt:FedAdagrad",
    "median": "fedray.strategies.robust:Median",
    "trimmed_mean": "fedray.strategies.robust:TrimmedMean",
    "krum": "fedray.strategies.robust:Krum",
    "multikrum": "fedray.strategies.robust:MultiKrum",
    "bulyan": "fedray.strategies.robust:Bulyan",
    "fedbuff": "fedray.strategies.fedbuff:FedBuff",
    "dp_fixed": "fedray.strategies.dp:DPFedAvgFixed",
    "dp_adaptive": "fedray.strategies.dp:DPFedAvgAdaptive",
}

__all__ = [
    "ACCEPT", "Accumulator", "ClientInfo", "CloseReason", "Kept", "KeptStrategy", "KeptUpdates",
    "REGISTRY", "RoundContext", "RoundPlan", "ShareSnapshot", "ShareStart", "Strategy", "Update",
    "UpdateMeta", "Verdict", "load_object", "make_strategy", "strategy_class",
]  # fmt: skip


def load_object(target: str, what: str) -> Any:
    """``package.module:attr``, imported; a ConfigError that says what failed otherwise.

    The working directory is importable, as it is for ``ray job submit --working-dir .``.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {target!r} must be package.module:name")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {target!r}: cannot import {module_name} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - user code failed while importing
        raise ConfigError(f"{what} {target!r}: importing {module_name} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{what} {target!r}: {module_name} has no {attr!r}") from None
    return obj


def strategy_class(name: str) -> type[Strategy]:
    target = REGISTRY.get(name, name)
    if ":" not in target:
        raise ConfigError(f"unknown aggregator {name!r}; known: {', '.join(sorted(REGISTRY))} "
                          "(or package.module:Class)")
    cls = load_object(target, "aggregator")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"aggregator {name!r} is not a fedray.strategies.Strategy subclass")
    return cls


def make_strategy(name: str, kwargs: dict[str, Any] | None = None) -> Strategy:
    """A fresh strategy for a session; options that do not fit are a ConfigError."""
    cls = strategy_class(name)
    try:
        return cls(**(kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"session.aggregator_kwargs do not fit {name!r}: {exc}") from None
