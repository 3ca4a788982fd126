"""Tracking writes from actors: queued (boundedly), written by one thread, retried until they land.

Controller and combiner actors run an asyncio loop that serves gRPC; a database call
there would stall every client of that actor, and a database outage must not lose the
history of a round. So actors only ``submit`` writes: the call is copied and queued (in
memory, O(1), never blocking), and a single background thread performs them in order on
a ``TrackingStore``. Connection errors are retried with exponential backoff (up to
``max_backoff_s``) for as long as it takes; documents keep the time they were submitted
(``written_at``), not the time the database came back. A write the database refuses
(bad document, unknown session, ...) is logged and dropped, with an error event saying so,
and the thread goes on.
Consecutive events are written with one ``insert_many``; when the database refuses such a
batch, its events are written one by one, so only the bad one is dropped.

The queue is bounded (``max_pending``, plus the batch being written). When it is full,
the least valuable queued write makes room (``write_queue`` says which), and session,
round, model, validation and package writes are never dropped. Drops are counted
(``dropped_by_reason``, ``on_drop`` for a metric), and once the queue has drained to half,
one warning event says how many writes of which kind were lost.

With ``indexes`` (the controller's writer: one per federation) the thread creates the
tracking indexes before its first write, idempotently: the unique ones lookups and upserts
rely on, and on ``events.ts`` a TTL index of ``events_ttl_s``, or a plain one when that is
None (an earlier TTL is dropped: events are then kept). With ``events_ttl_s`` it also
keeps the events' retention: every ``prune_every_s`` it deletes the events older than
that itself, since nx-27017 only expires documents lazily, when a collection is read.

``flush(timeout)`` waits until everything submitted so far is written; ``close()``
flushes, and only after its timeout gives up on writes it still could not deliver
(logging how many).
"""

from __future__ import annotations

import atexit
import copy
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from fedray.errors import TrackingError
from fedray.tracking.documents import make_event, utcnow, written_at
from fedray.tracking.mongo import is_transient
from fedray.tracking.store import WRITE_METHODS, TrackingStore
from fedray.tracking.write_queue import Write, WriteQueue, ranked

log = logging.getLogger(__name__)

StoreFactory = Callable[[], TrackingStore]
DropHook = Callable[[str, int], None]  # (reason, count): "queue_full" | "refused" | "closed"

MAX_PENDING = 20_000  # queued writes; a client's event is at most a few KiB (the bridge bounds it)
PRUNE_EVERY_S = 600.0
INDEX_RETRY_S = 5.0  # while the database is unreachable


class TrackingWriter:
    """Performs ``TrackingStore`` writes in a background thread, in submission order."""

    def __init__(
        self,
        store_factory: StoreFactory,
        *,
        batch_size: int = 500,
        max_backoff_s: float = 5.0,
        name: str = "fedray-tracking-writer",
        max_pending: int = MAX_PENDING,
        source: str = "tracking",
        events_ttl_s: int | None = None,
        prune_every_s: float = PRUNE_EVERY_S,
        on_drop: DropHook | None = None,
        indexes: bool = False,
    ) -> None:
        self._factory = store_factory
        self._max_backoff_s = max_backoff_s
        self._source = source
        self._ttl_s = events_ttl_s or None
        self._prune_every_s = prune_every_s
        self._on_drop = on_drop
        self._queue = WriteQueue(max_pending, batch_size, source)  # guarded by _cond
        self._inflight = 0  # items of the batch being written
        self.dropped_by_reason: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._closing = False
        self._abort = threading.Event()
        self._indexed = not (indexes or self._ttl_s)  # a TTL needs its index
        self._next_index = self._next_prune = time.monotonic()
        self.written = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    @property
    def dropped(self) -> int:
        """Writes given up on, for any reason (see ``dropped_by_reason``)."""
        return sum(self.dropped_by_reason.values())

    @property
    def pending(self) -> int:
        """Writes submitted but not yet done (including the ones in progress)."""
        with self._cond:
            return self._queue.queued + self._inflight

    @property
    def queued(self) -> int:
        """Writes waiting for the thread (not counting the batch it is writing)."""
        with self._cond:
            return self._queue.queued

    def submit(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Queue ``store.<method>(*args, **kwargs)``; returns at once.

        Arguments are deep-copied now, so the caller may reuse or mutate them. Only
        TrackingStore write methods are accepted; a bad event level raises here. With the
        queue full, this write or a less valuable queued one is dropped (counted).
        """
        if method not in WRITE_METHODS:
            raise ValueError(f"{method!r} is not a TrackingStore write method")
        if method == "event":
            item = Write("insert_events", event=make_event(*args, **kwargs))
        else:
            item = Write(method, copy.deepcopy(args), copy.deepcopy(kwargs), at=utcnow())
        ranked(item)
        with self._cond:
            if self._closing:
                raise TrackingError("the tracking writer is closed")
            lost = self._queue.offer(item)
            if lost is not item:
                self._cond.notify_all()
        if lost is not None:
            self._dropped("queue_full", 1)

    def event(
        self,
        level: str,
        source: str,
        message: str,
        *,
        session_id: str | None = None,
        round: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Shorthand for ``submit("event", ...)``."""
        self.submit("event", level, source, message, session_id=session_id, round=round, data=data)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write submitted so far is done; False if ``timeout`` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue.queued or self._inflight:
                if not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is None else min(remaining, 1.0))
            return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop accepting writes, deliver what is queued, then stop the thread.

        Returns True when everything was written. After ``timeout`` seconds, writes that
        still could not be delivered are dropped and logged.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        drained = self.flush(timeout)
        if not drained:
            self._abort.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=max(self._max_backoff_s, 10.0))
        atexit.unregister(self._at_exit)
        return drained

    def __enter__(self) -> TrackingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _at_exit(self) -> None:
        self.close(timeout=5.0)

    # the writer thread

    def _dropped(self, reason: str, count: int) -> None:
        with self._cond:
            self.dropped_by_reason[reason] += count
        if self._on_drop is not None:
            try:
                self._on_drop(reason, count)
            except Exception:  # noqa: BLE001 - a metric must never break a write
                log.debug("tracking drop hook failed", exc_info=True)

    def _run(self) -> None:
        store: TrackingStore | None = None
        while True:
            if not self._abort.is_set():
                store = self._chores(store)
            with self._cond:
                while not self._queue.queued and not self._closing:
                    due = self._next_chore()
                    if due is not None and time.monotonic() >= due:
                        break
                    self._cond.wait(None if due is None else due - time.monotonic())
                if self._abort.is_set() or (not self._queue.queued and self._closing):
                    break
                batch = self._queue.take_batch()
                self._inflight = len(batch)
            if batch:
                store = self._perform(store, batch)
            with self._cond:
                self._inflight = 0
                report = self._queue.drop_report()
                if report is not None:
                    self._queue.append(report)
                self._cond.notify_all()
        with self._cond:
            lost = self._queue.clear()
            self._cond.notify_all()
        if lost:
            self._dropped("closed", lost)
            log.error("tracking writer closed with %d write(s) it could not deliver", lost)
        if store is not None:
            store.close()

    def _next_chore(self) -> float | None:
        """When the thread next has index or retention work to do (monotonic); None: never."""
        due = [] if self._indexed else [self._next_index]
        if self._ttl_s is not None:
            due.append(self._next_prune)
        return min(due) if due else None

    def _chores(self, store: TrackingStore | None) -> TrackingStore | None:
        """What is due of: the indexes (before the first write), the events' retention."""
        now = time.monotonic()
        if not self._indexed and now >= self._next_index:
            store = self._make_indexes(store)
        if self._ttl_s is not None and now >= self._next_prune:
            store = self._keep_retention(store)
        return store

    def _make_indexes(self, store: TrackingStore | None) -> TrackingStore | None:
        """Create the tracking indexes (idempotent): the unique ones that lookups and
        upserts rely on, and on ``events.ts`` a TTL index, or a plain one without a TTL."""
        try:
            if store is None:
                store = self._factory()
            store.ensure_indexes(events_ttl_s=self._ttl_s)
            self._indexed = True
        except Exception as exc:  # noqa: BLE001 - retried while unreachable, never fatal
            if is_transient(exc):
                self._next_index = time.monotonic() + INDEX_RETRY_S
            else:
                self._indexed = True  # refused (e.g. an index clash): say so, do not loop
                log.error("tracking indexes: %s", exc)
        return store

    def _keep_retention(self, store: TrackingStore | None) -> TrackingStore | None:
        """Delete the events older than the TTL (nx-27017 expires them only when read)."""
        assert self._ttl_s is not None
        try:
            if store is None:
                store = self._factory()
            removed = store.prune_events(utcnow() - timedelta(seconds=self._ttl_s))
            self._next_prune = time.monotonic() + self._prune_every_s
            if removed:
                log.info("removed %d event(s) older than %.4g days", removed,
                         self._ttl_s / 86400)
        except Exception as exc:  # noqa: BLE001 - retention is retried, never fatal
            if not is_transient(exc):
                log.error("tracking retention: %s", exc)
            self._next_prune = time.monotonic() + min(self._prune_every_s, 30.0)
        return store

    def _perform(self, store: TrackingStore | None, batch: list[Write]) -> TrackingStore | None:
        """Run one batch until it succeeds, is refused, or the writer is aborted."""
        delay = 0.1
        failing_since: float | None = None
        while True:
            try:
                if store is None:
                    store = self._factory()
                self._call(store, batch)
                self.written += len(batch)
                if failing_since is not None:
                    log.info(
                        "tracking database reachable again after %.1f s",
                        time.monotonic() - failing_since,
                    )
                return store
            except Exception as exc:
                if not is_transient(exc) and len(batch) > 1:
                    # One document the database refuses must not take the others (security
                    # warnings among them) down with it: write them one by one.
                    log.warning("tracking write %s refused (%s); retrying one by one",
                                _describe(batch), exc)
                    for item in batch:
                        store = self._perform(store, [item])
                    return store
                if not is_transient(exc):
                    self._dropped("refused", len(batch))
                    log.error("tracking write %s dropped: %s", _describe(batch), exc)
                    if batch[0].event is None:
                        self._report_refused(store, batch[0], exc)
                    return store
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("tracking database unreachable, will retry: %s", exc)
                else:
                    log.debug("tracking database still unreachable: %s", exc)
            if self._abort.wait(delay):
                self._dropped("closed", len(batch))
                log.error("tracking write %s dropped on close", _describe(batch))
                return store
            delay = min(delay * 2, self._max_backoff_s)

    def _report_refused(self, store: TrackingStore | None, item: Write,
                        exc: BaseException) -> None:
        """A refused session, round or status write is history lost: say so in tracking as
        an error event too, where operators look (an actor's log is easy to miss)."""
        if store is None:
            return
        shown = [str(arg)[:64] for arg in item.args[:2]]
        try:
            store.event("error", self._source, f"tracking refused the write {item.method}"
                        f"({', '.join(shown)}); it is lost: {str(exc)[:400]}",
                        data={"reason": "tracking_refused", "method": item.method})
        except Exception as again:  # noqa: BLE001 - the log line above already said it
            log.debug("could not record the refused write as an event: %s", again)

    @staticmethod
    def _call(store: TrackingStore, batch: list[Write]) -> None:
        head = batch[0]
        if head.event is not None:
            store.insert_events([item.event for item in batch if item.event is not None])
            return
        with written_at(head.at or utcnow()):
            getattr(store, head.method)(*head.args, **head.kwargs)


def _describe(batch: list[Write]) -> str:
    if batch[0].event is not None:
        return f"of {len(batch)} event(s)"
    return repr(batch[0].method)
