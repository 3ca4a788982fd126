"""What both actors need of Ray to serve clients: the address to advertise, and quiet calls.

``advertised_host`` is the host clients are told to dial (``combiners.advertise``; auto:
the node's IP, or this host's primary address when Ray's node is loopback, or loopback
when the server binds loopback), ``node_of`` the Ray node an actor runs on (for `fedray
status`). ``quiet`` marks the actor methods called every round or more often.
``alive_nodes`` reads the cluster's nodes for the placement policy, and ``forwarded_env``
the credentials every actor is started with (the driver's, and the controller's when it
adds a combiner).
"""

from __future__ import annotations

import os

import ray

from fedray.actors.placement import NodeView
from fedray.bridge.addresses import is_loopback, primary_ip

HEAD_RESOURCE = "node:__internal_head__"
# Credentials the actors need (the model store's keys). Actors of a cluster that was joined
# rather than started here do not inherit the driver's environment, so pass them along.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")

# Calls made every round or more often (polls, lookups) record no task event: the GCS keeps
# one for every task (up to RAY_task_events_max_num_task_in_gcs, 100,000 by default), which
# made it grow by about 30 KB per round. Rounds themselves (run_round) stay visible.
quiet = ray.method(enable_task_events=False)


def advertised_host(bind_host: str, advertise: str) -> str:
    if advertise != "auto":
        return advertise
    if is_loopback(bind_host):
        return bind_host
    node = ray.util.get_node_ip_address()
    # A private local Ray takes 127.0.0.1 as its node's address; clients need this host's.
    return primary_ip() if is_loopback(node) else node


def node_of() -> dict[str, str]:
    """The Ray node this actor runs on: its id and IP."""
    return {"node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address()}


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def alive_nodes() -> tuple[NodeView, ...]:
    """The cluster's alive nodes, now (a blocking call to Ray's control plane)."""
    return tuple(NodeView(node_id=n["NodeID"], address=n.get("NodeManagerAddress", ""),
                          resources=dict(n.get("Resources", {})),
                          head=HEAD_RESOURCE in n.get("Resources", {}))
                 for n in ray.nodes() if n.get("Alive"))
