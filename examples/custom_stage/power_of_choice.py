"""Power-of-choice selection (Cho, Wang & Joshi, AISTATS 2022): train where the loss is.

FedAvg picks the clients of a round uniformly. Power-of-choice asks more candidates than
it needs how well the current model fits their data, and trains only the worst fitted:
it converges faster on skewed data, at the price of one extra, cheap stage per round.
Name it in a federation config and ship it with the job:

    session:
      aggregator: examples.custom_stage.power_of_choice:PowerOfChoice
      aggregator_kwargs: {candidates: 2.0}

What it declares and decides (docs/strategies.md walks through it):

- ``declare``: a stage of its own, ``probe``, before training: a task of kind VALIDATE on
  the round's model, so every client's existing validate answers it (no client half);
  then train, then validation of the committed model, as FedAvg.
- ``configure``: ``d = candidates x m`` clients sampled uniformly, where ``m`` is the
  round's usual count (``session.clients_per_round``): the probe's cohort.
- ``plan_stage(train)``: the ``m`` candidates whose probe reported the highest ``metric``
  (``loss``); a candidate that did not answer is not trained.
- everything else is FedAvg: the weighted mean of the trained clients' models.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

from fedray.messages import TaskKind
from fedray.strategies import (
    TRAIN,
    VALIDATE,
    Declaration,
    RoundContext,
    RoundPlan,
    RoundState,
    Stage,
)
from fedray.strategies.fedavg import FedAvg
from fedray.strategies.selection import clients_wanted, eligible

PROBE = Stage(TaskKind.VALIDATE, name="probe")


class PowerOfChoice(FedAvg):
    """Options: ``candidates`` (d/m, at least 1: how many more clients are probed than
    trained; 2 by default) and ``metric`` (the probe's metric to rank by, highest first)."""

    name = "power_of_choice"

    def __init__(self, candidates: float = 2.0, metric: str = "loss") -> None:
        super().__init__()
        if isinstance(candidates, bool) or not isinstance(candidates, int | float) \
                or not (math.isfinite(candidates) and candidates >= 1):
            raise ValueError(f"candidates must be a number >= 1, got {candidates!r}")
        self.candidates = float(candidates)
        self.metric = str(metric)

    def declare(self) -> Declaration:
        return Declaration(stages=(PROBE, TRAIN, VALIDATE))

    def _wanted(self, ctx: RoundContext) -> tuple[list, int]:
        """The eligible clients, and ``m``: how many a round of FedAvg would train."""
        s = ctx.settings
        pool = eligible(ctx.online, s.select)
        return pool, clients_wanted(s.clients_per_round, len(pool), s.min_clients, s.over_select)

    def configure(self, ctx: RoundContext) -> RoundPlan:
        pool, m = self._wanted(ctx)
        d = min(len(pool), math.ceil(m * self.candidates))
        ordered = sorted(pool, key=lambda c: (c.client_id, c.combiner))
        chosen = random.Random(ctx.seed).sample(ordered, d)
        clients: dict[str, list[str]] = {c.combiner: [] for c in ctx.online}
        for client in sorted(chosen, key=lambda c: c.client_id):
            clients[client.combiner].append(client.client_id)
        return RoundPlan(clients={k: tuple(v) for k, v in clients.items()},
                         config=dict(ctx.settings.round_config))

    def plan_stage(self, stage: Stage, state: RoundState) -> RoundPlan:
        if stage.kind is not TaskKind.TRAIN:
            return super().plan_stage(stage, state)  # the probe: every candidate
        _, m = self._wanted(state.ctx)
        probed = state.replies.get(PROBE.name, {})
        ranked = sorted(probed.values(),
                        key=lambda r: (-float(r.metrics.get(self.metric, -math.inf)),
                                       r.client_id))
        worst = {r.client_id for r in ranked[:m]}
        return replace(state.plan.only(worst), config=dict(state.plan.config))
