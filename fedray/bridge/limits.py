"""Bounded bookkeeping for the bridge: token buckets, the ids each connection acts for,
and event throttles. Every table here has a size bound, so a flood of made-up keys costs
memory that is capped, not proportional to the flood.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

BURST_S = 2.0  # a client may burst up to this many seconds' worth of its RPC rate
MAX_LIMITER_KEYS = 100_000  # token buckets kept per limiter (least recently used go first)
MAX_KEY_CHARS = 128  # longer keys are kept as a digest: 100k keys stay under ~30 MiB
MAX_PEERS = 50_000  # connections whose claimed ids are remembered
MAX_PEER_IDS = 200_000  # claimed ids remembered over all connections
MAX_CALLS_IN_FLIGHT = 8  # per client: its task stream, a heartbeat, a transfer, spares


class RateLimiter:
    """Token buckets per key: ``rate`` calls a second, bursts of ``burst_s`` seconds' worth.
    At most ``max_keys`` buckets are kept (the least recently used go first), and a key
    longer than ``MAX_KEY_CHARS`` is kept as its digest, so the table has a size bound."""

    def __init__(self, rate: float, max_keys: int = MAX_LIMITER_KEYS,
                 burst_s: float = BURST_S) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * burst_s)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float | None = None) -> bool:
        if len(key) > MAX_KEY_CHARS:
            key = "sha256:" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()
        now = time.monotonic() if now is None else now
        tokens, stamp = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - stamp) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed


class PeerIds:
    """The client ids each connection (gRPC peer) has acted for, at most ``per_peer`` each.

    With the shared token a caller names itself, so without this bound one connection
    could act for any number of made-up clients, each with a fresh rate budget, and fill
    ``max_clients``. The table is bounded too: ``MAX_PEERS`` connections and
    ``MAX_PEER_IDS`` ids in all, the least recently seen connection forgotten first."""

    def __init__(self, per_peer: int, max_peers: int = MAX_PEERS,
                 max_ids: int = MAX_PEER_IDS) -> None:
        self.per_peer, self.max_peers, self.max_ids = per_peer, max_peers, max_ids
        self._ids: OrderedDict[str, set[str]] = OrderedDict()
        self._count = 0

    def hold(self, peer: str, client_id: str) -> bool:
        """Whether ``peer`` may act for ``client_id`` (remembering it if so)."""
        ids = self._ids.pop(peer, None)
        if ids is None:
            ids = set()
        self._ids[peer] = ids
        if client_id in ids:
            return True
        if len(ids) >= self.per_peer:
            return False
        ids.add(client_id)
        self._count += 1
        while len(self._ids) > self.max_peers or self._count > self.max_ids:
            _, gone = self._ids.popitem(last=False)
            self._count -= len(gone)
        return True


class EventThrottle:
    """At most ``burst`` events at once, then one every ``every_s``; counts what it drops."""

    def __init__(self, burst: int = 20, every_s: float = 5.0) -> None:
        self.limiter = RateLimiter(1.0 / every_s)
        self.limiter.capacity = float(burst)
        self.suppressed = 0

    def allow(self, now: float | None = None) -> tuple[bool, int]:
        """(record this one?, how many were dropped since the last one recorded)."""
        if not self.limiter.allow("events", now):
            self.suppressed += 1
            return False, 0
        dropped, self.suppressed = self.suppressed, 0
        return True, dropped


Slots = tuple[tuple[str, int], ...]  # (key, how many calls it may have running)


class InFlight:
    """Calls running per key, each key under its own cap. Without it one client with a
    valid token could open calls that never end (an upload without a header, a download
    it never reads) until the server's concurrent-RPC limit is full and every other
    client's heartbeat is refused. A key is kept only while it has calls running, so the
    table is bounded by that same limit."""

    def __init__(self) -> None:
        self._running: dict[str, int] = {}

    def enter(self, slots: Slots) -> str | None:
        """Take a call slot under every key, or take none and name the key that is full."""
        for key, cap in slots:
            if self._running.get(key, 0) >= cap:
                return key
        for key, _ in slots:
            self._running[key] = self._running.get(key, 0) + 1
        return None

    def leave(self, slots: Slots) -> None:
        for key, _ in slots:
            left = self._running.get(key, 0) - 1
            if left > 0:
                self._running[key] = left
            else:
                self._running.pop(key, None)

    def __len__(self) -> int:
        return len(self._running)
