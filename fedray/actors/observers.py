"""Tracking as a callback: actors report what happens, this turns it into tracking writes.

Writes go through ``TrackingWriter``'s background thread, so an actor's event loop never
waits on the database and a slow or restarting tracking server never stops a round.
"""

from __future__ import annotations

import logging
from typing import Any

from fedray.tracking.documents import utcnow
from fedray.tracking.store import TrackingStore
from fedray.tracking.writer import TrackingWriter

log = logging.getLogger(__name__)


class TrackingObserver:
    def __init__(self, uri: str | None, database: str, source: str, combiner: str = "",
                 metrics: Any = None, events_ttl_s: int | None = None,
                 indexes: bool = False) -> None:
        """With ``indexes`` this observer's writer creates the tracking indexes (a TTL index
        of ``events_ttl_s``, ``TrackingConfig.events_ttl_s``) and keeps the events'
        retention; one per federation is enough (the controller's)."""
        self.source = source
        self.combiner = combiner
        self.metrics = metrics  # a FederationMetrics inside Ray actors, None elsewhere
        self.writer = TrackingWriter(lambda: TrackingStore.from_uri(uri, database),
                                     source=source, events_ttl_s=events_ttl_s,
                                     indexes=indexes, on_drop=self._dropped) if uri else None

    def _dropped(self, reason: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.tracking_dropped.inc(count, tags={"reason": reason})

    def write(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.writer is not None:
            self.writer.submit(method, *args, **kwargs)

    def event(self, level: str, message: str, **data: Any) -> None:
        log.log(logging.getLevelName(level.upper()), "%s: %s", self.source, message)
        session_id = data.pop("session_id", None)
        round_ = data.pop("round", None)
        self.write("event", level, self.source, message, session_id=session_id, round=round_,
                   data=data or None)

    def client_status(self, client_id: str, name: str, status: str, online: int,
                      attrs: dict[str, str] | None = None, version: str | None = None,
                      connection: str | None = None) -> None:
        fields: dict[str, Any] = {"attrs": dict(attrs)} if attrs is not None else {}
        if version is not None:
            fields["version"] = version
        if connection is not None:  # a new Join: its id, and when it was made
            fields["connection_id"] = connection
            fields["connected_at"] = utcnow()
        self.write("upsert_client", client_id, name=name, combiner=self.combiner, status=status,
                   **fields)
        self.write("upsert_combiner", self.combiner, clients=online)
        if self.metrics is not None:
            self.metrics.clients.set(online)

    def round_closed(self, result: Any) -> None:
        """A combiner's share of a round ended (``RoundResult``)."""
        if self.metrics is not None:
            self.metrics.combiner_round(result)

    def round_committed(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.round_committed(seconds)

    def combiner_status(self, address: str, status: str, restarted: bool = False) -> None:
        self.write("upsert_combiner", self.combiner, address=address, status=status)
        if restarted:
            self.write("increment_combiner_restarts", self.combiner)

    def flush(self, timeout: float = 10.0) -> bool:
        """True once every write so far has landed; False if ``timeout`` passed first."""
        return self.writer.flush(timeout) if self.writer is not None else True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
