"""The gateway: client discovery, hosted by the controller (``Gateway.Assign``).

A client asks which combiner to join; the gateway asks the pool for the combiners' loads
(at most once a second, however many clients ask) and answers with the least loaded one
that has room (``policy.pick_combiner``), avoiding the one the client just left.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from fedray.actors.controller.policy import pick_combiner
from fedray.actors.controller.pool import CombinerPool
from fedray.bridge.boundary import Boundary, EventSink, guard_rpcs, log_event
from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.server import caller_id


@guard_rpcs
class GatewayServicer(pb_grpc.GatewayServicer):
    """Client discovery. Assignments from the last few seconds count towards a combiner's
    load, so a burst of clients starting together is spread instead of piling onto the
    combiner that was least loaded a moment ago. An unexpected exception in a handler is
    an error event (``on_event``: the controller's observer) and INTERNAL with a ref."""

    RECENT_S = 5.0
    LOADS_S = 1.0  # combiners' loads are asked at most this often, however many clients ask

    def __init__(self, pool: CombinerPool, max_clients: int,
                 on_event: EventSink = log_event) -> None:
        self.pool = pool
        self.max_clients = max_clients
        self.boundary = Boundary("the gateway", on_event)
        self.recent: dict[str, list[float]] = {}
        self._loads: tuple[float, asyncio.Future] | None = None

    async def loads(self) -> dict[str, tuple[int, str]]:
        """The combiners' loads, shared by every Assign within ``LOADS_S`` (one Ray call
        per combiner per Assign let a burst of clients flood the combiners)."""
        now = time.monotonic()
        if self._loads is None or now - self._loads[0] > self.LOADS_S \
                or (self._loads[1].done() and self._loads[1].exception() is not None):
            self._loads = (now, asyncio.ensure_future(self.pool.loads()))
        return await asyncio.shield(self._loads[1])

    async def Assign(self, request: pb.AssignRequest, context) -> pb.Assignment:
        client_id = await caller_id(context, request.name, request.name)
        if not client_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a client needs a name")
        loads = await self.loads()
        now = time.monotonic()
        for name in loads:
            self.recent[name] = [t for t in self.recent.get(name, []) if now - t < self.RECENT_S]
        choice = pick_combiner({n: c + len(self.recent[n]) for n, (c, _) in loads.items()},
                               self.max_clients, avoid=request.previous_combiner)
        if choice is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no combiner accepts clients now")
        self.recent[choice].append(now)
        return pb.Assignment(client_id=client_id, combiner=choice, address=loads[choice][1])
