"""A combiner serving an asynchronous session (FedBuff): clients train again and again.

``start`` opens a share with no deadline: every participant gets a train task on the
newest version; each accepted update is kept by handle (in Ray's object store when this
runs in an actor). The controller takes the kept updates with ``take_updates`` (a long
poll), announces each new version with ``set_version`` and adds clients that joined later
with ``add_clients``.

A participant whose update was accepted gets its next task only once the controller is
done with that update: its next ``take_updates`` call says so (it comes after the
controller folded the updates it took last, and committed and announced any version they
completed). So the next task starts from the newest committed version, which may be the
one that update helped build, and no client runs ahead of the controller: each has at
most one update waiting there. (Sent at once instead, every task trained a version the
controller was about to replace, and when clients outpaced the controller the updates
queued up until they were ``max_staleness`` versions old: issue 15.) A refused update, or
a failed task, gets the next task at once. At most ``AsyncSpec.max_pending`` updates wait
for the controller; more are refused (``backpressure``) until it takes them.

Its state is its own: the session's spec and its participants; the clients, the models
and the open share come from the registry, the shelf and the slot it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedray.actors.combiner.checks import bounded, expected_for
from fedray.actors.combiner.clients import ClientLink, ClientRegistry
from fedray.actors.combiner.share import Limits, Share, ShareSlot, TaskEntry, task_for
from fedray.actors.combiner.shelf import ModelShelf
from fedray.errors import UnknownSession, UpdateRejected
from fedray.messages import AsyncSpec, MetricSums, RoundResult, TaskKind
from fedray.strategies.base import Strategy
from fedray.strategies.codecs.coded import codec_of
from fedray.strategies.declaration import Declaration, UpdateLayout
from fedray.strategies.updates import Buffer, KeepAll, Kept, KeptUpdates, ShareStart, Update


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
    def __init__(self, name: str, registry: ClientRegistry, shelf: ModelShelf,
                 slot: ShareSlot, keeper: Callable[[Buffer], Any],
                 max_update_bytes: int) -> None:
        self.name = name
        self.registry = registry
        self.shelf = shelf
        self.slot = slot
        self.keeper = keeper
        self.max_update_bytes = max_update_bytes
        self.spec: AsyncSpec | None = None
        self.client_half = ""
        self.layout = UpdateLayout()
        self.participants: set[str] = set()
        self.waiting: set[str] = set()  # their update is at the controller: no task yet
        self.handed: set[str] = set()  # ... handed over by the last take_updates
        self.counted = Counted()  # what the last take_updates reported

    def _open_share(self, session_id: str | None = None) -> Share | None:
        """The open asynchronous share (of ``session_id``, when named), if there is one."""
        share = self.slot.share
        if share is None or not share.asynchronous or share.closed.is_set() \
                or (session_id is not None and share.session_id != session_id):
            return None
        return share

    async def start(self, spec: AsyncSpec, model: np.ndarray, version: int, known_id: str,
                    strategy: Strategy, declared: Declaration) -> None:
        """Serve an asynchronous session: every participant trains, again and again."""
        if self._open_share(spec.session_id) is not None:
            await self.set_version(version, model, known_id)  # a retried call: catch up
            self.add_clients(spec.clients)
            return
        current = bounded(self.shelf.keep(model, version, known_id, keep=spec.kept_versions),
                          declared.layout, spec.max_update_norm, spec.max_update_norm_ratio)
        keep = ShareStart(spec=current.layout.spec(), base=current.base, keep=self.keeper)
        share = Share(session_id=spec.session_id, round=version, kind=TaskKind.TRAIN,
                      strategy=strategy, accumulator=BoundedKeepAll(keep, spec.max_pending),
                      limits=Limits(spec.max_examples),
                      versions={version: current}, current=version, deadline=float("inf"),
                      stage=declared.train,
                      expected=expected_for(declared.layout, current, self.max_update_bytes),
                      asynchronous=True)
        self.slot.open(share)
        self.spec, self.participants, self.client_half = spec, set(), declared.client_half
        self.waiting, self.handed = set(), set()
        self.counted = Counted(bytes_out=self.shelf.bytes_out)
        self.layout = declared.layout
        self.add_clients(spec.clients)

    def add_clients(self, clients: tuple[str, ...] | list[str]) -> None:
        """More participants for the asynchronous session (clients that joined later)."""
        share = self._open_share()
        if share is None:
            return
        for client_id in clients:
            if client_id not in self.participants:
                self.participants.add(client_id)
                self.dispatch(share, client_id)

    def dispatch(self, share: Share, client_id: str) -> None:
        """A train task on the newest version, unless the client has one already or its
        last update is still with the controller."""
        link = self.registry.get(client_id)
        spec = self.spec
        if link is None or spec is None or client_id not in self.participants \
                or client_id in self.waiting \
                or any(e.client_id == client_id for e in share.tasks.values()):
            return
        task_id = uuid.uuid4().hex
        share.tasks[task_id] = TaskEntry(client_id, share.current)
        link.send(task_for(task_id, share, share.versions[share.current], spec.config,
                           time.time() + spec.timeout_s,
                           (spec.package_sha256, spec.package_size),
                           client_half=self.client_half, codec=codec_of(self.layout)))

    def settle(self, share: Share, client_id: str, accepted: bool) -> None:
        """The client's task is over: refused or failed, its next one now; accepted, its
        next one once the controller is done with the update (``take_updates``)."""
        drop_tasks(share, client_id)
        if accepted:
            self.waiting.add(client_id)
        elif not share.closed.is_set():
            self.dispatch(share, client_id)

    def _release(self, share: Share) -> None:
        """The controller is done with the updates it took last: their clients' next tasks,
        on the newest version it announced."""
        handed, self.handed = self.handed, set()
        self.waiting -= handed
        if not share.closed.is_set():
            for client_id in sorted(handed):
                self.dispatch(share, client_id)

    def rejoined(self, link: ClientLink) -> None:
        """A participant joined again: the old stream's task died with it."""
        share = self._open_share()
        if share is not None and link.client_id in self.participants:
            drop_tasks(share, link.client_id)
            self.dispatch(share, link.client_id)

    async def set_version(self, version: int, model: np.ndarray, known_id: str = "") -> None:
        """A new global version: tasks from now on train it; recent ones stay servable."""
        share, spec = self._open_share(), self.spec
        if share is None or spec is None or version <= share.current:
            return
        async with share.fold_lock:  # no fold is halfway through reading ``current``
            share.versions[version] = bounded(
                self.shelf.keep(model, version, known_id, keep=spec.kept_versions),
                self.layout, spec.max_update_norm, spec.max_update_norm_ratio)
            share.current = version
            for old in sorted(share.versions)[: max(0, len(share.versions) - spec.kept_versions)]:
                del share.versions[old]

    async def take_updates(self, session_id: str, timeout_s: float) -> RoundResult:
        """The updates accepted since the last call (waits up to ``timeout_s`` for one),
        as the ``KeptUpdates`` partial of a ``RoundResult`` that counts what this
        combiner did since that call: updates accepted and refused, failed tasks, bytes in
        and out, seconds folding. Calling again says the controller is done with the
        updates the last call returned: their clients get their next tasks first."""
        share = self.slot.share
        if share is None or not share.asynchronous or share.session_id != session_id:
            raise UnknownSession(f"combiner {self.name} serves no asynchronous session "
                                 f"{session_id}")
        self._release(share)
        kept: KeptUpdates = share.accumulator.partial()  # type: ignore[union-attr]
        share.arrived.clear()  # before looking: an update folded meanwhile sets it again
        if not kept.items and not share.closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(share.arrived.wait(), timeout_s)
        async with share.fold_lock:
            items, kept.items = kept.items, []
        self.handed |= {k.meta.client_id for k in items}
        return self._since_last(share, items)

    def _since_last(self, share: Share, items: list[Kept]) -> RoundResult:
        now = Counted(time.monotonic(), share.accepted, dict(share.rejected), share.failed,
                      dict(share.failures), share.bytes_in, self.shelf.bytes_out,
                      share.aggregation_s)
        last, self.counted = self.counted, now
        rejections = {reason: n - last.rejected.get(reason, 0)
                      for reason, n in now.rejected.items() if n > last.rejected.get(reason, 0)}
        metrics, share.metrics = share.metrics, MetricSums()
        return RoundResult(
            combiner=self.name, session_id=share.session_id, round=share.current,
            asked=len(self.participants), updates=now.accepted - last.accepted,
            rejected=sum(rejections.values()), failed=now.failed - last.failed,
            close_reason="", seconds=now.at - last.at, bytes_in=now.bytes_in - last.bytes_in,
            bytes_out=now.bytes_out - last.bytes_out,
            aggregation_s=now.aggregation_s - last.aggregation_s, partial=KeptUpdates(items),
            rejections=rejections, metrics=metrics,
            failures={c: why for c, why in now.failures.items() if last.failures.get(c) != why})

    def stop(self, why: str, session_id: str | None = None) -> dict[str, Any]:
        """End the asynchronous session (of ``session_id``, when named); what it counted
        (late updates are dropped)."""
        share = self.slot.share
        if share is None or not share.asynchronous \
                or (session_id is not None and share.session_id != session_id):
            return {}
        self.slot.close(share, why)
        self.participants, self.waiting, self.handed = set(), set(), set()
        share.tasks.clear()
        return {"accepted": share.accepted, "rejected": dict(share.rejected),
                "failed": share.failed, "bytes_in": share.bytes_in}


@dataclass(frozen=True, slots=True)
class Counted:
    """A share's running counts, as ``take_updates`` last reported them."""

    at: float = field(default_factory=time.monotonic)
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    aggregation_s: float = 0.0


def drop_tasks(share: Share, client_id: str) -> None:
    for task_id in [t for t, e in share.tasks.items() if e.client_id == client_id]:
        del share.tasks[task_id]
