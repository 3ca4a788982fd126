"""Follow a tracking collection: the documents that land after a point, as they land.

MongoDB replica sets have change streams; nx-27017 and a standalone mongod do not, so a
``Tail`` asks for documents newer than the last it saw (an indexed range query on a
timestamp field, ``ts`` for events, ``started_at`` for rounds) and waits between asks,
starting at ``POLL_MIN_S`` and doubling up to ``POLL_MAX_S`` while nothing comes (back to
the minimum as soon as something does): no busy polling, and a quiet federation costs
one small query a second. Writers on several processes stamp their own clocks, so each
ask overlaps the last ``OVERLAP_S`` and drops what it has already given (by ``_id`` and
the field: a round document updated later is given again, as it is then).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fedray.tracking.store import TrackingStore

POLL_MIN_S = 0.2
POLL_MAX_S = 1.0
OVERLAP_S = 5.0  # writers' clocks and queues: a document may land this much "late"
SEEN_KEPT = 10_000  # ids remembered to drop repeats from the overlap
BATCH = 500


class Tail:
    """New documents of ``collection`` matching ``query``, ordered by ``field``."""

    def __init__(self, store: TrackingStore, collection: str, query: Mapping[str, Any],
                 field: str = "ts", since: dt.datetime | None = None) -> None:
        self.store = store
        self.collection = collection
        self.query = dict(query)
        self.field = field
        self.since = since or dt.datetime.now(dt.UTC)
        self._overlap = 0.0  # none before ``since`` on the first ask: the caller has those
        self._seen: OrderedDict[Any, None] = OrderedDict()
        self._wait = POLL_MIN_S

    def poll(self) -> list[dict[str, Any]]:
        """The documents that landed since the last poll (oldest first), once each."""
        low = self.since - dt.timedelta(seconds=self._overlap)
        self._overlap = OVERLAP_S
        docs = self.store.find_with_ids(self.collection, {**self.query, self.field: {"$gte": low}},
                                        sort=[(self.field, 1)], limit=BATCH)
        fresh = []
        for doc in docs:
            key = (doc.pop("_id", None), str(doc.get(self.field)))  # a change is new again
            if key in self._seen:
                continue
            self._seen[key] = None
            fresh.append(doc)
            stamp = doc.get(self.field)
            if isinstance(stamp, dt.datetime) and stamp > self.since:
                self.since = stamp
        while len(self._seen) > SEEN_KEPT:
            self._seen.popitem(last=False)
        return fresh

    def follow(self, stop: Callable[[], bool] = lambda: False,
               sleep: Callable[[float], Any] = time.sleep) -> Iterator[dict[str, Any]]:
        """Every new document until ``stop()`` says so, waiting with backoff in between."""
        while not stop():
            fresh = self.poll()
            yield from fresh
            self._wait = POLL_MIN_S if fresh else min(POLL_MAX_S, self._wait * 2)
            if not fresh:
                sleep(self._wait)

    @property
    def wait_s(self) -> float:
        """How long to wait before the next poll (for callers that wait themselves)."""
        return self._wait

    def settle(self, fresh: bool) -> float:
        """Adjust the backoff after a poll; the wait before the next."""
        self._wait = POLL_MIN_S if fresh else min(POLL_MAX_S, self._wait * 2)
        return self._wait
