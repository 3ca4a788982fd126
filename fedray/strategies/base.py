"""The strategy contract: one object per session owns a round's decisions and its math.

Policies decide, actors act. A strategy never does I/O and never sees Ray or gRPC; the
session runner (controller) and the combiners call it and carry out what it returns.

Decisions, each over a frozen snapshot:

    configure(ctx: RoundContext) -> RoundPlan     controller, once per round attempt:
                                                  who is asked, with which config
    accept(meta: UpdateMeta) -> Verdict           combiner, for each update that passed the
                                                  runtime's checks (names, shapes, bounds)
    should_close(s: ShareSnapshot) -> CloseReason combiner, whenever its share changes
    check_settings(settings: SessionConfig)       config load: ValueError if they cannot work

Math:

    start(share: ShareStart) -> Accumulator       combiner, once per share of a round
        acc.fold(update: Update)                  per accepted update (then dropped)
        acc.partial() -> P                        the strategy's own partial type
    reduce(partials: list[P]) -> R                controller: across combiners
    finish(global_model, reduced: R) -> Model     controller: the next global model
    state_dict() / load_state_dict(state)         server state saved with every commit

A partial is whatever the strategy needs to be exact across combiners: weighted sums for
FedAvg (they add up), or ``KeptUpdates`` for median or Krum (which do not decompose, so
combiners hand each accepted update up by reference and the controller sees them all).
The combiner receives the strategy object once per session; anything that changes from
round to round reaches the combiners as ``RoundPlan.params``.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np

if TYPE_CHECKING:
    from fedray.config import SessionConfig

Model = dict[str, np.ndarray]
Spec = Mapping[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)
Buffer = bytes | bytearray | memoryview | np.ndarray

BLOCK = 1 << 20  # elements per in-place block: bounds temporaries to a few MiB

P = TypeVar("P")  # a strategy's partial
R = TypeVar("R")  # what its reduce returns


# ------------------------------------------------------------------ snapshots and decisions


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """One online client as a combiner sees it: what selection may look at."""

    client_id: str
    combiner: str
    name: str = ""
    attrs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RoundContext:
    """What the controller knows when a round (or an attempt at it) starts."""

    session_id: str
    round: int
    attempt: int
    online: tuple[ClientInfo, ...]
    settings: SessionConfig
    seed: int  # derived from session.seed, the round and the attempt

    def by_combiner(self) -> dict[str, list[ClientInfo]]:
        out: dict[str, list[ClientInfo]] = {}
        for client in self.online:
            out.setdefault(client.combiner, []).append(client)
        return out


@dataclass(frozen=True, slots=True)
class RoundPlan:
    """What a round does: which clients each combiner asks, what they are sent."""

    clients: Mapping[str, tuple[str, ...]]  # combiner -> client ids
    config: Mapping[str, Any] = field(default_factory=dict)  # reaches every client's train
    params: Mapping[str, Any] = field(default_factory=dict)  # reaches every combiner's start
    buffer: int = 0  # close the round on its first K accepted updates, across combiners

    @property
    def asked(self) -> int:
        return sum(len(ids) for ids in self.clients.values())


@dataclass(frozen=True, slots=True)
class UpdateMeta:
    """What is known about an update once its bytes passed the runtime's checks."""

    client_id: str
    round: int  # the round (or, asynchronously, the model version) its task was for
    num_examples: int
    base_version: int = 0  # the model version it was trained from
    staleness: int = 0  # versions committed since then (0 in synchronous rounds)
    norm: float | None = None  # L2 norm of (update - base model), when it was computed
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str = ""  # a short stable code for a refusal ("stale", "norm", ...)
    detail: str = ""


ACCEPT = Verdict(True)


class CloseReason(enum.StrEnum):
    WAITING = "waiting"
    ALL_ANSWERED = "all_answered"  # every asked client answered or is gone
    DEADLINE = "deadline"
    BUFFER_FULL = "buffer_full"  # the first K updates arrived (session.buffer_size)


@dataclass(frozen=True, slots=True)
class ShareSnapshot:
    """One combiner's share of a round at one instant."""

    selected: int
    accepted: int
    settled: int  # answered in any way: accepted, rejected, failed, or gone offline
    buffer: int  # the round closes on its first K accepted updates; 0 = no buffer
    now: float
    deadline: float
    round_accepted: int = 0  # accepted across every combiner, as far as this one knows


def default_closing(s: ShareSnapshot) -> CloseReason:
    if s.buffer and max(s.accepted, s.round_accepted) >= s.buffer:
        return CloseReason.BUFFER_FULL
    if s.settled >= s.selected:
        return CloseReason.ALL_ANSWERED
    if s.now >= s.deadline:
        return CloseReason.DEADLINE
    return CloseReason.WAITING


# ------------------------------------------------------------------ updates and accumulators


@dataclass(frozen=True, slots=True)
class Update:
    """A checked update: read-only views into ``raw``, the safetensors bytes received."""

    model: Mapping[str, np.ndarray]
    meta: UpdateMeta
    raw: Buffer


Keeper = Callable[[Buffer], Any]  # keeps an update's bytes; returns a handle for the controller


@dataclass(frozen=True)
class ShareStart:
    """Everything an accumulator may use; built by the combiner (or the controller)."""

    spec: Spec
    base: Mapping[str, np.ndarray]  # the model this share's updates were trained from
    params: Mapping[str, Any] = field(default_factory=dict)  # RoundPlan.params
    keep: Keeper = bytes  # combiners keep updates in Ray's object store
    # Asynchronously, updates start from different versions: the model of each.
    base_of: Callable[[int], Mapping[str, np.ndarray]] | None = None


@dataclass
class Kept:
    """One update a combiner kept for the controller: its metadata and a handle to it."""

    meta: UpdateMeta
    handle: Any
    model: Mapping[str, np.ndarray] | None = None  # resolved on the controller before reduce


@dataclass
class KeptUpdates:
    """The partial of strategies that need every update (median, Krum, FedBuff...)."""

    items: list[Kept] = field(default_factory=list)


class Accumulator(ABC, Generic[P]):
    @abstractmethod
    def fold(self, update: Update) -> None:
        """Take one accepted update; it may be dropped (or kept by handle) afterwards."""

    @abstractmethod
    def partial(self) -> P:
        """What this share hands to the controller (picklable)."""


class KeepAll(Accumulator[KeptUpdates]):
    """Keeps every accepted update by handle: the memory lives in the object store."""

    def __init__(self, share: ShareStart) -> None:
        self.share = share
        self.kept = KeptUpdates()

    def fold(self, update: Update) -> None:
        self.kept.items.append(Kept(update.meta, self.share.keep(update.raw)))

    def partial(self) -> KeptUpdates:
        return self.kept


# ------------------------------------------------------------------ the contract


class Strategy(ABC, Generic[P, R]):
    """A federated strategy. Subclass it, name it in ``session.aggregator`` as
    ``package.module:Class``, and pass options through ``session.aggregator_kwargs``."""

    name: ClassVar[str] = ""
    keeps_updates: ClassVar[bool] = False  # partials hold every update (memory: see docs)
    asynchronous: ClassVar[bool] = False  # FedBuff-style: no rounds, a version every K updates
    needs_norm: ClassVar[bool] = False  # UpdateMeta.norm must be computed for accept/fold
    max_staleness: int = 0  # asynchronous: updates staler than this are dropped

    def __init__(self, **kwargs: object) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no options, got {sorted(kwargs)}")

    def check_settings(self, settings: SessionConfig) -> None:  # noqa: B027
        """Raise ValueError if the session settings cannot work with this strategy (e.g.
        ``min_clients`` too low for Krum's ``f``); called when the config is loaded."""

    # decisions

    def configure(self, ctx: RoundContext) -> RoundPlan:
        """Which clients to ask, and what to send them; session settings by default."""
        from fedray.strategies.selection import plan_round

        return plan_round(ctx)

    def accept(self, meta: UpdateMeta) -> Verdict:
        """Whether an update that passed the runtime's checks may be folded."""
        return ACCEPT

    def should_close(self, snapshot: ShareSnapshot) -> CloseReason:
        """Whether a combiner's share of the round may close now."""
        return default_closing(snapshot)

    # math

    @abstractmethod
    def start(self, share: ShareStart) -> Accumulator[P]:
        """A fresh accumulator for one combiner's share of a round."""

    @abstractmethod
    def reduce(self, partials: Sequence[P]) -> R:
        """Combine the partials of every combiner (only those that carry updates)."""

    @abstractmethod
    def finish(self, global_model: Mapping[str, np.ndarray], reduced: R) -> Model:
        """The next global model, with the same names, shapes and dtypes."""

    # server state

    def state_dict(self) -> Model:
        """Server-side state to persist with each committed round (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:  # noqa: B027
        """Restore what ``state_dict`` returned (nothing to do for stateless strategies)."""

    # what a commit reports (e.g. a privacy budget); numbers only

    def round_report(self) -> dict[str, float]:
        """Figures about the last ``finish`` worth tracking (e.g. ``epsilon``); the runner
        records numbers only, and a value that is not finite as None (null)."""
        return {}


class KeptStrategy(Strategy[KeptUpdates, Model]):
    """Base of strategies that look at every update together (robust aggregation).

    ``reduce`` receives the updates of all combiners at once, so the result equals the
    strategy over all clients in one tier, never an aggregate of per-combiner aggregates.
    """

    keeps_updates = True

    def start(self, share: ShareStart) -> Accumulator[KeptUpdates]:
        return KeepAll(share)

    def reduce(self, partials: Sequence[KeptUpdates]) -> Model:
        items = [k for p in partials for k in p.items]
        if not items:
            raise ValueError("no partial carries an update")
        if any(k.model is None for k in items):
            raise ValueError("kept updates must be resolved before reduce")
        items.sort(key=lambda k: k.meta.client_id)  # order-independent across combiners
        return self.aggregate([k.model for k in items], [k.meta for k in items])  # type: ignore[misc]

    @abstractmethod
    def aggregate(self, models: list[Mapping[str, np.ndarray]],
                  metas: list[UpdateMeta]) -> Model:
        """The aggregate of every accepted update of the round (float64 is fine)."""

    def finish(self, global_model: Mapping[str, np.ndarray], reduced: Model) -> Model:
        return cast_like(global_model, reduced)


# ------------------------------------------------------------------ numeric helpers


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
