"""The combiner Ray actor: hosts the gRPC bridge for its clients inside its own event loop.

It is an async actor, so ``__init__`` already runs in the loop that serves gRPC: when Ray
restarts the actor after a crash, the server comes back with it. The controller talks to
it only through Ray calls (``run_round``, ``online_clients``, ...); nothing of the control
plane is exposed on the network.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import ray

from fedray.actors.combiner.core import CombinerCore
from fedray.actors.combiner.servicer import CombinerServicer
from fedray.actors.hosting import advertised_host, node_of, quiet
from fedray.actors.memory import release_free_memory, tune_allocator
from fedray.actors.metrics import FederationMetrics
from fedray.actors.observers import TrackingObserver
from fedray.bridge.auth import BridgeKeys, make_gate
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.server import ServerLimits, start_server
from fedray.bridge.tls import ServerTls
from fedray.config import CombinersConfig
from fedray.messages import AsyncSpec, RoundResult, RoundSpec
from fedray.strategies.base import Strategy
from fedray.strategies.snapshots import ClientInfo
from fedray.tracking.tokens import tracking_token_loader

log = logging.getLogger(__name__)
MAX_PACKAGES = 4  # compute packages a combiner serves at once (sessions queue)

SWEEP_INTERVAL_S = 1.0


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Combiner:
    def __init__(self, name: str, federation: str, settings: CombinersConfig, port: int,
                 token: BridgeKeys | str | None, tracking_uri: str | None,
                 tracking_db: str = "fedray",
                 package: tuple[str, bytes] | None = None, tls: ServerTls | None = None) -> None:
        tune_allocator()
        self.name = name
        self.namespace = f"fedray-{federation}"  # FederationConfig.namespace
        self.settings = settings
        self.tls = tls
        self.observer = TrackingObserver(tracking_uri, tracking_db, source=name, combiner=name,
                                         metrics=FederationMetrics(federation, name))
        # Kept updates (robust and asynchronous strategies) go to the object store, which
        # can spill to disk; the controller reads them zero-copy from there.
        self.core = CombinerCore(name, settings, listener=self.observer,
                                 keeper=lambda raw: ray.put(np.asarray(raw)),
                                 claimer=self._claim_at_controller)
        # Given at construction too, so a combiner that Ray restarts still serves it.
        self.packages: dict[str, bytes] = dict([package]) if package else {}
        self.address = ""
        self._restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.gate = make_gate(token, tracking_token_loader(tracking_uri, tracking_db),
                              settings.max_rpcs_per_s,
                              self.observer.event, self._disconnect,
                              max_ids_per_peer=settings.max_clients_per_connection)
        self._ready = asyncio.ensure_future(self._serve(port))
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def _claim_at_controller(self, session_id: str, round_: int, attempt: int,
                                   client_id: str) -> int:
        """Buffered rounds count their first K updates at the controller, across combiners."""
        controller = ray.get_actor("controller", namespace=self.namespace)
        return await controller.claim_update.remote(session_id, round_, attempt, client_id)

    async def _serve(self, port: int) -> dict[str, Any]:
        def register(server):
            pb_grpc.add_CombinerServicer_to_server(CombinerServicer(self.core, self.packages), server)

        self._server, bound = await start_server(register, self.settings.host, port, self.gate,
                                                 self.tls, ServerLimits.for_settings(self.settings))
        self.address = f"{advertised_host(self.settings.host, self.settings.advertise)}:{bound}"
        self.observer.combiner_status(self.address, "online", restarted=self._restarted)
        if self._restarted:
            self.observer.event("warning", f"combiner {self.name} was restarted by Ray")
        return {"name": self.name, "address": self.address, "port": bound, **node_of()}

    def _disconnect(self, names: set[str]) -> None:
        """Close the task streams of clients whose tokens were just revoked."""
        for name in names & set(self.core.clients):
            self.core.clients[name].close()
            self.observer.event("warning", f"client {name}: its token was revoked; disconnected",
                                client_id=name)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.core.sweep()

    @quiet
    async def ready(self) -> dict[str, Any]:
        return await self._ready

    @quiet
    async def online_clients(self) -> list[str]:
        return self.core.online_clients()

    @quiet
    async def online_info(self) -> list[ClientInfo]:
        return self.core.online_info()

    @quiet
    async def wait_clients_changed(self, known: int, timeout_s: float) -> list[str]:
        return await self.core.wait_clients_changed(known, timeout_s)

    @quiet
    async def info(self) -> dict[str, Any]:
        """Address and load, for the gateway's balancing."""
        return {**(await self._ready), "load": len(self.core.online_clients())}

    @quiet
    async def balance_info(self, recent_s: float, settle_s: float) -> dict[str, Any]:
        """Load, movable clients and recent joins, for the gateway and the rebalancer."""
        return {**(await self._ready), **self.core.balance_info(recent_s, settle_s)}

    async def release(self, count: int, settle_s: float) -> list[str]:
        """Send up to ``count`` idle clients back to the gateway (to even the load)."""
        return self.core.release(count, settle_s)

    async def drain(self) -> list[str]:
        """Leave the elastic tier (``CombinerCore.drain``): the ids sent to the gateway."""
        return await self.core.drain()

    @quiet
    async def served_packages(self) -> dict[str, bytes]:
        """The compute packages served, oldest first (a combiner added later serves them too)."""
        return dict(self.packages)

    async def start_session(self, session_id: str, strategy: Strategy) -> None:
        self.core.start_session(session_id, strategy)

    async def run_round(self, spec: RoundSpec, model: np.ndarray | None) -> RoundResult:
        # Ray resolves the ObjectRef the controller passed: `model` is a zero-copy view of
        # the one serialized copy in the object store, shared by every combiner on the node
        # (None for a stage that sends no model).
        result = await self.core.run_round(spec, model)
        release_free_memory()  # the round's upload buffers and temporaries
        return result

    async def start_async(self, spec: AsyncSpec, model: np.ndarray, version: int,
                          model_id: str) -> None:
        await self.core.start_async(spec, model, version, model_id)

    async def add_clients(self, clients: list[str]) -> None:
        self.core.add_clients(clients)

    async def set_version(self, version: int, model: np.ndarray, model_id: str) -> None:
        await self.core.set_version(version, model, model_id)

    async def take_updates(self, session_id: str, timeout_s: float) -> RoundResult:
        return await self.core.take_updates(session_id, timeout_s)

    async def stop_async(self, session_id: str) -> dict[str, Any]:
        return self.core.stop_async(session_id)

    @quiet
    async def buffer_full(self, session_id: str, round_: int, attempt: int) -> None:
        self.core.buffer_full(session_id, round_, attempt)

    async def add_package(self, sha256: str, data: bytes) -> None:
        """Serve this compute package too: a queued session's comes while the running
        one's is still in use. The oldest goes past ``MAX_PACKAGES``."""
        self.packages.pop(sha256, None)
        self.packages[sha256] = data
        while len(self.packages) > MAX_PACKAGES:
            del self.packages[next(iter(self.packages))]

    async def stop(self) -> None:
        """Close every client stream and the server, and flush tracking writes."""
        self._sweeper.cancel()
        self.core.disconnect_all()
        await self._server.stop(grace=1.0)
        await self.gate.close()
        self.observer.combiner_status(self.address, "stopped")
        await asyncio.to_thread(self.observer.close)
