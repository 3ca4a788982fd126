"""fedray: a tiered, resilient federated learning runtime on Ray.

The public API is small on purpose; everything not listed in ``__all__`` is internal.
Names load on first use (PEP 562), so ``import fedray.strategies`` or ``import fedray``
imports neither grpc nor Ray: each name below is read from its home module when it is
first asked for.
"""

import importlib as _importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    "AlreadyRunning": "fedray.errors",
    "AuthError": "fedray.errors",
    "ConfigError": "fedray.errors",
    "FedrayError": "fedray.errors",
    "PackageError": "fedray.errors",
    "SerializationError": "fedray.errors",
    "SessionError": "fedray.errors",
    "StorageError": "fedray.errors",
    "TrackingError": "fedray.errors",
    "TransportError": "fedray.errors",
    "UpdateRejected": "fedray.errors",
    "FederationConfig": "fedray.config",
    "config_from_dict": "fedray.deploy.config_file",
    "load_config": "fedray.deploy.config_file",
    "decode": "fedray.serialization",
    "encode": "fedray.serialization",
    "model_id": "fedray.serialization",
    "ClientTls": "fedray.bridge.tls",
    "EdgeClient": "fedray.edge",
    "connect": "fedray.api",
    "ApiError": "fedray.errors",
    "NotFound": "fedray.errors",
}

__all__ = sorted([*_HOMES, "__version__"])


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fedray' has no attribute {name!r}")
    value = getattr(_importlib.import_module(home), name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

