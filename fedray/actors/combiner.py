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

from fedray.actors.auth import BridgeKeys, make_gate
from fedray.actors.combiner_core import CombinerCore
from fedray.actors.combiner_servicer import CombinerServicer
from fedray.actors.grpc_server import ServerLimits, start_server
from fedray.actors.metrics import FederationMetrics
from fedray.actors.observers import TrackingObserver
from fedray.config import CombinersConfig
from fedray.messages import RoundResult, RoundSpec
from fedray.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.tls import ServerTls

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0


def advertised_host(bind_host: str, advertise: str) -> str:
    if advertise != "auto":
        return advertise
    if bind_host in {"127.0.0.1", "localhost", "::1"}:
        return bind_host
    return ray.util.get_node_ip_address()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Combiner:
    def __init__(self, name: str, federation: str, settings: CombinersConfig, port: int,
                 token: BridgeKeys | str | None, tracking_uri: str | None,
                 tracking_db: str = "fedray",
                 package: tuple[str, bytes] | None = None, tls: ServerTls | None = None) -> None:
        self.name = name
        self.settings = settings
        self.tls = tls
        self.observer = TrackingObserver(tracking_uri, tracking_db, source=name, combiner=name,
                                         metrics=FederationMetrics(federation, name))
        self.core = CombinerCore(name, settings, listener=self.observer)
        # Given at construction too, so a combiner that Ray restarts still serves it.
        self.packages: dict[str, bytes] = dict([package]) if package else {}
        self.address = ""
        self._restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.gate = make_gate(token, tracking_uri, tracking_db, settings.max_rpcs_per_s,
                              self.observer.event, self._disconnect,
                              max_ids_per_peer=settings.max_clients_per_connection)
        self._ready = asyncio.ensure_future(self._serve(port))
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def _serve(self, port: int) -> dict[str, Any]:
        def register(server):
            pb_grpc.add_CombinerServicer_to_server(CombinerServicer(self.core, self.packages), server)

        self._server, bound = await start_server(register, self.settings.host, port, self.gate,
                                                 self.tls, ServerLimits.for_settings(self.settings))
        self.address = f"{advertised_host(self.settings.host, self.settings.advertise)}:{bound}"
        self.observer.combiner_status(self.address, "online", restarted=self._restarted)
        if self._restarted:
            self.observer.event("warning", f"combiner {self.name} was restarted by Ray")
        return {"name": self.name, "address": self.address, "port": bound}

    def _disconnect(self, names: set[str]) -> None:
        """Close the task streams of clients whose tokens were just revoked."""
        for name in names & set(self.core.clients):
            self.core.clients[name].queue.put_nowait(None)
            self.observer.event("warning", f"client {name}: its token was revoked; disconnected",
                                client_id=name)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.core.sweep()

    async def ready(self) -> dict[str, Any]:
        return await self._ready

    async def online_clients(self) -> list[str]:
        return self.core.online_clients()

    async def wait_clients_changed(self, known: int, timeout_s: float) -> list[str]:
        return await self.core.wait_clients_changed(known, timeout_s)

    async def info(self) -> dict[str, Any]:
        """Address and load, for the gateway's balancing."""
        return {**(await self._ready), "load": len(self.core.online_clients())}

    async def run_round(self, spec: RoundSpec, model: np.ndarray) -> RoundResult:
        # Ray resolves the ObjectRef the controller passed: `model` is a zero-copy view of
        # the one serialized copy in the object store, shared by every combiner on the node.
        return await self.core.run_round(spec, model)

    async def set_package(self, sha256: str, data: bytes) -> None:
        self.packages.clear()
        self.packages[sha256] = data

    async def stop(self) -> None:
        """Close every client stream and the server, and flush tracking writes."""
        self._sweeper.cancel()
        for link in self.core.clients.values():
            link.queue.put_nowait(None)
        await self._server.stop(grace=1.0)
        await self.gate.close()
        self.observer.combiner_status(self.address, "stopped")
        await asyncio.to_thread(self.observer.close)
