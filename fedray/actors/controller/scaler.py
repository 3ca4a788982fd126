"""The elastic tier's loop: snapshot the clients per combiner, ask the policy, act.

Every ``combiners.scale_interval_s`` the scaler asks each combiner (draining ones too)
how many clients it has, gives that ``TierSnapshot`` to ``fedray.actors.scaling.decide``
and carries the decision out through ``CombinerTier`` (add, or drain in the background).
It holds while a combiner is being added, and while an asynchronous session runs (its
loop keeps one stream per combiner for the whole session; the tier changes between
sessions then). Every change is an event (the tier's), a Ray metric (``TierMetrics``) and
the "tier" line of `fedray status` (``describe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from fedray.actors.controller.callbacks import SessionStatus
from fedray.actors.controller.tier import CombinerTier, TierChange
from fedray.actors.metrics import TierMetrics
from fedray.actors.scaling import Action, ScalingDecision, ScalingRules, TierSnapshot, decide
from fedray.config import CombinersConfig
from fedray.errors import TierError
from fedray.states import SessionState

log = logging.getLogger(__name__)

IN_FLIGHT = {"running", "reducing", "validating"}  # SessionStatus.round_state of a live round


def rules_of(settings: CombinersConfig) -> ScalingRules:
    low = settings.min or settings.count
    return ScalingRules(min=low, max=max(low, settings.max or low),
                        clients_per_combiner=settings.clients_per_combiner,
                        cooldown_s=settings.scale_cooldown_s)


def paused_by(status: SessionStatus | None) -> str:
    """Why the tier must not change now ("" when it may)."""
    if status is not None and status.mode != "sync" and not SessionState(status.state).terminal:
        return "an asynchronous session runs"
    return ""


async def round_over(status_of: Callable[[], SessionStatus | None], changed: asyncio.Condition,
                     timeout_s: float) -> None:
    """Until the round in flight now (if any) has ended, or ``timeout_s``."""
    def mark() -> tuple[str, int] | None:
        s = status_of()
        if s is None or SessionState(s.state).terminal or s.round_state not in IN_FLIGHT:
            return None
        return s.session_id, s.round

    first = mark()
    deadline = time.monotonic() + timeout_s
    async with changed:
        while first is not None and mark() == first and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), deadline - time.monotonic())


class Scaler:
    def __init__(self, tier: CombinerTier, settings: CombinersConfig,
                 paused: Callable[[], str], metrics: TierMetrics | None = None) -> None:
        self.tier = tier
        self.rules = rules_of(settings)
        self.interval_s = settings.scale_interval_s
        self.paused = paused
        self.metrics = metrics
        self.last: TierChange | None = None
        self.last_change_at: float | None = None  # monotonic: the policy's cooldown
        self.decided: ScalingDecision | None = None
        tier.on_change = self.changed
        if metrics is not None:
            metrics.size.set(tier.size)

    def changed(self, change: TierChange) -> None:
        self.last = change
        if change.action in ("add", "drain"):
            self.last_change_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.changed(change.action, change.size)

    async def snapshot(self) -> TierSnapshot:
        names = [*self.tier.pool.names, *self.tier.draining]
        infos = await asyncio.gather(*(self.tier.pool.call(n, "info") for n in names),
                                     return_exceptions=True)
        # a combiner Ray is restarting counts, with no clients: it comes back
        clients = {n: (i["load"] if isinstance(i, dict) else 0)
                   for n, i in zip(names, infos, strict=True)}
        return TierSnapshot(clients, time.monotonic(), self.last_change_at,
                            frozenset(self.tier.draining))

    async def tick(self) -> ScalingDecision | None:
        """One look and what it called for (None: held without asking the policy)."""
        if self.tier.adding or self.paused():
            return None
        decision = self.decided = decide(await self.snapshot(), self.rules)
        if decision.action is Action.ADD:
            for _ in range(decision.add):
                try:
                    await self.tier.add(decision.reason)
                except TierError:
                    break  # said as an event; the next tick looks again
        elif decision.action is Action.DRAIN:
            for name in decision.drain:
                self.tier.drain(name, decision.reason)
        return decision

    async def run(self) -> None:
        """Tick until cancelled; a tick that fails (a combiner restarting) is logged."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next tick looks again
                log.info("scaling tick failed: %s: %s", type(exc).__name__, exc)

    def describe(self) -> dict[str, Any]:
        """The tier for `fedray status`: its size, bounds, what drains and the last change."""
        r = self.rules
        return {"size": self.tier.size, "min": r.min, "max": r.max,
                "clients_per_combiner": r.clients_per_combiner,
                "draining": sorted(self.tier.draining), "adding": self.tier.adding,
                "last_change": dataclasses.asdict(self.last) if self.last else None,
                "decision": self.decided.reason if self.decided else ""}
