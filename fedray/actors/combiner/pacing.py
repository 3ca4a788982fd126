"""How often a combiner's clients beat, given how many there are: a rule over a count.

Every client sends a heartbeat each interval, so a combiner with N clients answers N /
interval calls a second. On two cores a combiner answering its clients' tasks and
updates also keeps up with about ``MAX_BEATS_PER_S`` beats a second; past that, beats
queue, arrive late, and healthy clients are swept offline (3,000 clients on 2 combiners
lost a few per round at 2 s). So the interval a combiner tells its clients grows with
its count, never below ``combiners.heartbeat_interval_s``, and the silence after which a
client counts as gone grows with it (the configured ratio of the two is kept). A client
whose connection drops is gone at once anyway (its task stream ends); heartbeats are the
fallback for one that hangs with its connection open.
"""

from __future__ import annotations

MAX_BEATS_PER_S = 250.0


def beat_interval(configured_s: float, clients: int, max_rate: float = MAX_BEATS_PER_S) -> float:
    """The heartbeat interval for ``clients`` connected clients."""
    return max(configured_s, clients / max_rate)


def offline_after(configured_offline_s: float, configured_interval_s: float,
                  interval_s: float) -> float:
    """The silence after which a client is gone, at ``interval_s`` between beats."""
    return configured_offline_s * max(1.0, interval_s / configured_interval_s)
