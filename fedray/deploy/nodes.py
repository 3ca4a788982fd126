"""The Ray cluster's nodes, as the driver finds them, and the combiners put on them.

``snapshot`` reads the alive nodes (``ray.nodes()``) into the frozen ``NodeView`` values
the placement policy (``fedray.actors.placement``) decides over; ``place_combiners``
carries its decision out: a detached placement group named after the federation
(``<namespace>-combiners``), one bundle per combiner, strategy SPREAD or PACK, and each
combiner's Ray options that start it in its bundle. Ray keeps every bundle where it put
it, and when a node is lost it moves that node's bundles to nodes with room and restarts
their combiners there. ``release`` removes the group (at shutdown, and a group an earlier
run left). ``check_reach`` refuses a federation spread over several hosts whose tracking
or model store only one of them reaches (``fedray.deploy.reach``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import ray
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fedray.actors.hosting import alive_nodes
from fedray.actors.placement import NodeView, PlacementPlan, plan
from fedray.config import FederationConfig
from fedray.deploy import reach
from fedray.errors import ConfigError, TransportError

log = logging.getLogger(__name__)
READY_S = 60.0  # a feasible placement group is ready in about a second


class _Expected(logging.Filter):
    """Ray warns, for every combiner, that removing its placement group kills it for good:
    fedray removes the group only with the combiners, so that is what it wants."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "detached actor with a placement group" not in record.getMessage()


logging.getLogger("ray.actor").addFilter(_Expected())


def snapshot() -> tuple[NodeView, ...]:
    """The cluster's alive nodes, now."""
    return alive_nodes()


def check_reach(config: FederationConfig, nodes: tuple[NodeView, ...]) -> None:
    """Refuse (``ConfigError``) a multi-host cluster with single-host tracking or storage."""
    hosts = [n.address for n in nodes]
    found = reach.problems(config, hosts)
    if found:
        raise ConfigError(f"{config.source}: {'; and '.join(found)}")
    for warning in reach.warnings(config, hosts):
        log.warning("%s: %s", config.source, warning)


def checked_plan(config: FederationConfig, nodes: tuple[NodeView, ...]) -> PlacementPlan:
    """The policy's plan, or a ``ConfigError`` saying which setting to change."""
    c = config.combiners
    decided = plan(nodes, c.count, c.placement, c.resources)
    if decided.unplaced:
        asked = f"combiners.resources {c.resources}" if c.resources else "what a combiner takes"
        raise ConfigError(
            f"{config.source}: combiners.count is {c.count} but {decided.eligible} of the "
            f"cluster's {len(nodes)} nodes offer {asked}, with room for "
            f"{int(decided.room)}: start nodes that offer it (ray start --resources="
            "'{\"fedray_combiner\": 2}'), lower combiners.count or change combiners.resources")
    return decided


def group_name(config: FederationConfig) -> str:
    return f"{config.namespace}-combiners"


def release(config: FederationConfig) -> None:
    """Remove the federation's placement group, if there is one."""
    with contextlib.suppress(ValueError):  # none by that name
        remove_placement_group(get_placement_group(group_name(config)))


def place_combiners(config: FederationConfig) -> list[dict[str, Any]]:
    """Check, plan and reserve the combiners' places; their Ray options, in order."""
    nodes = snapshot()
    check_reach(config, nodes)
    decided = checked_plan(config, nodes)
    group = placement_group([dict(b) for b in decided.bundles], strategy=decided.strategy,
                            name=group_name(config), lifetime="detached")
    try:
        ray.get(group.ready(), timeout=READY_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise TransportError(
            f"Ray did not place the {config.combiners.count} combiners of "
            f"{config.federation} in {READY_S:.0f} s (bundles {dict(decided.bundles[0])} "
            f"each, {decided.strategy}): are the nodes that offer them busy?") from None
    log.info("combiners of %s in placement group %s (%s)", config.federation,
             group_name(config), decided.strategy)
    return [{"scheduling_strategy": PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=i)} for i in range(len(decided.bundles))]
