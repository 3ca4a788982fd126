"""Edge side of fedray: what runs next to the data. Imports neither Ray, pymongo nor minio.

This package is where fedray first imports grpc, so it is where gRPC's own logging is
set: grpcio logs every failed TLS handshake at INFO level to stderr, which buries the
client's one-line hint. ERROR is gRPC's documented default; a user's setting wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # read once, when grpc is first imported

import asyncio  # noqa: E402

from fedray.bridge.credential import ENV as CREDENTIALS_ENV  # noqa: E402
from fedray.bridge.credential import read_bundle  # noqa: E402
from fedray.bridge.tls import ClientTls  # noqa: E402
from fedray.edge.client import EdgeRunner, EdgeSettings  # noqa: E402
from fedray.edge.workers import (  # noqa: E402
    CallbackWorker,
    PackageWorker,
    TrainFn,
    ValidateFn,
    Worker,
)
from fedray.errors import ConfigError  # noqa: E402

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

    def runner(self, gateway: str = "", name: str = "", token: str | None = None,
               tls: ClientTls | None = None, attrs: dict[str, str] | None = None,
               client_halves: tuple[str, ...] = (),
               credentials: str | os.PathLike | None = None) -> EdgeRunner:
        credentials = credentials or os.environ.get(CREDENTIALS_ENV) or None
        bundle = read_bundle(credentials, "credentials") if credentials else None
        if bundle is not None:
            name, gateway = name or bundle.name, gateway or bundle.gateway
            attrs = {**bundle.attrs, **(attrs or {})}
            tls, token = tls or bundle.tls(), None
        elif token is None:
            token = os.environ.get("FEDRAY_TOKEN")
        if not gateway or not name:
            raise ConfigError("EdgeClient needs gateway= and name= (or credentials= from "
                              "fedray client add)")
        return EdgeRunner(self.worker, EdgeSettings(
            gateway=gateway, name=name, token=token, tls=tls, attrs=dict(attrs or {}),
            client_halves=tuple(client_halves), signer=bundle.signer() if bundle else None,
            ca_from_credentials=bundle is not None and bundle.ca is not None
            and tls is not None and tls.ca == bundle.ca))

    def start(self, gateway: str = "", name: str = "", token: str | None = None,
              tls: ClientTls | None = None, attrs: dict[str, str] | None = None,
              client_halves: tuple[str, ...] = (),
              credentials: str | os.PathLike | None = None) -> None:
        """Serve tasks until interrupted. ``credentials="site-a.fedray.json"`` (from
        ``fedray client add``; default ``$FEDRAY_CREDENTIALS``) gives the name, the
        gateway, the CA and the key that signs every call; else ``gateway`` and ``name``
        with a token (default ``$FEDRAY_TOKEN``), and ``tls=ClientTls.from_files(
        ca="ca.pem")`` to dial over TLS. ``attrs`` (``{"site": "eu"}``) tell the
        federation about this client; ``client_halves`` names the modules whose strategy
        client halves it may run (fedray's own always run)."""
        asyncio.run(self.runner(gateway, name, token, tls, attrs, client_halves,
                                credentials).run())
