"""The strategy contract: one object per session owns a round's decisions and its math.

Policies decide, actors act. A strategy never does I/O and never sees Ray or gRPC; the
session runner (controller) and the combiners call it and carry out what it returns.

What the runtime must do for it, read once per session:

    declare() -> Declaration                      stages, update layout, kept updates,
                                                  asynchronous serving, the client half

Decisions, each over a frozen snapshot:

    configure(ctx: RoundContext) -> RoundPlan     controller, once per round attempt:
                                                  the cohort, with the train stage's config
    plan_stage(stage, state: RoundState)          controller, before each stage: who gets
        -> RoundPlan                              which config and payload
    accept(meta: UpdateMeta) -> Verdict           combiner, for each update that passed the
                                                  runtime's checks (layout, bounds)
    weigh(meta: UpdateMeta) -> Staleness          controller, asynchronous: fold (weight) or drop
    should_close(s: ShareSnapshot) -> CloseReason combiner, whenever its share changes
    check_settings(settings: SessionConfig)       config load: ValueError if they cannot work

Math:

    start(share: ShareStart) -> Accumulator       combiner, once per share of a round
        acc.fold(update: Update)                  per accepted update (then dropped)
        acc.partial() -> P                        the strategy's own partial type
    reduce_round(partials, state) -> R            controller: across combiners (default:
                                                  reduce(partials); override to read what
                                                  earlier stages replied)
    finish(global_model, reduced: R) -> Model     controller: the next global model
    state_dict() / load_state_dict(state)         server state saved with every commit

The combiner receives the strategy object once per session; anything that changes from
round to round reaches the combiners as ``RoundPlan.params``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Generic, TypeVar

import numpy as np

from fedray.config import SessionConfig
from fedray.messages import TaskKind
from fedray.strategies.declaration import Declaration, Stage, When
from fedray.strategies.numeric import Model, cast_like
from fedray.strategies.selection import plan_round
from fedray.strategies.snapshots import (
    ACCEPT,
    CloseReason,
    RoundContext,
    RoundPlan,
    RoundState,
    ShareSnapshot,
    Staleness,
    UpdateMeta,
    Verdict,
    default_closing,
)
from fedray.strategies.updates import Accumulator, KeepAll, KeptUpdates, ShareStart

P = TypeVar("P")  # a strategy's partial
R = TypeVar("R")  # what its reduce returns


class Strategy(ABC, Generic[P, R]):
    """A federated strategy. Subclass it, name it in ``session.aggregator`` as
    ``package.module:Class``, and pass options through ``session.aggregator_kwargs``."""

    name: ClassVar[str] = ""
    # Values a config error shows, in a --set that works, for options without a default
    # that were not given (else a placeholder of the option's annotated type).
    option_examples: ClassVar[Mapping[str, object]] = {}

    def __init__(self, **kwargs: object) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no options, got {sorted(kwargs)}")

    def declare(self) -> Declaration:
        """What the runtime does for this strategy: train then validate, updates checked
        against the global model's layout, sums (not kept updates), rounds, no client half."""
        return Declaration()

    def check_settings(self, settings: SessionConfig) -> None:  # noqa: B027
        """Raise ValueError if the session settings cannot work with this strategy (e.g.
        ``min_clients`` too low for Krum's ``f``); called when the config is loaded."""

    # decisions

    def configure(self, ctx: RoundContext) -> RoundPlan:
        """Which clients to ask, and what to send them; session settings by default."""
        return plan_round(ctx)

    def plan_stage(self, stage: Stage, state: RoundState) -> RoundPlan:
        """Who runs ``stage``, with which config and payloads. By default: before the
        commit, the round's plan, less the clients that did not answer an earlier stage;
        after it, every client online then (``state.ctx.online``), with no config. A stage
        after train (before the commit) asks only clients whose update was folded."""
        if stage.when is When.COMMITTED:
            return RoundPlan(clients={combiner: tuple(c.client_id for c in clients)
                                      for combiner, clients in state.ctx.by_combiner().items()})
        answered = [set(replies) for replies in state.replies.values()]
        if state.trained_ids is not None:
            answered.append(set(state.trained_ids))
        plan = state.plan if not answered else state.plan.only(set.intersection(*answered))
        return plan if stage.kind is TaskKind.TRAIN else RoundPlan(
            clients=plan.clients, config=plan.config, payloads=plan.payloads)

    def accept(self, meta: UpdateMeta) -> Verdict:
        """Whether an update that passed the runtime's checks may be folded."""
        return ACCEPT

    def weigh(self, meta: UpdateMeta) -> Staleness:
        """Asynchronously: fold an update (with a weight on its examples) or drop it, by
        ``meta.staleness``. Every update counts fully by default."""
        return Staleness()

    def should_close(self, snapshot: ShareSnapshot) -> CloseReason:
        """Whether a combiner's share of a stage may close now."""
        return default_closing(snapshot)

    # math

    @abstractmethod
    def start(self, share: ShareStart) -> Accumulator[P]:
        """A fresh accumulator for one combiner's share of a round."""

    @abstractmethod
    def reduce(self, partials: Sequence[P]) -> R:
        """Combine the partials of every combiner (only those that carry updates)."""

    def reduce_round(self, partials: Sequence[P], state: RoundState) -> R:
        """``reduce``, with the round's state at hand: a strategy whose stages after
        train return what the reduction needs (secure aggregation's unmasking) reads
        ``state.replies`` here."""
        return self.reduce(partials)

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

    def declare(self) -> Declaration:
        return Declaration(keeps_updates=True)

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
