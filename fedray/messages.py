"""Typed values that cross module lines: controller, combiners, the gRPC adapter and the edge.

Plain frozen dataclasses (picklable by Ray, independent of protobuf), so the combiner
core and the controller never import grpc. Both sides of the bridge share them, which is
why they live here and not under ``fedray/actors/``: the edge imports nothing from there.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class TaskKind(enum.StrEnum):
    TRAIN = "train"
    VALIDATE = "validate"


@dataclass(frozen=True, slots=True)
class Task:
    task_id: str
    kind: TaskKind
    session_id: str
    round: int
    model_id: str
    model_size: int
    config: dict[str, Any]
    deadline_unix: float
    package_sha256: str = ""
    package_size: int = 0


@dataclass(frozen=True, slots=True)
class UpdateHeader:
    client_id: str
    task_id: str
    session_id: str
    round: int
    model_id: str
    num_examples: int
    metrics: dict[str, Any]
    size: int
    sha256: str = ""


@dataclass(frozen=True, slots=True)
class ValidationReport:
    client_id: str
    task_id: str
    session_id: str
    round: int
    model_id: str
    num_examples: int
    metrics: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RoundSpec:
    """The controller's order to one combiner for one round (or validation pass)."""

    session_id: str
    round: int
    kind: TaskKind
    clients: tuple[str, ...]
    config: dict[str, Any]
    timeout_s: float
    aggregator: str = "fedavg"
    aggregator_kwargs: dict[str, Any] = field(default_factory=dict)
    model_id: str = ""  # sha256 of the model bytes, when the sender already knows it
    package_sha256: str = ""  # the session's compute package, if it has one
    attempt: int = 1  # a round that failed runs again as attempt 2, 3, ...

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.session_id, self.round, self.kind.value, self.attempt)


@dataclass(slots=True)
class RoundResult:
    """What a combiner returns for its share of a round."""

    combiner: str
    session_id: str
    round: int
    asked: int
    updates: int
    rejected: int
    failed: int
    close_reason: str
    seconds: float
    bytes_in: int
    bytes_out: int
    aggregation_s: float
    partial: Any = None  # the strategy's own partial type (sums, kept updates, ...)
    validations: list[ValidationReport] = field(default_factory=list)
    rejections: dict[str, int] = field(default_factory=dict)
