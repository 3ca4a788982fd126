"""Edge side of fedray: what runs next to the data. Imports neither Ray, pymongo nor minio."""

from __future__ import annotations

import asyncio
import os

from fedray.edge.client import EdgeRunner, EdgeSettings
from fedray.edge.workers import CallbackWorker, PackageWorker, TrainFn, ValidateFn, Worker
from fedray.tls import ClientTls

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
               tls: ClientTls | None = None) -> EdgeRunner:
        token = token if token is not None else os.environ.get("FEDRAY_TOKEN")
        return EdgeRunner(self.worker, EdgeSettings(gateway=gateway, name=name, token=token,
                                                    tls=tls))

    def start(self, gateway: str, name: str, token: str | None = None,
              tls: ClientTls | None = None) -> None:
        """Serve tasks until interrupted; with ``tls=ClientTls.from_files(ca="ca.pem")`` it
        dials over TLS and verifies the servers' certificates."""
        asyncio.run(self.runner(gateway, name, token, tls).run())
