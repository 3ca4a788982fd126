"""fedray: a tiered, resilient federated learning runtime on Ray.

The public API is small on purpose; everything not listed in ``__all__`` is internal.
Importing fedray does not import Ray, so edge machines need only the client's dependencies.
"""

from fedray.bridge.tls import ClientTls
from fedray.config import FederationConfig, config_from_dict, load_config
from fedray.edge import EdgeClient
from fedray.errors import (
    AlreadyRunning,
    AuthError,
    ConfigError,
    FedrayError,
    PackageError,
    SerializationError,
    SessionError,
    StorageError,
    TrackingError,
    TransportError,
    UpdateRejected,
)
from fedray.serialization import decode, encode, model_id

__version__ = "0.1.0"

__all__ = [
    "AlreadyRunning",
    "AuthError",
    "ClientTls",
    "ConfigError",
    "EdgeClient",
    "FederationConfig",
    "FedrayError",
    "PackageError",
    "SerializationError",
    "SessionError",
    "StorageError",
    "TrackingError",
    "TransportError",
    "UpdateRejected",
    "__version__",
    "config_from_dict",
    "decode",
    "encode",
    "load_config",
    "model_id",
]
