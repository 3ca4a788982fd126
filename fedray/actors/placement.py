"""Where combiners run: the pure placement policy, over a frozen snapshot of Ray's nodes.

``combiners.placement`` is ``spread`` (the default: one combiner per node while there
are nodes to spare, then round again) or ``pack`` (as few nodes as hold them all).
``combiners.resources`` (e.g. ``{"fedray_combiner": 1}``, which an operator gives only the
nodes reserved for combiners) is what each combiner takes of a node: only nodes that
offer all of it are eligible, and a node holds as many combiners as its totals allow.

The decision is a ``PlacementPlan``: one Ray placement-group bundle per combiner, the
group's strategy (``SPREAD``/``PACK``), and how many combiners the cluster's nodes hold,
so a plan that cannot fit is refused at start instead of waiting forever. A bundle must
ask for something; with no ``combiners.resources`` each asks ``MARKER`` (1 MiB of Ray's
``memory`` resource, which every node has plenty of). ``fedray.deploy.nodes`` creates
the group and starts each combiner in its bundle: Ray then keeps a bundle's place, and
moves the bundle (and restarts its combiner) when its node is lost. No Ray here.

A placement group cannot grow, so a combiner the elastic tier adds at run time gets no
bundle: ``choose_node`` picks its node by the same rule (spread: the eligible node that
runs the fewest combiners; pack: the one that runs the most and still has room), and the
controller starts it there (a hard node affinity) with the same resources.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SPREAD, PACK = "spread", "pack"
PLACEMENTS = (SPREAD, PACK)
MARKER = {"memory": float(1 << 20)}  # a combiner's bundle when it asks no resource


@dataclass(frozen=True)
class NodeView:
    """One alive Ray node as the policy sees it: its id, IP and total resources."""

    node_id: str
    address: str
    resources: Mapping[str, float] = field(default_factory=dict)
    head: bool = False


@dataclass(frozen=True)
class PlacementPlan:
    """One bundle per combiner, the placement group's strategy, and the room there is."""

    strategy: str  # Ray's placement-group strategy: "SPREAD" or "PACK"
    bundles: tuple[Mapping[str, float], ...]
    room: float  # how many such bundles the cluster's nodes hold (inf: no limit)
    eligible: int  # nodes that hold at least one

    @property
    def unplaced(self) -> int:
        """Combiners for which no node has room."""
        return max(0, len(self.bundles) - int(min(self.room, len(self.bundles))))


def bundle(need: Mapping[str, float]) -> dict[str, float]:
    """What one combiner's bundle asks: ``need``'s positive amounts, else ``MARKER``."""
    asked = {name: float(amount) for name, amount in need.items() if amount > 0}
    return asked or dict(MARKER)


def capacity(node: NodeView, asked: Mapping[str, float]) -> float:
    """How many bundles ``asked`` fit on ``node`` by its totals."""
    fits = math.inf
    for name, amount in asked.items():
        fits = min(fits, math.floor(node.resources.get(name, 0.0) / amount + 1e-9))
    return fits


def plan(snapshot: Sequence[NodeView], count: int, mode: str,
         need: Mapping[str, float]) -> PlacementPlan:
    """The placement of ``count`` combiners that each take ``need`` (see the docstring)."""
    if mode not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {mode!r}")
    asked = bundle(need)
    fits = [capacity(n, asked) for n in snapshot]
    return PlacementPlan(strategy=mode.upper(), bundles=tuple(dict(asked) for _ in range(count)),
                         room=sum(fits), eligible=sum(1 for f in fits if f >= 1))


def choose_node(snapshot: Sequence[NodeView], running: Mapping[str, int], mode: str,
                need: Mapping[str, float]) -> str | None:
    """The node for one more combiner, given how many run on each node (``running``, by
    node id): the eligible node with room that runs the fewest (``spread``) or the most
    (``pack``), ties to the lowest id; None when no node has room."""
    if mode not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {mode!r}")
    asked = bundle(need)
    room = [n for n in snapshot if capacity(n, asked) - running.get(n.node_id, 0) >= 1]
    if not room:
        return None
    sign = 1 if mode == SPREAD else -1
    return min(room, key=lambda n: (sign * running.get(n.node_id, 0), n.node_id)).node_id
