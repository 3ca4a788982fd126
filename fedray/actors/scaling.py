"""How many combiners the tier should have: the pure scaling policy, over a frozen snapshot.

``combiners: {min, max, clients_per_combiner}`` bound the tier and set its target load.
``decide`` reads a ``TierSnapshot`` (connected clients per combiner, the combiners being
drained, the time and the time of the last change) and returns a ``ScalingDecision``:
hold, add N combiners, or drain these ones. It is built not to flap:

- **hysteresis**: it adds when the clients exceed ``scale_up_at`` x target per combiner,
  and drains only when they would fit in fewer combiners at ``scale_down_at`` x target
  (0.5 by default), so the tier it grows to is never small enough to shrink at once;
- **cooldown**: after a change it holds for ``cooldown_s``, except to get back within
  ``min``..``max``;
- one drain at a time: while a combiner drains, it drains no other.

Drained first are the least loaded combiners (the newest among equals: their names sort
last). Nothing here acts; the controller will carry decisions out (not wired yet). The
shape is ``balance.py``'s: tested with ``parametrize``, without Ray.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field


class Action(enum.Enum):
    HOLD = "hold"
    ADD = "add"
    DRAIN = "drain"


@dataclass(frozen=True)
class ScalingRules:
    min: int
    max: int
    clients_per_combiner: int
    scale_up_at: float = 1.0
    scale_down_at: float = 0.5
    cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.max:
            raise ValueError(f"need 1 <= min <= max, got min {self.min}, max {self.max}")
        if self.clients_per_combiner < 1:
            raise ValueError("clients_per_combiner must be at least 1")
        if not 0 < self.scale_down_at < self.scale_up_at:
            raise ValueError("need 0 < scale_down_at < scale_up_at (the hysteresis band)")


@dataclass(frozen=True)
class TierSnapshot:
    clients: Mapping[str, int]  # connected clients per combiner, draining ones too
    now: float
    last_change: float | None = None  # when the tier last added or drained
    draining: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class ScalingDecision:
    action: Action
    target: int  # the combiners (not draining) the tier will have
    add: int = 0
    drain: tuple[str, ...] = ()
    reason: str = ""


def _order(name: str) -> tuple[int, str]:
    tail = name.rpartition("-")[2]
    return (int(tail) if tail.isdigit() else -1, name)


def _drained(snapshot: TierSnapshot, active: list[str], count: int) -> tuple[str, ...]:
    ranked = sorted(active, key=lambda n: (snapshot.clients[n], -_order(n)[0], n))
    return tuple(ranked[:count])


def decide(snapshot: TierSnapshot, rules: ScalingRules) -> ScalingDecision:
    """Hold, add or drain (see the module's docstring)."""
    active = [n for n in snapshot.clients if n not in snapshot.draining]
    n, total = len(active), sum(snapshot.clients.values())
    if n < rules.min:
        return ScalingDecision(Action.ADD, rules.min, add=rules.min - n,
                               reason=f"{n} combiners, fewer than min {rules.min}")
    if n > rules.max:
        return ScalingDecision(Action.DRAIN, rules.max, drain=_drained(snapshot, active,
                                                                       n - rules.max),
                               reason=f"{n} combiners, more than max {rules.max}")
    cooling = snapshot.last_change is not None and \
        snapshot.now - snapshot.last_change < rules.cooldown_s
    up = rules.clients_per_combiner * rules.scale_up_at
    down = rules.clients_per_combiner * rules.scale_down_at
    if total > n * up and n < rules.max:
        target = min(rules.max, math.ceil(total / up))
        if cooling:
            return ScalingDecision(Action.HOLD, n, reason="cooling down after a change")
        return ScalingDecision(Action.ADD, target, add=target - n,
                               reason=f"{total} clients over {n} x {up:g}")
    if n > rules.min and total <= (n - 1) * down:
        target = max(rules.min, math.ceil(total / down))
        if cooling or snapshot.draining:
            why = "cooling down after a change" if cooling else "a combiner is draining"
            return ScalingDecision(Action.HOLD, n, reason=why)
        return ScalingDecision(Action.DRAIN, target, drain=_drained(snapshot, active, n - target),
                               reason=f"{total} clients fit {target} x {down:g}")
    return ScalingDecision(Action.HOLD, n, reason="within the band")
