"""Tracking writes from actors: queued, written by one thread, retried until they land.

Controller and combiner actors run an asyncio loop that serves gRPC; a database call
there would stall every client of that actor, and a database outage must not lose the
history of a round. So actors only ``submit`` writes: the call is copied and queued (in
memory, O(1), never blocking), and a single background thread performs them in order on
a ``TrackingStore``. Connection errors are retried with exponential backoff (up to
``max_backoff_s``) for as long as it takes; documents keep the time they were submitted
(``written_at``), not the time the database came back. A write the database refuses
(bad document, unknown session, ...) is logged and dropped, and the thread goes on.
Consecutive events are written with one ``insert_many``; when the database refuses such a
batch, its events are written one by one, so only the bad one is dropped.

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
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fedray.errors import TrackingError
from fedray.tracking.documents import make_event, utcnow, written_at
from fedray.tracking.store import WRITE_METHODS, TrackingStore, is_transient

log = logging.getLogger(__name__)

StoreFactory = Callable[[], TrackingStore]


@dataclass(slots=True)
class _Write:
    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    at: datetime | None = None
    event: dict[str, Any] | None = None  # set for events, which are batched


class TrackingWriter:
    """Performs ``TrackingStore`` writes in a background thread, in submission order."""

    def __init__(
        self,
        store_factory: StoreFactory,
        *,
        batch_size: int = 500,
        max_backoff_s: float = 5.0,
        name: str = "fedray-tracking-writer",
    ) -> None:
        self._factory = store_factory
        self._batch_size = batch_size
        self._max_backoff_s = max_backoff_s
        self._queue: deque[_Write] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abort = threading.Event()
        self.written = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    @property
    def pending(self) -> int:
        """Writes submitted but not yet done (including the one in progress)."""
        with self._cond:
            return len(self._queue)

    def submit(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Queue ``store.<method>(*args, **kwargs)``; returns at once.

        Arguments are deep-copied now, so the caller may reuse or mutate them. Only
        TrackingStore write methods are accepted; a bad event level raises here.
        """
        if method not in WRITE_METHODS:
            raise ValueError(f"{method!r} is not a TrackingStore write method")
        if method == "event":
            item = _Write("insert_events", event=make_event(*args, **kwargs))
        else:
            item = _Write(method, copy.deepcopy(args), copy.deepcopy(kwargs), at=utcnow())
        with self._cond:
            if self._closing:
                raise TrackingError("the tracking writer is closed")
            self._queue.append(item)
            self._cond.notify_all()

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
            while self._queue:
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

    def _run(self) -> None:
        store: TrackingStore | None = None
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or self._abort.is_set():
                    break
                batch = self._next_batch()
            store = self._perform(store, batch)
            with self._cond:
                for _ in batch:
                    self._queue.popleft()
                self._cond.notify_all()
        with self._cond:
            lost = len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if lost:
            self.dropped += lost
            log.error("tracking writer closed with %d write(s) it could not deliver", lost)
        if store is not None:
            store.close()

    def _next_batch(self) -> list[_Write]:
        """The head of the queue: one write, or a run of consecutive events."""
        if self._queue[0].event is None:
            return [self._queue[0]]
        batch = []
        for item in self._queue:
            if item.event is None or len(batch) >= self._batch_size:
                break
            batch.append(item)
        return batch

    def _perform(self, store: TrackingStore | None, batch: list[_Write]) -> TrackingStore | None:
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
                    self.dropped += len(batch)
                    log.error("tracking write %s dropped: %s", _describe(batch), exc)
                    return store
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("tracking database unreachable, will retry: %s", exc)
                else:
                    log.debug("tracking database still unreachable: %s", exc)
            if self._abort.wait(delay):
                self.dropped += len(batch)
                log.error("tracking write %s dropped on close", _describe(batch))
                return store
            delay = min(delay * 2, self._max_backoff_s)

    @staticmethod
    def _call(store: TrackingStore, batch: list[_Write]) -> None:
        head = batch[0]
        if head.event is not None:
            store.insert_events([item.event for item in batch if item.event is not None])
            return
        with written_at(head.at or utcnow()):
            getattr(store, head.method)(*head.args, **head.kwargs)


def _describe(batch: list[_Write]) -> str:
    if batch[0].event is not None:
        return f"of {len(batch)} event(s)"
    return repr(batch[0].method)
