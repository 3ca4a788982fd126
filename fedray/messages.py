"""Typed values that cross module lines: controller, combiners, the gRPC adapter and the edge.

Plain frozen dataclasses (picklable by Ray, independent of protobuf), so the combiner
core and the controller never import grpc. Both sides of the bridge share them, which is
why they live here and not under ``fedray/actors/``: the edge imports nothing from there.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_ATTRS, MAX_ATTR_VALUE_CHARS = 32, 256  # what a client may say about itself
_ATTR_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def attrs_problem(attrs: Mapping[str, str]) -> str:
    """Why client attributes (``--attr site=eu``) are refused, or "" when they are fine.
    The client checks before it dials and the combiner again: selection reads them."""
    if len(attrs) > MAX_ATTRS:
        return f"at most {MAX_ATTRS} attributes, got {len(attrs)}"
    for key, value in attrs.items():
        if not isinstance(key, str) or not _ATTR_KEY.fullmatch(key):
            return f"{str(key)[:70]!r}: a key is 1-64 letters, digits, '.', '_' or '-'"
        if not isinstance(value, str) or len(value) > MAX_ATTR_VALUE_CHARS \
                or not value.isprintable():
            return f"{key}: a value is at most {MAX_ATTR_VALUE_CHARS} printable characters"
    return ""


class TaskKind(enum.StrEnum):
    """What a client runs for a task: the user's train or validate, or (STAGE) a stage a
    strategy declared, answered by the strategy's client half."""

    TRAIN = "train"
    VALIDATE = "validate"
    STAGE = "stage"


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
    stage: str = ""  # the declared stage's name ("train", "validate", or the strategy's own)
    payload: bytes = b""  # this client's own bytes for this task (RoundPlan.payloads)
    client_half: str = ""  # package.module:Class of the strategy's client half, if any
    codec: str = ""  # a train task's update codec (session.codec), "" for none
    codec_options: dict[str, Any] = field(default_factory=dict)  # session.codec_kwargs
    delta_from: str = ""  # the model is a codec delta from this one (downlink)
    delta_size: int = 0


@dataclass(frozen=True, slots=True)
class StageReply:
    """A client's answer to a task of kind STAGE: bytes its client half returned."""

    client_id: str
    task_id: str
    session_id: str
    round: int
    stage: str
    payload: bytes


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
    """The controller's order to one combiner for one stage of a round (training, a
    validation, or a stage the strategy declared).

    The strategy itself reached the combiner once, with the session (its declaration
    says how each stage closes and what its replies may hold); what changes per round
    travels here (``params`` for its accumulators, ``buffer`` for its closing,
    ``payloads`` for the clients).
    """

    session_id: str
    round: int
    kind: TaskKind
    clients: tuple[str, ...]
    config: dict[str, Any]
    timeout_s: float
    model_id: str = ""  # sha256 of the model bytes, when the sender already knows it
    package_sha256: str = ""  # the session's compute package, if it has one
    package_size: int = 0
    attempt: int = 1  # a round that failed runs again as attempt 2, 3, ...
    params: dict[str, Any] = field(default_factory=dict)  # RoundPlan.params
    buffer: int = 0  # the round closes on its first K accepted updates, across combiners
    max_examples: int = 1_000_000  # session.max_examples_per_update
    max_update_norm: float | None = None  # session.max_update_norm
    max_update_norm_ratio: float | None = None  # session.max_update_norm_ratio
    version: int = 0  # the model version this round trains (asynchronously: the first)
    stage: str = ""  # the declared stage this share runs (default: the kind's name)
    payloads: dict[str, bytes] = field(default_factory=dict)  # client id -> its own bytes
    codec: str = ""  # session.codec for train stages ("" or "none": updates as trained)
    codec_options: dict[str, Any] = field(default_factory=dict)  # session.codec_kwargs
    delta_from: str = ""  # the model is parent + this codec delta (downlink), from:
    delta: bytes = b""  # the delta (the codec's parts, safetensors)

    @property
    def stage_name(self) -> str:
        return self.stage or self.kind.value

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.session_id, self.round, self.stage_name, self.attempt)


@dataclass(slots=True)
class MetricSums:
    """Example-weighted sums of the numeric metrics clients report; they add up exactly."""

    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    overflowed: set[str] = field(default_factory=set)  # keys left out: their sum is not finite

    def fold(self, metrics: dict[str, Any], weight: float) -> None:
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            total = self.sums.get(key, 0.0) + float(value) * weight
            if not math.isfinite(total):
                continue  # a non-finite value, or a sum that overflowed
            self.sums[key] = total
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def add(self, other: MetricSums) -> None:
        """Add another combiner's sums. A key whose total overflows is left out of the
        round (one combiner's share of it would be a wrong mean, and inf cannot be stored)."""
        self.overflowed |= other.overflowed
        for key, value in other.sums.items():
            total = self.sums.get(key, 0.0) + value
            weight = self.weights.get(key, 0.0) + other.weights[key]
            if math.isfinite(total) and math.isfinite(weight):
                self.sums[key], self.weights[key] = total, weight
            else:
                self.overflowed.add(key)
        for key in self.overflowed:
            self.sums.pop(key, None)
            self.weights.pop(key, None)

    def means(self) -> dict[str, float]:
        """The finite means only: a round record with inf or NaN cannot be committed."""
        means = {k: self.sums[k] / w for k, w in self.weights.items() if w > 0}
        return {k: v for k, v in means.items() if math.isfinite(v)}


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
    metrics: MetricSums = field(default_factory=MetricSums)  # clients' train metrics
    failures: dict[str, str] = field(default_factory=dict)  # client id -> why it failed
    attempt: int = 1
    stage: str = "train"
    replies: dict[str, bytes] = field(default_factory=dict)  # a STAGE share: client -> reply
    folded: tuple[str, ...] = ()  # a train share: the clients whose updates the partial holds


@dataclass(frozen=True, slots=True)
class AsyncSpec:
    """The controller's order to one combiner to serve an asynchronous session: keep its
    clients training on the newest model, and forward every accepted update."""

    session_id: str
    clients: tuple[str, ...]
    config: dict[str, Any]
    timeout_s: float  # how long one client's task may take
    package_sha256: str = ""
    package_size: int = 0
    max_examples: int = 1_000_000
    max_update_norm: float | None = None
    max_update_norm_ratio: float | None = None
    kept_versions: int = 8  # model versions still served and checked against
    max_pending: int = 1000  # forwarded updates waiting for the controller (backpressure)
    codec: str = ""  # session.codec ("" or "none": updates as trained)
    codec_options: dict[str, Any] = field(default_factory=dict)  # session.codec_kwargs
