"""Edge side of fedray: what runs next to the data. Imports neither Ray, pymongo nor minio.

This package is where fedray first imports grpc, so it is where gRPC's own logging is
set: grpcio logs every failed TLS handshake at INFO level to stderr, which buries the
client's one-line hint. ERROR is gRPC's documented default; a user's setting wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # read once, when grpc is first imported

import asyncio  # noqa: E402

from fedray.bridge.tls import ClientTls  # noqa: E402
from fedray.edge.client import EdgeRunner, EdgeSettings  # noqa: E402
from fedray.edge.workers import (  # noqa: E402
    CallbackWorker,
    PackageWorker,
    TrainFn,
    ValidateFn,
    Worker,
)

__all__ = ["ClientTls", "EdgeClient", "EdgeRunner", "EdgeSettings", "CallbackWorker", "PackageWorker",
           "Worker"]


class EdgeClient:
    """A federated client from two Python functions.

    ``train(params, config) -> (params, num_examples, metrics)`` and
    ``validate(params, config) -> (num_examples, metrics)``, where ``params`` maps tensor
    names to numpy arrays. ``start`` connects outbound to the federation's gateway and
    serves tasks until interrupted.
    """

    def __init__(self, train: TrainFn, validate: ValidateFn | None = None) -> None:
        self.worker = CallbackWorker(train, validate)

    def runner(self, gateway: str, name: str, token: str | None = None,
               tls: ClientTls | None = None, attrs: dict[str, str] | None = None,
               client_halves: tuple[str, ...] = ()) -> EdgeRunner:
        token = token if token is not None else os.environ.get("FEDRAY_TOKEN")
        return EdgeRunner(self.worker, EdgeSettings(gateway=gateway, name=name, token=token,
                                                    tls=tls, attrs=dict(attrs or {}),
                                                    client_halves=tuple(client_halves)))

    def start(self, gateway: str, name: str, token: str | None = None,
              tls: ClientTls | None = None, attrs: dict[str, str] | None = None,
              client_halves: tuple[str, ...] = ()) -> None:
        """Serve tasks until interrupted; with ``tls=ClientTls.from_files(ca="ca.pem")`` it
        dials over TLS and verifies the servers' certificates. ``attrs`` (``{"site": "eu"}``)
        tell the federation about this client; ``client_halves`` names the modules whose
        strategy client halves it may run (fedray's own always run)."""
        asyncio.run(self.runner(gateway, name, token, tls, attrs, client_halves).run())
