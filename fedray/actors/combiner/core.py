"""The combiner's logic, as the gRPC servicer and the Ray actor see it: one facade.

Pure asyncio; it imports neither grpc nor Ray, so tests drive it in-process. It holds the
session's strategies (given once per session, with what each declared) and composes the
parts that do the work, each with its own state:

    ClientRegistry  connected clients, their task queues and heartbeats   (clients)
    ModelShelf      the models served, each serialized once               (shelf)
    ShareSlot       the one share open now                                (share)
    RoundShares     a share of one stage of a synchronous round           (rounds)
    AsyncServing    an asynchronous session's endless share               (async_share)
    UpdateIntake    receiving, checking and folding updates               (intake)

What crosses between them goes through here: a client leaving settles its task in the
open share; a settled task closes a round's share or gives an asynchronous participant
its next task. Observability plugs in through a ``CombinerListener`` whose failures
never stop a round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import numpy as np

from fedray.actors.balance import ClientView, movable_ids
from fedray.actors.combiner.async_share import AsyncServing
from fedray.actors.combiner.clients import ClientLink, ClientRegistry, CombinerListener
from fedray.actors.combiner.intake import UpdateIntake
from fedray.actors.combiner.rounds import Claimer, RoundShares
from fedray.actors.combiner.share import Share, ShareSlot
from fedray.actors.combiner.shelf import ModelShelf
from fedray.config import CombinersConfig
from fedray.errors import UnknownSession
from fedray.messages import (
    AsyncSpec,
    RoundResult,
    RoundSpec,
    StageReply,
    Task,
    UpdateHeader,
    ValidationReport,
)
from fedray.strategies.base import Strategy
from fedray.strategies.codecs.coded import coded_declaration
from fedray.strategies.declaration import Declaration
from fedray.strategies.snapshots import ClientInfo
from fedray.strategies.updates import Buffer

log = logging.getLogger(__name__)

KEPT_SESSIONS = 4  # strategies of recent sessions (a restarted controller may resume one)
# No client is moved away this long after the controller took a snapshot of who is online
# here: a round planned over that snapshot may be on its way (its tasks not out yet).
PLANNING_HOLD_S = 3.0
MOVED = "rebalance"  # ClientLink.moved: the stream ended to even the load
DRAINED = "drain"  # ClientLink.moved: this combiner leaves the elastic tier


class NullListener:
    def event(self, level: str, message: str, **data: Any) -> None:
        log.log(logging.getLevelName(level.upper()), message)

    def client_status(self, client_id: str, name: str, status: str, online: int,
                      attrs: Mapping[str, str] | None = None,
                      version: str | None = None, connection: str | None = None) -> None:
        pass

    def round_closed(self, result: RoundResult) -> None:
        pass


def _copy_keeper(raw: Buffer) -> Any:
    return np.array(raw, dtype=np.uint8, copy=True)  # outside Ray: a private copy


class CombinerCore:
    def __init__(self, name: str, settings: CombinersConfig,
                 listener: CombinerListener | None = None,
                 keeper: Callable[[Buffer], Any] = _copy_keeper,
                 claimer: Claimer | None = None) -> None:
        self.name = name
        self.settings = settings
        self.listener = listener or NullListener()
        self.stopping = False
        self.draining = False  # leaving the elastic tier: no new client joins
        self.snapshot_at = -PLANNING_HOLD_S  # when online_info last answered
        self.sessions: OrderedDict[str, tuple[Strategy, Declaration]] = OrderedDict()
        max_update = int(settings.max_update_mb * 1024 * 1024)
        self.registry = ClientRegistry(name, settings, self.listener, self._joined, self._gone)
        self.shelf = ModelShelf(settings.chunk_kib * 1024)
        self.slot = ShareSlot()
        self.rounds = RoundShares(name, self.registry, self.shelf, self.slot, self.listener,
                                  keeper, claimer, max_update)
        self.async_share = AsyncServing(name, self.registry, self.shelf, self.slot, keeper,
                                        max_update)
        self.intake = UpdateIntake(settings.max_inflight_uploads, max_update,
                                   settings.upload_idle_s, self.slot.lookup, self._settle,
                                   self.listener, self.rounds.claim)

    @property
    def share(self) -> Share | None:
        return self.slot.share

    @property
    def clients(self) -> dict[str, ClientLink]:
        return self.registry.links

    @property
    def models(self) -> Mapping[str, np.ndarray]:
        return self.shelf.models

    @property
    def bytes_out(self) -> int:
        return self.shelf.bytes_out

    # ----------------------------------------------------------------- clients

    def online_clients(self) -> list[str]:
        return self.registry.online_ids()

    def online_info(self) -> list[ClientInfo]:
        """Who is online, as a round is planned over it: moves wait ``PLANNING_HOLD_S``."""
        self.snapshot_at = time.monotonic()
        return self.registry.online_info()

    def views(self) -> list[ClientView]:
        """Every online client as the balancing policy sees it (not the ones leaving)."""
        share = self.share
        waiting = set() if share is None or share.closed.is_set() else \
            {e.client_id for e in share.tasks.values()} - share.settled
        if share is not None and share.asynchronous:  # its update is with the controller
            waiting |= self.async_share.waiting
        return [ClientView(cid, link.joined_at, cid in waiting)
                for cid, link in self.registry.links.items()
                if link.status != "offline" and not link.moved]  # a mover is leaving

    def balance_info(self, recent_s: float, settle_s: float) -> dict[str, Any]:
        """Load for the gateway and the rebalancer: online clients, how many of them may
        move now (none within ``PLANNING_HOLD_S`` of a planning snapshot), and the ids
        that joined within ``recent_s``."""
        now = time.monotonic()
        views = self.views()
        return {"load": len(views),
                "movable": 0 if self._held(now) else len(movable_ids(views, now, settle_s)),
                "joined": [v.client_id for v in views if now - v.joined_at < recent_s]}

    def _held(self, now: float) -> bool:
        """No move now: this combiner stops, or a round planned over its last snapshot of
        clients may be on its way (until that round's share opens here)."""
        share = self.share
        opened = share is not None and share.started >= self.snapshot_at
        return self.stopping or (now - self.snapshot_at < PLANNING_HOLD_S and not opened)

    def release(self, count: int, settle_s: float) -> list[str]:
        """End the task streams of up to ``count`` movable clients (``movable_ids``), so
        they ask the gateway again; decided here, in one step of this combiner's loop, so
        a client that got a task meanwhile, or a round being planned, is left alone."""
        now = time.monotonic()
        if count <= 0 or self._held(now):
            return []
        chosen = movable_ids(self.views(), now, settle_s)[:count]
        for client_id in chosen:
            link = self.registry.links[client_id]
            link.moved = MOVED
            link.close()
        if chosen:
            self.listener.event("info", f"combiner {self.name} sent {len(chosen)} client(s) "
                                "to the gateway to even the load", moved=len(chosen),
                                reason=MOVED)
        return chosen

    def accepts_clients(self) -> bool:
        return not self.draining and self.registry.has_room()

    async def drain(self) -> list[str]:
        """Leave the elastic tier: accept no new client; once the open share has closed
        (this combiner's part of the current round is handed in) and no round planned over
        its clients can still be on its way (``PLANNING_HOLD_S``), end every client's task
        stream with ``fedray-rejoin: drain`` so that it asks the gateway again. Returns
        the ids sent away."""
        self.draining = True
        while True:
            share = self.share
            if share is not None and not share.asynchronous and not share.closed.is_set():
                await share.closed.wait()
                continue
            left = PLANNING_HOLD_S - (time.monotonic() - self.snapshot_at)
            opened = share is not None and share.started >= self.snapshot_at
            if left > 0 and not opened:
                await asyncio.sleep(left)  # until that planning's snapshot is too old to use
                continue
            break
        ids = [cid for cid, link in self.registry.links.items()
               if link.status != "offline" and not link.moved]
        for client_id in ids:
            link = self.registry.links[client_id]
            link.moved = DRAINED
            link.close()
        self.listener.event("info", f"combiner {self.name} is drained: {len(ids)} client(s) "
                            "sent to the gateway", moved=len(ids), reason=DRAINED)
        return ids

    def connect(self, client_id: str, name: str, attrs: Mapping[str, str] | None = None,
                version: str = "", peer: str = "") -> ClientLink:
        return self.registry.connect(client_id, name, attrs, version, peer)

    def tasks(self, link: ClientLink) -> AsyncIterator[Task]:
        return self.registry.tasks(link)

    def heartbeat(self, client_id: str, status: str = "") -> bool:
        return self.registry.heartbeat(client_id, status)

    def sweep(self) -> None:
        self.registry.sweep()

    async def wait_clients_changed(self, known: int, timeout_s: float) -> list[str]:
        return await self.registry.wait_changed(known, timeout_s)

    def disconnect_all(self) -> None:
        """Close every task stream (the combiner stops): clients leaving now is expected."""
        self.stopping = True
        self.registry.close_all()

    def _joined(self, link: ClientLink) -> None:
        self.async_share.rejoined(link)

    def _gone(self, link: ClientLink, why: str) -> None:
        share = self.share
        busy = share is not None and not share.closed.is_set() \
            and any(e.client_id == link.client_id for e in share.tasks.values()) \
            and link.client_id not in share.settled
        # Leaving while a task waits on it matters; leaving between sessions, or because
        # this combiner is stopping, is how every session ends.
        level = "warning" if busy and not self.stopping else "info"
        self.listener.event(level, f"client {link.name} is offline: {why}",
                            client_id=link.client_id)
        if busy:
            assert share is not None
            share.failed += 1
            share.gone.add(link.client_id)
            self._settle(share, link.client_id, False)

    def _settle(self, share: Share, client_id: str, accepted: bool) -> None:
        if share.asynchronous:
            self.async_share.settle(share, client_id, accepted)
        else:
            self.rounds.settle(share, client_id)

    # ----------------------------------------------------------------- models

    def model_chunks(self, wanted: str, delta_from: str = "",
                     ) -> Iterator[tuple[memoryview, int, int]]:
        return self.shelf.chunks(wanted, delta_from)

    # ----------------------------------------------------------------- sessions

    def start_session(self, session_id: str, strategy: Strategy) -> None:
        """The session's strategy, given once; every later round of it uses this one."""
        self.sessions[session_id] = (strategy, strategy.declare())
        self.sessions.move_to_end(session_id)
        while len(self.sessions) > KEPT_SESSIONS:
            self.sessions.popitem(last=False)

    def _session(self, session_id: str) -> tuple[Strategy, Declaration]:
        found = self.sessions.get(session_id)
        if found is None:
            raise UnknownSession(f"combiner {self.name} has no strategy for session "
                                 f"{session_id}")
        return found

    async def run_round(self, spec: RoundSpec, model: np.ndarray | None) -> RoundResult:
        """Run this combiner's share of one stage of a round (see ``RoundShares``)."""
        strategy, declared = self._session(spec.session_id)  # before anything starts
        declared = coded_declaration(declared, spec.codec, spec.codec_options)
        self.async_share.stop("a round started")
        return await self.rounds.run(spec, model, strategy, declared)

    def buffer_full(self, session_id: str, round_: int, attempt: int) -> None:
        self.rounds.buffer_full(session_id, round_, attempt)

    async def start_async(self, spec: AsyncSpec, model: np.ndarray, version: int,
                          known_id: str = "") -> None:
        strategy, declared = self._session(spec.session_id)
        declared = coded_declaration(declared, spec.codec, spec.codec_options)
        await self.async_share.start(spec, model, version, known_id, strategy, declared)

    def add_clients(self, clients: tuple[str, ...] | list[str]) -> None:
        self.async_share.add_clients(clients)

    async def set_version(self, version: int, model: np.ndarray, known_id: str = "") -> None:
        await self.async_share.set_version(version, model, known_id)

    async def take_updates(self, session_id: str, timeout_s: float) -> RoundResult:
        """The updates accepted since the last call, with what this combiner did
        meanwhile (``AsyncServing.take_updates``); counted like a round's share."""
        result = await self.async_share.take_updates(session_id, timeout_s)
        self.listener.round_closed(result)
        return result

    def stop_async(self, session_id: str) -> dict[str, Any]:
        return self.async_share.stop("the session ended", session_id)

    # ----------------------------------------------------------------- reports

    async def push_update(self, header: UpdateHeader,
                          chunks: AsyncIterator[tuple[bytes, int]]) -> tuple[bool, str]:
        """Receive, check and fold one update (``fedray.actors.combiner.intake``)."""
        return await self.intake.push(header, chunks)

    def push_validation(self, report: ValidationReport) -> tuple[bool, str]:
        return self.rounds.push_validation(report)

    def push_reply(self, reply: StageReply) -> tuple[bool, str]:
        return self.rounds.push_reply(reply)

    def task_failed(self, client_id: str, task_id: str, message: str,
                    error_class: str = "") -> None:
        """A client reported that it could not run a task; stop waiting for it."""
        share = self.share
        entry = share.tasks.get(task_id) if share is not None else None
        if share is None or entry is None or entry.client_id != client_id \
                or client_id in share.settled:
            return
        why = f"{error_class}: {message}" if error_class else message
        share.failed += 1
        share.failures[client_id] = why[:500]
        self.listener.event("error", f"client {client_id} failed task {task_id[:12]}: {why}",
                            client_id=client_id, session_id=share.session_id,
                            round=share.round, error_class=error_class)
        self._settle(share, client_id, False)
