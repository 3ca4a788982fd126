"""Strategies, one per module, found by name through an explicit registry.

``session.aggregator`` is a registered name or ``package.module:Class`` naming a user's
own ``Strategy`` subclass; ``session.aggregator_kwargs`` are its constructor's options.
Both are checked when the config is loaded, so a typo never reaches the actors, and an
option without a default that is not given is named with an example (``options``). The
contract is ``base`` (what a strategy decides and computes), ``declaration`` (what it
declares the runtime must do), ``snapshots`` and ``updates`` (what it decides over and
folds), and ``client_half`` (its optional edge side).
"""

from __future__ import annotations

from typing import Any

from fedray.errors import ConfigError
from fedray.messages import TaskKind
from fedray.strategies.base import KeptStrategy, Strategy
from fedray.strategies.client_half import ClientHalf
from fedray.strategies.declaration import (
    TRAIN,
    VALIDATE,
    Asynchronous,
    CloseRule,
    Declaration,
    NormCheck,
    Stage,
    UpdateLayout,
    When,
)
from fedray.strategies.loading import load_object
from fedray.strategies.options import options_problem
from fedray.strategies.snapshots import (
    ACCEPT,
    ClientInfo,
    CloseReason,
    Reply,
    RoundContext,
    RoundPlan,
    RoundState,
    ShareSnapshot,
    Staleness,
    UpdateMeta,
    Verdict,
)
from fedray.strategies.updates import (
    Accumulator,
    KeepAll,
    Kept,
    KeptUpdates,
    ShareStart,
    Update,
)

REGISTRY: dict[str, str] = {
    "fedavg": "fedray.strategies.fedavg:FedAvg",
    "fedprox": "fedray.strategies.fedprox:FedProx",
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
    "secagg": "fedray.strategies.secagg.strategy:SecAgg",
}

__all__ = [
    "ACCEPT", "Accumulator", "Asynchronous", "ClientHalf", "ClientInfo", "CloseReason",
    "CloseRule", "Declaration", "KeepAll", "Kept", "KeptStrategy", "KeptUpdates", "NormCheck",
    "REGISTRY", "Reply", "RoundContext", "RoundPlan", "RoundState", "ShareSnapshot",
    "ShareStart", "Stage", "Staleness", "Strategy", "TRAIN", "TaskKind", "Update", "UpdateLayout",
    "UpdateMeta", "VALIDATE", "Verdict", "When", "load_object", "make_strategy",
    "options_problem", "strategy_class",
]  # fmt: skip


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
    """A fresh strategy for a session; options that are missing or unknown (said with an
    example), options that do not fit, or a declaration that does not hold, are a
    ConfigError."""
    cls = strategy_class(name)
    problem = options_problem(name, cls, kwargs)
    if problem:  # said with the option's name and an example, not as a signature error
        raise ConfigError(f"session.aggregator {problem}")
    try:
        strategy = cls(**(kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"session.aggregator_kwargs do not fit {name!r}: {exc}") from None
    try:
        declaration = strategy.declare()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"aggregator {name!r} declares what cannot run: {exc}") from None
    if not isinstance(declaration, Declaration):
        raise ConfigError(f"aggregator {name!r}: declare() must return a "
                          f"fedray.strategies.Declaration, got {type(declaration).__name__}")
    return strategy
