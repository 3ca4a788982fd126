"""Whether every Ray node can reach the federation's tracking and model store: a pure rule.

On one machine, the embedded tracking server (nx-27017 on loopback) and the model store's
``file`` directory are reachable by every Ray node, however many there are. Once the
cluster's nodes are on more than one host, an actor on another host would write its
tracking to a server that is not there and its models to another disk: the federation
must use a MongoDB and an S3 store that every node reaches. ``problems`` says, over the
config and the hosts (IP addresses) of the cluster's alive nodes, what is wrong and what
to set; ``warnings`` what may be fine (a ``file:///`` path on a filesystem every node
mounts). ``fedray.deploy.nodes`` asks Ray for the hosts and refuses to start on a problem.
No Ray here.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import parse_qs, urlsplit

from fedray.bridge.addresses import is_loopback
from fedray.config import FederationConfig

TRACKING_FIX = "set tracking.uri: mongodb://HOST:27017/fedray (a MongoDB every node reaches)"
STORAGE_FIX = ("set storage.uri: s3://BUCKET?endpoint=HOST:9000 (an S3 or MinIO every node "
               "reaches; keys in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")


def _mongo_hosts(uri: str) -> list[str]:
    """The hosts of a ``mongodb://`` URI (none for ``mongodb+srv://``: a DNS name)."""
    scheme, _, rest = uri.partition("://")
    if scheme != "mongodb":
        return []
    hosts = rest.partition("/")[0].partition("?")[0].rpartition("@")[2]
    return [_host(h) for h in hosts.split(",") if h]


def _host(hostport: str) -> str:
    """HOST of HOST:PORT, [V6]:PORT or a bare HOST."""
    if hostport.startswith("["):
        return hostport[1:].partition("]")[0]
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


def _s3_endpoint_host(uri: str) -> str:
    query = parse_qs(urlsplit(uri).query)
    endpoint = (query.get("endpoint") or ["s3.amazonaws.com"])[0]
    return _host(endpoint.partition("://")[2] or endpoint)


def problems(config: FederationConfig, hosts: Collection[str]) -> list[str]:
    """What stops a federation whose Ray nodes are on ``hosts`` (one entry per node's IP)
    from working on every node; empty when the nodes share one host."""
    if len(set(hosts)) <= 1:
        return []
    spread = f"the Ray cluster's nodes are on {len(set(hosts))} hosts"
    found = []
    tracking = config.tracking.uri
    if tracking == "embedded":
        found.append(f"{spread}, but tracking.uri is 'embedded' (a server on the driver's "
                     f"loopback that the other hosts cannot reach): {TRACKING_FIX}")
    elif any(is_loopback(h) for h in _mongo_hosts(tracking)):
        found.append(f"{spread}, but tracking.uri names a loopback host, which is each "
                     f"node's own: {TRACKING_FIX}")
    storage = config.storage.uri
    if storage == "file":
        found.append(f"{spread}, but storage.uri is 'file' (the data directory on one host's "
                     f"disk): {STORAGE_FIX}")
    elif storage.startswith("s3://") and is_loopback(_s3_endpoint_host(storage)):
        found.append(f"{spread}, but storage.uri's endpoint is a loopback host, which is each "
                     f"node's own: {STORAGE_FIX}")
    return found


def warnings(config: FederationConfig, hosts: Collection[str]) -> list[str]:
    """What works only if the operator made it so (a shared filesystem)."""
    if len(set(hosts)) > 1 and config.storage.uri.startswith("file://"):
        return [f"storage.uri {config.storage.uri} must be a filesystem every Ray node mounts "
                "at the same path (else use s3://)"]
    return []
