"""The rebalancer: carries out ``balance.plan_moves`` for the controller, once a second.

Each tick takes a fresh snapshot of the combiners' loads through the gateway (so clients
assigned or moved a moment ago count where they are going), asks the pure policy which
combiners should hand how many clients to which, and asks each donor to release that
many of its idle clients. The donor picks them (``balance.movable_ids``: no client holding
a task, none that just arrived, none while a round is being planned) and ends their task
streams with ``fedray-rejoin: rebalance``; the gateway sends each of them to the planned
combiner when it asks again. Churn is bounded by ``combiners.rebalance_max_moves_per_s``
(a token bucket of one second), and a client moves at most once per
``combiners.rebalance_settle_s``. A combiner Ray restarted comes back empty and gets its
share back this way, a few clients a second, as they rejoin.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fedray.actors.balance import plan_moves, spread
from fedray.actors.controller.gateway import GatewayServicer
from fedray.actors.controller.pool import CombinerPool
from fedray.bridge.boundary import EventSink, log_event
from fedray.config import CombinersConfig

log = logging.getLogger(__name__)

TICK_S = 1.0


class Rebalancer:
    def __init__(self, pool: CombinerPool, gateway: GatewayServicer, settings: CombinersConfig,
                 on_event: EventSink = log_event) -> None:
        self.pool = pool
        self.gateway = gateway
        self.settings = settings
        self.on_event = on_event
        self.moved = 0  # clients sent elsewhere since the start
        self._tokens = 0.0
        self._last = time.monotonic()

    def _budget(self) -> int:
        """Moves allowed now: ``rebalance_max_moves_per_s`` accrued, at most a second's."""
        rate = self.settings.rebalance_max_moves_per_s
        now = time.monotonic()
        self._tokens = min(max(rate, 1.0), self._tokens + rate * (now - self._last))
        self._last = now
        return int(self._tokens)

    async def tick(self) -> int:
        """One look at the loads and the moves it calls for; how many clients moved."""
        budget = self._budget()
        if budget <= 0 or len(self.pool.names) < 2:
            return 0
        loads, counts = await self.gateway.view(fresh=True)
        if spread(counts) <= self.settings.rebalance_tolerance:
            return 0
        moves = plan_moves(counts, {n: load.movable for n, load in loads.items()},
                           self.settings.max_clients, budget, self.settings.rebalance_tolerance)
        moved = 0
        for move in moves:
            ids = await self.pool.release(move.source, move.count,
                                          self.settings.rebalance_settle_s)
            # counts belongs to this loads snapshot: Assigns since have kept it current
            self.gateway.reserve(ids, move.target, loads, counts)
            moved += len(ids)
            if ids:
                self.on_event("info", f"rebalance: {len(ids)} client(s) move from "
                              f"{move.source} to {move.target} (expected loads now "
                              f"{dict(sorted(counts.items()))})", source=move.source,
                              target=move.target, moved=len(ids), reason="rebalance")
        self._tokens -= moved
        self.moved += moved
        return moved

    async def run(self) -> None:
        """Tick until cancelled; a tick that fails (a combiner restarting) is logged."""
        if self.settings.rebalance_max_moves_per_s <= 0:
            return
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next tick looks again
                log.info("rebalance tick failed: %s: %s", type(exc).__name__, exc)
