"""A combiner's connected clients: one task queue each, heartbeats, and who is online.

One event loop serves every client: each connected client is a queue of tasks, not a
thread. A client is online from its ``Join`` until its task stream closes, its heartbeats
stop for ``offline_after_s``, or it joins again (the new stream replaces the old one).
The registry says who came and went (``on_joined``, ``on_gone``); what that means for the
open share is the core's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedray.actors.combiner.pacing import beat_interval, offline_after
from fedray.config import CombinersConfig
from fedray.messages import MAX_ATTRS, Task
from fedray.strategies.snapshots import ClientInfo

CLIENT_STATUSES = {"online", "training", "validating"}  # what a heartbeat may report


class CombinerListener(Protocol):
    def event(self, level: str, message: str, **data: Any) -> None: ...
    def client_status(self, client_id: str, name: str, status: str, online: int,
                      attrs: Mapping[str, str] | None = None,
                      version: str | None = None, connection: str | None = None) -> None: ...
    def round_closed(self, result: Any) -> None: ...


@dataclass(eq=False)
class ClientLink:
    client_id: str
    name: str
    attrs: dict[str, str] = field(default_factory=dict)
    queue: asyncio.Queue[Task | None] = field(default_factory=asyncio.Queue)
    last_seen: float = field(default_factory=time.monotonic)
    joined_at: float = field(default_factory=time.monotonic)
    status: str = "online"
    moved: str = ""  # why this combiner ended the stream to send it elsewhere (rebalance)
    peer: str = ""  # the connection it joined on (a shared-token client is bound to it)
    # this Join's id, tracked with the client: unchanged while the client stays connected
    connection_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def send(self, task: Task) -> None:
        self.queue.put_nowait(task)

    def close(self) -> None:
        """End this client's task stream (its Join returns)."""
        self.queue.put_nowait(None)


class ClientRegistry:
    def __init__(self, combiner: str, settings: CombinersConfig, listener: CombinerListener,
                 on_joined: Callable[[ClientLink], None],
                 on_gone: Callable[[ClientLink, str], None]) -> None:
        self.combiner = combiner
        self.settings = settings
        self.listener = listener
        self.links: dict[str, ClientLink] = {}
        self._on_joined, self._on_gone = on_joined, on_gone
        self._changed = asyncio.Event()

    def get(self, client_id: str) -> ClientLink | None:
        """The client's link while it is online."""
        link = self.links.get(client_id)
        return link if link is not None and link.status != "offline" else None

    def online_ids(self) -> list[str]:
        return sorted(cid for cid, link in self.links.items() if link.status != "offline")

    def online_info(self) -> list[ClientInfo]:
        return [ClientInfo(cid, self.combiner, link.name, dict(link.attrs))
                for cid, link in sorted(self.links.items()) if link.status != "offline"]

    def has_room(self) -> bool:
        return len(self.online_ids()) < self.settings.max_clients

    def held_elsewhere(self, client_id: str, peer: str) -> bool:
        """Whether ``client_id`` is online on another connection than ``peer``: a caller
        who only names itself (a shared token) may not take over that stream."""
        link = self.get(client_id)
        return link is not None and bool(link.peer) and link.peer != peer

    def connect(self, client_id: str, name: str, attrs: Mapping[str, str] | None = None,
                version: str = "", peer: str = "") -> ClientLink:
        """Register a client (a reconnect replaces its old stream); it is online from now.
        ``attrs`` and ``version`` are what it says about itself (tracked with it)."""
        old = self.links.get(client_id)
        if old is not None:
            old.close()
        link = ClientLink(client_id=client_id, name=name,
                          attrs=dict(list((attrs or {}).items())[:MAX_ATTRS]), peer=peer)
        self.links[client_id] = link
        self.listener.client_status(client_id, name, "online", len(self.online_ids()),
                                    link.attrs, version, link.connection_id)
        self._membership_changed()
        self.listener.event("info", f"client {name} joined combiner {self.combiner}",
                            client_id=client_id)
        self._on_joined(link)
        return link

    async def tasks(self, link: ClientLink) -> AsyncIterator[Task]:
        """The task stream of one connected client; it goes offline when this ends."""
        try:
            while True:
                task = await link.queue.get()
                if task is None:
                    return
                yield task
        finally:
            if self.links.get(link.client_id) is link and link.status != "offline":
                self.gone(link, "its task stream closed")

    def heartbeat(self, client_id: str, status: str = "") -> bool:
        link = self.get(client_id)
        if link is None:
            return False
        link.last_seen = time.monotonic()
        if status in CLIENT_STATUSES and status != link.status:  # "offline" is ours to say
            link.status = status
            self.listener.client_status(client_id, link.name, status, len(self.online_ids()))
        return True

    def beat_interval(self) -> float:
        """The heartbeat interval clients are told now (``pacing``: it grows with them)."""
        return beat_interval(self.settings.heartbeat_interval_s, len(self.links))

    def sweep(self) -> None:
        """Mark clients offline whose heartbeats stopped; called about once a second."""
        s = self.settings
        after = offline_after(s.offline_after_s, s.heartbeat_interval_s, self.beat_interval())
        limit = time.monotonic() - after
        for link in list(self.links.values()):
            if link.status != "offline" and link.last_seen < limit:
                link.close()
                self.gone(link, f"no heartbeat for {after:g}s")

    def close_all(self) -> None:
        for link in self.links.values():
            link.close()

    def gone(self, link: ClientLink, why: str) -> None:
        link.status = "offline"
        if self.links.get(link.client_id) is link:  # forget it: ids cannot pile up
            del self.links[link.client_id]
        self.listener.client_status(link.client_id, link.name, "offline",
                                    len(self.online_ids()))
        self._membership_changed()
        self._on_gone(link, why)

    def _membership_changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # waiters keep the one that just fired

    async def wait_changed(self, known: int, timeout_s: float) -> list[str]:
        """Online clients, once their number differs from ``known`` (or at ``timeout_s``)."""
        if len(self.online_ids()) == known:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self.online_ids()
