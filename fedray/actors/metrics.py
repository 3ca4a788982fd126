"""Live numbers for the Ray dashboard, through ``ray.util.metrics``.

Ray exports them in Prometheus format on each node's metrics port (names get a ``ray_``
prefix and counters a ``_total`` suffix, e.g. ``ray_fedray_updates_received_total``), so the dashboard's Grafana panels or any
Prometheus can chart a federation while it runs. Tracking keeps the history; these are
the gauges and counters for right now.
"""

from __future__ import annotations

from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

SECONDS_BUCKETS = [0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]


class FederationMetrics:
    """One set per actor; every series carries the federation and the actor's name."""

    def __init__(self, federation: str, source: str) -> None:
        keys = ("federation", "source")
        self.tags = {"federation": federation, "source": source}
        self.clients = Gauge("fedray_connected_clients",
                             "Edge clients connected to a combiner", tag_keys=keys)
        self.rounds = Counter("fedray_rounds_completed", "Rounds committed", tag_keys=keys)
        self.round_seconds = Histogram("fedray_round_seconds", "Wall seconds per round",
                                       boundaries=SECONDS_BUCKETS, tag_keys=keys)
        self.updates = Counter("fedray_updates_received", "Updates accepted and folded",
                               tag_keys=keys)
        self.rejected = Counter("fedray_updates_rejected", "Updates refused, by reason",
                                tag_keys=(*keys, "reason"))
        self.bytes_in = Counter("fedray_bytes_in", "Update bytes received", tag_keys=keys)
        self.bytes_out = Counter("fedray_bytes_out", "Model bytes served", tag_keys=keys)
        self.aggregation_seconds = Histogram("fedray_aggregation_seconds",
                                             "Seconds spent checking and folding updates",
                                             boundaries=SECONDS_BUCKETS, tag_keys=keys)
        self.tracking_dropped = Counter("fedray_tracking_writes_dropped",
                                        "Tracking writes given up on, by reason (queue_full, "
                                        "refused, closed)", tag_keys=(*keys, "reason"))
        self.tracking_dropped.set_default_tags(self.tags)
        for metric in (self.clients, self.rounds, self.round_seconds, self.updates,
                       self.bytes_in, self.bytes_out, self.aggregation_seconds):
            metric.set_default_tags(self.tags)
        self.rejected.set_default_tags(self.tags)

    def combiner_round(self, result: Any) -> None:
        """Count one combiner's share of a round (a ``RoundResult``)."""
        if result.updates:
            self.updates.inc(result.updates)
        for reason, count in result.rejections.items():
            self.rejected.inc(count, tags={"reason": reason})
        if result.bytes_in:
            self.bytes_in.inc(result.bytes_in)
        if result.bytes_out:
            self.bytes_out.inc(result.bytes_out)
        self.aggregation_seconds.observe(result.aggregation_s)

    def round_committed(self, seconds: float) -> None:
        self.rounds.inc()
        self.round_seconds.observe(seconds)


class TierMetrics:
    """The elastic tier's size and changes (the controller's; ``fedray_combiners`` and
    ``ray_fedray_tier_changes_total{action=add|drain|removed|failed}`` on the dashboard)."""

    def __init__(self, federation: str) -> None:
        keys = ("federation", "source")
        tags = {"federation": federation, "source": "controller"}
        self.size = Gauge("fedray_combiners", "Combiners in the tier (not draining)",
                          tag_keys=keys)
        self.changes = Counter("fedray_tier_changes", "Changes of the combiner tier, by action",
                               tag_keys=(*keys, "action"))
        self.size.set_default_tags(tags)
        self.changes.set_default_tags(tags)

    def changed(self, action: str, size: int) -> None:
        self.changes.inc(tags={"action": action})
        self.size.set(size)
