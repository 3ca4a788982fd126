"""The TrackingWriter's queue: bounded, in submission order, and dropping by value when full.

When the queue holds ``max_pending`` writes, the least valuable queued write makes room,
oldest first: debug events, then info events, then warning events and client/combiner
status, then error events. Session, round, model, validation and package writes are never
dropped (there are a handful per round). Writes dropped for room are counted by kind
until the queue has drained to half, and then told in one warning event
(``drop_report``).

Kept apart from ``writer`` so the drop policy reads on its own, apart from the thread,
its retries and its chores. Not thread-safe: the writer calls it with its lock held.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fedray.tracking.documents import LEVELS, make_event

log = logging.getLogger("fedray.tracking.writer")  # what it says is the writer's news

# Never dropped for room: the session's own history, a handful of writes per round.
PROTECTED = frozenset({"ensure_indexes", "create_session", "update_session", "start_round",
                       "update_round", "add_model", "add_validation", "add_package"})
STATUS_RANK = LEVELS.index("warning")  # upsert_client/_combiner, restarts: as a warning
RANKS = len(LEVELS)


@dataclass(slots=True)
class Write:
    """One queued ``TrackingStore`` call."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    at: datetime | None = None
    event: dict[str, Any] | None = None  # set for events, which are batched
    rank: int | None = None  # what it is worth when the queue is full; None: never dropped
    label: str = ""  # what drop reports call it: an event level or a method
    dropped: bool = False  # evicted while queued: the thread skips it


def ranked(item: Write) -> Write:
    """``item`` with its rank and label set: what it is worth, and what drops call it."""
    if item.event is not None:
        item.label = item.event["level"]
        item.rank = LEVELS.index(item.label)
    else:
        item.label = item.method
        item.rank = None if item.method in PROTECTED else STATUS_RANK
    return item


class WriteQueue:
    """Queued writes, in order, at most ``max_pending`` of them (protected ones aside)."""

    def __init__(self, max_pending: int, batch_size: int, source: str) -> None:
        self.max_pending = max(1, max_pending)
        self._batch_size = batch_size
        self._source = source
        self._items: deque[Write] = deque()  # in order; evicted items stay until popped
        self._by_rank: tuple[deque[Write], ...] = tuple(deque() for _ in range(RANKS))
        self.queued = 0  # live items in _items
        self._evicted = 0  # evicted items still in _items
        self._unreported: Counter[str] = Counter()  # dropped for room, by label, not yet told

    def offer(self, item: Write) -> Write | None:
        """Queue ``item``, making room when full; returns what was lost: a queued write,
        ``item`` itself, or None."""
        lost = self._make_room(item) if self.queued >= self.max_pending else None
        if lost is not item:
            self.append(item)
        return lost

    def append(self, item: Write) -> None:
        """Queue ``item`` whether or not there is room."""
        self._items.append(item)
        if item.rank is not None:
            self._by_rank[item.rank].append(item)
        self.queued += 1

    def take_batch(self) -> list[Write]:
        """The head of the queue: one write, or a run of consecutive events."""
        batch: list[Write] = []
        while self._items:
            item = self._items[0]
            if item.dropped:
                self._items.popleft()
                self._evicted -= 1
                continue
            if batch and (item.event is None or len(batch) >= self._batch_size):
                break
            self._items.popleft()
            if item.rank is not None:
                head = self._by_rank[item.rank].popleft()
                assert head is item
            batch.append(item)
            if item.event is None:
                break
        self.queued -= len(batch)
        return batch

    def drop_report(self) -> Write | None:
        """One warning event about writes dropped for room, once the queue has drained."""
        if not self._unreported or self.queued > self.max_pending // 2:
            return None
        counts, self._unreported = dict(self._unreported), Counter()
        total = sum(counts.values())
        kinds = ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
        message = (f"the tracking queue was full ({self.max_pending} writes): dropped {total} "
                   f"low-value write(s) ({kinds})")
        event = make_event("warning", self._source, message,
                           data={"reason": "tracking_queue_full", "dropped": total,
                                 "by_kind": counts})
        return Write("insert_events", event=event, label="warning")  # rank None: kept

    def clear(self) -> int:
        """Forget every queued write; how many there were."""
        lost = self.queued
        self._items.clear()
        for ranked_items in self._by_rank:
            ranked_items.clear()
        self.queued = self._evicted = 0
        return lost

    def _make_room(self, item: Write) -> Write | None:
        """Evict the oldest queued write worth less than ``item`` (anything droppable for a
        protected one); returns what was lost: that write, ``item`` itself, or None."""
        ceiling = RANKS if item.rank is None else item.rank
        for rank in range(ceiling):
            if self._by_rank[rank]:
                victim = self._by_rank[rank].popleft()
                victim.dropped, victim.event, victim.args, victim.kwargs = True, None, (), {}
                self.queued -= 1
                self._evicted += 1
                self._count_for_room(victim)
                if self._evicted > max(self.queued, 1024):  # keep the deque O(max_pending)
                    self._items = deque(w for w in self._items if not w.dropped)
                    self._evicted = 0
                return victim
        if item.rank is None:
            return None  # protected writes always get in: there are few of them
        self._count_for_room(item)
        return item

    def _count_for_room(self, item: Write) -> None:
        if not self._unreported:
            log.warning("tracking queue full (%d writes): dropping low-value writes",
                        self.max_pending)
        self._unreported[item.label] += 1
