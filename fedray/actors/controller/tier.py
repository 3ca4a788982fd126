"""The elastic tier's mechanism: add a combiner actor at run time, and drain one away.

``add`` starts ``combiner-N`` (N one past the highest index the federation has used) as a
detached actor in the federation's namespace, with the deploy's settings, keys, TLS,
tracking and the compute packages the other combiners serve. A placement group cannot
grow, so an added combiner has no bundle: ``placement.choose_node`` picks its node by
``combiners.placement`` over the nodes and the combiners on them, and it is started
there with a hard node affinity (Ray 2.60 put soft-affine combiners on other nodes than
asked, two runs of two on a 3-node cluster) and ``combiners.resources`` as its own
resource demand. So an added combiner is pinned to its node: if that node is lost, it is
not recreated elsewhere (its clients rejoin the others through the gateway). When no
node has room, it is started without affinity, a resource demand Ray's autoscaler sees.
Once it serves, it joins the pool (the next round plans over it) and the gateway.

``drain`` takes a combiner out: out of the pool's set and the gateway's choices first
(no new client, no next round), then the combiner finishes its share of the round in
flight and sends every client back to the gateway (``fedray-rejoin: drain``); the next
round's planning waits until they have landed elsewhere (``GatewayServicer.expect``).
Once the round in flight has ended (its kept updates, which the combiner owns in the
object store, are read) and its clients are gone, the actor is stopped and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedray.actors.combiner.actor import Combiner
from fedray.actors.controller.gateway import GatewayServicer
from fedray.actors.controller.ray_pool import RayCombinerPool
from fedray.actors.hosting import alive_nodes, forwarded_env
from fedray.actors.placement import choose_node
from fedray.bridge.auth import BridgeKeys
from fedray.bridge.boundary import EventSink
from fedray.bridge.tls import ServerTls
from fedray.config import FederationConfig
from fedray.errors import TierError

log = logging.getLogger(__name__)

READY_S = 120.0  # an added combiner that is not serving by then is removed again
GONE_S = 30.0  # a drained combiner's clients have left by then (or are left behind)
POLL_S = 0.2  # how often a drain asks whether the drained combiner's clients are gone


@dataclass(frozen=True)
class TierChange:
    """One change of the tier, as events, metrics and `fedray status` tell it."""

    action: str  # "add" | "drain" | "removed" | "failed"
    combiner: str
    size: int  # combiners in the tier (not draining) after the change
    reason: str
    at: float  # wall-clock seconds
    node_ip: str = ""
    moved: int = 0  # clients a drain sent to the gateway


def index_of(name: str) -> int:
    tail = name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def actor_resources(need: dict[str, float]) -> dict[str, Any]:
    """``combiners.resources`` as Ray actor options (CPU, GPU and memory have their own)."""
    options: dict[str, Any] = {}
    custom = {}
    for name, amount in need.items():
        if name == "CPU":
            options["num_cpus"] = amount
        elif name == "GPU":
            options["num_gpus"] = amount
        elif name == "memory":
            options["memory"] = amount
        elif amount > 0:
            custom[name] = amount
    return {**options, **({"resources": custom} if custom else {})}


def known_combiners(namespace: str) -> list[str]:
    """The combiners running in the namespace now (a restarted controller's set: the tier
    may have changed since the driver started it), by index."""
    names = [e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
             if e["namespace"] == namespace and e["name"].startswith("combiner-")]
    return sorted(names, key=index_of)


class CombinerTier:
    def __init__(self, pool: RayCombinerPool, gateway: GatewayServicer, config: FederationConfig,
                 token: BridgeKeys | str | None, tracking_uri: str | None,
                 tls: ServerTls | None, on_event: EventSink,
                 round_over: Callable[[], Awaitable[None]],
                 on_change: Callable[[TierChange], None] = lambda change: None) -> None:
        self.pool, self.gateway, self.config = pool, gateway, config
        self.token, self.tracking_uri, self.tls = token, tracking_uri, tls
        self.on_event, self.round_over, self.on_change = on_event, round_over, on_change
        self.draining: dict[str, asyncio.Task[None]] = {}
        self.adding = 0
        self.started: set[str] = set()  # added here: stopped with the controller
        self.highest = max((index_of(n) for n in pool.names), default=-1)
        self.asked_node = ""  # the node the placement asked for the last combiner added
        # Where each combiner runs, as it said when it came up (Ray may move one when its
        # node is lost: then the placement of the next one is off by that one).
        self.nodes: dict[str, str] = {}

    @property
    def size(self) -> int:
        return len(self.pool.names)

    def _record(self, change: TierChange, level: str, message: str) -> None:
        self.on_event(level, message, combiner=change.combiner, action=change.action,
                      tier_size=change.size, reason=f"tier_{change.action}",
                      why=change.reason, moved=change.moved)
        self.on_change(change)

    async def _placement(self) -> dict[str, Any]:
        """Ray options that put one more combiner where ``combiners.placement`` says."""
        c = self.config.combiners
        nodes = await asyncio.to_thread(alive_nodes)
        unknown = [n for n in self.pool.names if n not in self.nodes]
        infos = await asyncio.gather(*(self.pool.call(n, "info") for n in unknown),
                                     return_exceptions=True)
        for name, info in zip(unknown, infos, strict=True):
            if isinstance(info, dict) and info.get("node_id"):
                self.nodes[name] = info["node_id"]
        running: dict[str, int] = {}
        for name in self.pool.names:
            if name in self.nodes:
                running[self.nodes[name]] = running.get(self.nodes[name], 0) + 1
        node = choose_node(nodes, running, c.placement, c.resources)
        self.asked_node = node or ""
        where: dict[str, Any] = actor_resources(dict(c.resources))
        if node is not None:
            where["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)  # pinned: docstring
        return where

    async def _packages(self) -> dict[str, bytes]:
        for name in self.pool.names:
            with contextlib.suppress(Exception):
                return await self.pool.call(name, "served_packages")
        return {}

    async def add(self, reason: str) -> TierChange:
        """Start one more combiner and put it in the tier (see the module docstring)."""
        c = self.config.combiners
        self.highest += 1
        index, self.adding = self.highest, self.adding + 1
        name = f"combiner-{index}"
        try:
            where, packages = await self._placement(), await self._packages()
            newest = next(reversed(packages.items())) if packages else None
            handle = Combiner.options(
                name=name, namespace=self.config.namespace, lifetime="detached",
                runtime_env={"env_vars": forwarded_env()}, **where).remote(
                name, self.config.federation, c, c.base_port + index if c.base_port else 0,
                self.token, self.tracking_uri, self.config.tracking.database, newest,
                tls=self.tls)
            self.started.add(name)
            try:
                info = await asyncio.wait_for(handle.ready.remote(), READY_S)
                for sha256, data in packages.items():
                    await handle.add_package.remote(sha256, data)
            except Exception as exc:  # noqa: BLE001 - any failure: the combiner goes again
                self.started.discard(name)
                with contextlib.suppress(Exception):
                    ray.kill(handle, no_restart=True)
                what = "did not serve in time" if isinstance(exc, TimeoutError) else \
                    f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                change = TierChange("failed", name, self.size, reason, time.time())
                self._record(change, "error", f"tier: adding {name} {what}; the tier stays at "
                             f"{self.size} (check combiners.resources and the nodes' room, "
                             "and combiners.base_port)")
                raise TierError(f"adding {name} {what}") from None
        finally:
            self.adding -= 1
        self.pool.add(name, handle)
        self.nodes[name] = info.get("node_id", "")
        self.gateway.refresh()
        change = TierChange("add", name, self.size, reason, time.time(), info.get("node_ip", ""))
        self._record(change, "info", f"tier: added {name} at {info['address']} on node "
                     f"{info.get('node_id', '?')[:8]}@{info.get('node_ip', '?')} (placement "
                     f"asked {self.asked_node[:8] or 'any'}): {self.size} combiner(s) now "
                     f"({reason})")
        return change

    def drain(self, name: str, reason: str) -> asyncio.Task[None]:
        """Take ``name`` out of the tier, in the background (see the module docstring)."""
        if name not in self.draining:
            self.pool.retire(name)
            self.gateway.refresh()
            self.draining[name] = asyncio.ensure_future(self._drain(name, reason))
        return self.draining[name]

    async def _drain(self, name: str, reason: str) -> None:
        self._record(TierChange("drain", name, self.size, reason, time.time()), "info",
                     f"tier: draining {name}: {self.size} combiner(s) take new clients and "
                     f"rounds ({reason})")
        moved = 0
        try:
            ids = await self.pool.call(name, "drain")
            moved = len(ids)
            self.gateway.expect(ids)
            await self.round_over()  # the round it took part in has read what it kept
            deadline = time.monotonic() + GONE_S
            while time.monotonic() < deadline:
                info = await self.pool.call(name, "info")
                if not info["load"]:
                    break
                await asyncio.sleep(POLL_S)
        except Exception as exc:  # noqa: BLE001 - the combiner goes anyway
            self.on_event("warning", f"tier: draining {name} failed ({type(exc).__name__}: "
                          f"{str(exc).strip()[:200]}); it is removed anyway and its clients "
                          "rejoin through the gateway", combiner=name, reason="tier_trouble")
        finally:
            await self._remove(name)
            self.draining.pop(name, None)
        self._record(TierChange("removed", name, self.size, reason, time.time(), moved=moved),
                     "info", f"tier: removed {name} after sending {moved} client(s) to the "
                     f"gateway: {self.size} combiner(s) now")

    async def _remove(self, name: str) -> None:
        try:
            handle = self.pool.handle(name)
        except ValueError:
            handle = None  # gone already
        if handle is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(handle.stop.remote(), 10.0)
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        self.pool.forget(name)
        self.nodes.pop(name, None)
        self.started.discard(name)
        self.gateway.refresh()

    async def stop(self) -> None:
        """Stop the combiners added here (the driver stops the ones it started)."""
        for task in self.draining.values():
            task.cancel()
        names = sorted(self.started)
        await asyncio.gather(*(asyncio.wait_for(self.pool.call(n, "stop"), 10.0)
                               for n in names), return_exceptions=True)
