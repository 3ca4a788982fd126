"""A combiner serving an asynchronous session (FedBuff): clients train again and again.

``start_async`` opens a share with no deadline: every participant gets a train task on the
newest version; each accepted update is kept by handle (in Ray's object store when this
runs in an actor) and the participant gets its next task at once. The controller takes the
kept updates with ``take_updates`` (a long poll), announces each new version with
``set_version`` and adds clients that joined later with ``add_clients``. At most
``AsyncSpec.max_pending`` updates wait for the controller; more are refused
(``backpressure``) until it takes them. A mixin of ``CombinerCore``: it uses the core's
clients, models and share.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import numpy as np

from fedray.actors.combiner.intake import Limits, Share, TaskEntry
from fedray.errors import UnknownSession, UpdateRejected
from fedray.messages import AsyncSpec, TaskKind
from fedray.strategies.base import KeepAll, Kept, KeptUpdates, ShareStart, Update


class BoundedKeepAll(KeepAll):
    """Keeps updates for the controller, refusing more than ``limit`` not yet taken."""

    def __init__(self, share: ShareStart, limit: int) -> None:
        super().__init__(share)
        self.limit = limit

    def fold(self, update: Update) -> None:
        if len(self.kept.items) >= self.limit:
            raise UpdateRejected("backpressure", f"{self.limit} updates wait for the "
                                 "controller already")
        super().fold(update)


class AsyncServing:
    _async: AsyncSpec | None = None
    _participants: set[str] | frozenset[str] = frozenset()  # a set once a session starts

    async def start_async(self, spec: AsyncSpec, model: np.ndarray, version: int,
                          known_id: str = "") -> None:
        """Serve an asynchronous session: every participant trains, again and again."""
        strategy = self._strategy(spec.session_id)
        share = self.share
        if share is not None and share.asynchronous and share.session_id == spec.session_id \
                and not share.closed.is_set():
            await self.set_version(version, model, known_id)  # a retried call: catch up
            self.add_clients(spec.clients)
            return
        current = self._keep_model(model, version, known_id, keep=spec.kept_versions)
        keep = ShareStart(spec=current.layout.spec(), base=current.base, keep=self.keeper)
        share = Share(session_id=spec.session_id, round=version, kind=TaskKind.TRAIN,
                      strategy=strategy, accumulator=BoundedKeepAll(keep, spec.max_pending),
                      limits=Limits(spec.max_examples, spec.max_update_norm),
                      versions={version: current}, current=version, deadline=float("inf"),
                      asynchronous=True)
        self._open(share)
        self._async, self._participants = spec, set()
        self.add_clients(spec.clients)

    def add_clients(self, clients: tuple[str, ...] | list[str]) -> None:
        """More participants for the asynchronous session (clients that joined later)."""
        share = self.share
        if share is None or not share.asynchronous or share.closed.is_set():
            return
        for client_id in clients:
            if client_id not in self._participants:
                self._participants.add(client_id)
                self._dispatch_async(share, client_id)

    def _dispatch_async(self, share: Share, client_id: str) -> None:
        link = self.clients.get(client_id)
        spec = self._async
        if link is None or link.status == "offline" or spec is None \
                or client_id not in self._participants \
                or any(e.client_id == client_id for e in share.tasks.values()):
            return
        task_id = uuid.uuid4().hex
        share.tasks[task_id] = TaskEntry(client_id, share.current)
        link.queue.put_nowait(self._task(task_id, TaskKind.TRAIN, share.session_id,
                                         share.current, share.versions[share.current],
                                         spec.config, time.time() + spec.timeout_s,
                                         spec.package_sha256, spec.package_size))

    @staticmethod
    def _drop_tasks(share: Share, client_id: str) -> None:
        for task_id in [t for t, e in share.tasks.items() if e.client_id == client_id]:
            del share.tasks[task_id]

    async def set_version(self, version: int, model: np.ndarray, known_id: str = "") -> None:
        """A new global version: tasks from now on train it; recent ones stay servable."""
        share, spec = self.share, self._async
        if share is None or not share.asynchronous or spec is None or version <= share.current:
            return
        async with share.fold_lock:  # no fold is halfway through reading ``current``
            share.versions[version] = self._keep_model(model, version, known_id,
                                                       keep=spec.kept_versions)
            share.current = version
            for old in sorted(share.versions)[: max(0, len(share.versions) - spec.kept_versions)]:
                del share.versions[old]

    async def take_updates(self, session_id: str, timeout_s: float) -> list[Kept]:
        """The updates accepted since the last call (waits up to ``timeout_s`` for one)."""
        share = self.share
        if share is None or not share.asynchronous or share.session_id != session_id:
            raise UnknownSession(f"combiner {self.name} serves no asynchronous session "
                                 f"{session_id}")
        kept: KeptUpdates = share.accumulator.partial()  # type: ignore[union-attr]
        share.arrived.clear()  # before looking: an update folded meanwhile sets it again
        if not kept.items and not share.closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(share.arrived.wait(), timeout_s)
        async with share.fold_lock:
            items, kept.items = kept.items, []
        return items

    def stop_async(self, session_id: str) -> dict[str, Any]:
        """End the asynchronous session; what it counted (late updates are dropped)."""
        return self._stop_async_share("the session ended", session_id)

    def _stop_async_share(self, why: str, session_id: str | None = None) -> dict[str, Any]:
        share = self.share
        if share is None or not share.asynchronous \
                or (session_id is not None and share.session_id != session_id):
            return {}
        self._close(share, why)
        self._participants = set()
        share.tasks.clear()
        return {"accepted": share.accepted, "rejected": dict(share.rejected),
                "failed": share.failed, "bytes_in": share.bytes_in}

