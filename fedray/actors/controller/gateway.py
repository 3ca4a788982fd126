"""The gateway: client discovery, hosted by the controller (``Gateway.Assign``).

A client asks which combiner to join; the gateway asks the pool for the combiners' loads
(at most once a second, however many clients ask) and answers with the least loaded one
that has room (``policy.pick_combiner``), avoiding the one the client just left. A load
counts the clients assigned there that have not joined yet, each once
(``balance.expected_loads``), so clients that start together spread within one. A client
the rebalancer moved (``reserve``) is sent where the move was planned to.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import grpc

from fedray.actors.balance import CombinerLoad, Pending, expected_loads
from fedray.actors.controller.policy import pick_combiner
from fedray.actors.controller.pool import CombinerPool
from fedray.bridge.boundary import Boundary, EventSink, guard_rpcs, log_event
from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.server import caller_id


@guard_rpcs
class GatewayServicer(pb_grpc.GatewayServicer):
    """Client discovery. An assignment counts towards its combiner's load until the
    client shows up there (or ``RECENT_S`` passed), so a burst of clients starting
    together is spread instead of piling onto the combiner that was least loaded a moment
    ago. An unexpected exception in a handler is an error event (``on_event``: the
    controller's observer) and INTERNAL with a ref."""

    RECENT_S = 5.0  # an assigned client that has not joined by then is not coming
    LOADS_S = 1.0  # combiners' loads are asked at most this often, however many clients ask

    def __init__(self, pool: CombinerPool, max_clients: int,
                 on_event: EventSink = log_event, settle_s: float = 5.0) -> None:
        self.pool = pool
        self.max_clients = max_clients
        self.settle_s = settle_s  # passed on: how long a joined client stays put
        self.boundary = Boundary("the gateway", on_event)
        self.pending: OrderedDict[str, Pending] = OrderedDict()  # oldest first
        self.reserved: dict[str, Pending] = {}  # moved clients: where the move planned them
        self.moving: dict[str, float] = {}  # moved clients not seen joined anywhere yet
        self._loads: tuple[float, asyncio.Future] | None = None
        self._counted: tuple[object, dict[str, int]] | None = None

    def _fetch(self, fresh: bool = False) -> asyncio.Future:
        now = time.monotonic()
        if fresh or self._loads is None or now - self._loads[0] > self.LOADS_S \
                or (self._loads[1].done() and self._loads[1].exception() is not None):
            self._loads = (now, asyncio.ensure_future(
                self.pool.balance(self.RECENT_S, self.settle_s)))
        return self._loads[1]

    async def loads(self, fresh: bool = False) -> dict[str, CombinerLoad]:
        """The combiners' loads, shared by every Assign within ``LOADS_S`` (one Ray call
        per combiner per Assign let a burst of clients flood the combiners)."""
        return await asyncio.shield(self._fetch(fresh))

    async def view(self, fresh: bool = False) -> tuple[dict[str, CombinerLoad], dict[str, int]]:
        """(loads, expected clients per combiner): counted once per loads snapshot, then
        kept up to date by every assignment until the next one."""
        loads = await self.loads(fresh)
        if self._counted is None or self._counted[0] is not loads:
            now = time.monotonic()
            for book, keep_s in ((self.pending, self.RECENT_S), (self.reserved, 2 * self.RECENT_S)):
                for client_id in [c for c, p in book.items() if now - p.at >= keep_s]:
                    del book[client_id]
            self._counted = (loads, expected_loads(loads, self.pending, now, self.RECENT_S))
        return loads, self._counted[1]

    def _uncount(self, client_id: str, loads: dict[str, CombinerLoad],
                 counts: dict[str, int]) -> None:
        """Forget the client's earlier assignment, and its place in ``counts``."""
        old = self.pending.pop(client_id, None)
        if old is not None and old.combiner in counts \
                and client_id not in loads[old.combiner].joined \
                and time.monotonic() - old.at < self.RECENT_S:
            counts[old.combiner] -= 1

    def _count(self, client_id: str, combiner: str, counts: dict[str, int]) -> None:
        self.pending[client_id] = Pending(combiner, time.monotonic())
        if combiner in counts:
            counts[combiner] += 1

    def reserve(self, client_ids: list[str], combiner: str,
                loads: dict[str, CombinerLoad], counts: dict[str, int]) -> None:
        """The rebalancer moved these clients: count them at ``combiner`` now, and send
        them there when they ask."""
        now = time.monotonic()
        for client_id in client_ids:
            self._uncount(client_id, loads, counts)
            self._count(client_id, combiner, counts)
            self.reserved[client_id] = Pending(combiner, now)
            self.moving[client_id] = now

    def refresh(self) -> None:
        """The combiner set changed: the next Assign asks the loads afresh."""
        self._loads = None

    def expect(self, client_ids: list[str]) -> None:
        """These clients were sent back to ask again (a drained combiner's): a round's
        planning waits for them to land (``landed``), wherever Assign then sends them."""
        now = time.monotonic()
        for client_id in client_ids:
            self.moving[client_id] = now

    async def landed(self, timeout_s: float, poll_s: float = 0.1) -> None:
        """Until every moved client has joined a combiner again (or ``timeout_s``): a round
        planned over clients in transit would leave them out."""
        deadline = time.monotonic() + timeout_s
        while self.moving and time.monotonic() < deadline:
            loads = await self.loads(fresh=True)
            joined = set().union(*(load.joined for load in loads.values()))
            now = time.monotonic()
            for client_id in [c for c, at in self.moving.items()
                              if c in joined or now - at >= 2 * self.RECENT_S]:
                del self.moving[client_id]
            if self.moving:
                await asyncio.sleep(poll_s)

    async def Assign(self, request: pb.AssignRequest, context) -> pb.Assignment:
        client_id = await caller_id(context, request.name, request.name)
        if not client_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a client needs a name")
        loads, counts = await self.view()
        self._uncount(client_id, loads, counts)
        planned = self.reserved.pop(client_id, None)
        if planned is not None and planned.combiner in counts \
                and counts[planned.combiner] < self.max_clients:
            choice: str | None = planned.combiner
        else:
            choice = pick_combiner(counts, self.max_clients, avoid=request.previous_combiner)
        if choice is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no combiner accepts clients now")
        self._count(client_id, choice, counts)
        return pb.Assignment(client_id=client_id, combiner=choice,
                             address=loads[choice].address)
