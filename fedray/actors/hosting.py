"""What both actors need of Ray to serve clients: the address to advertise, and quiet calls.

``advertised_host`` is the host clients are told to dial (``combiners.advertise``; auto:
the node's IP, or loopback when the server binds loopback). ``quiet`` marks the actor
methods called every round or more often.
"""

from __future__ import annotations

import ray

# Calls made every round or more often (polls, lookups) record no task event: the GCS keeps
# one for every task (up to RAY_task_events_max_num_task_in_gcs, 100,000 by default), which
# made it grow by about 30 KB per round. Rounds themselves (run_round) stay visible.
quiet = ray.method(enable_task_events=False)


def advertised_host(bind_host: str, advertise: str) -> str:
    if advertise != "auto":
        return advertise
    if bind_host in {"127.0.0.1", "localhost", "::1"}:
        return bind_host
    return ray.util.get_node_ip_address()
