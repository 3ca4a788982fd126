"""A combiner's share of one stage of a synchronous round, from its tasks to its result.

``run`` opens a share for the controller's ``RoundSpec``: one task per asked client (its
payload, the round's model unless the stage sends none), then waits until the strategy's
``should_close`` says so (every client settled, the deadline, or the round's first K
updates) and returns the ``RoundResult``: the partial aggregate for the train stage, the
reports or replies for the others. Calling it twice for one stage is harmless (Ray may
retry a call): the second call waits for the first one's result.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from fedray.actors.combiner.checks import bounded, expected_for
from fedray.actors.combiner.clients import ClientRegistry, CombinerListener
from fedray.actors.combiner.share import Limits, Share, ShareSlot, TaskEntry, task_for
from fedray.actors.combiner.shelf import ModelShelf
from fedray.errors import UpdateRejected
from fedray.messages import RoundResult, RoundSpec, StageReply, TaskKind, ValidationReport
from fedray.strategies.base import Strategy
from fedray.strategies.codecs.coded import codec_of
from fedray.strategies.declaration import Declaration
from fedray.strategies.snapshots import CloseReason, ShareSnapshot
from fedray.strategies.updates import Buffer, ShareStart

log = logging.getLogger(__name__)

# (session id, round, attempt, client id) -> the round's accepted count with this update,
# or 0 when its first K are in already: the controller's answer in a buffered round.
Claimer = Callable[[str, int, int, str], Awaitable[int]]


class RoundShares:
    def __init__(self, name: str, registry: ClientRegistry, shelf: ModelShelf, slot: ShareSlot,
                 listener: CombinerListener, keeper: Callable[[Buffer], Any],
                 claimer: Claimer | None, max_update_bytes: int) -> None:
        self.name = name
        self.registry = registry
        self.shelf = shelf
        self.slot = slot
        self.listener = listener
        self.keeper = keeper  # where kept updates go: ray.put inside the actor
        self.claimer = claimer  # the controller's count of a buffered round (None: local)
        self.max_update_bytes = max_update_bytes
        self._last: tuple[tuple, asyncio.Future[RoundResult]] | None = None  # idempotent retry

    async def run(self, spec: RoundSpec, model: np.ndarray | None, strategy: Strategy,
                  declared: Declaration) -> RoundResult:
        """This combiner's share of one stage; only the latest stage's result is kept (for
        a retried call), so a session of any length holds one partial here."""
        if self._last is None or self._last[0] != spec.key:
            self._last = (spec.key, asyncio.ensure_future(
                self._run(spec, model, strategy, declared)))
        return await asyncio.shield(self._last[1])

    def _open(self, spec: RoundSpec, model: np.ndarray | None, strategy: Strategy,
              declared: Declaration) -> Share:
        stage = declared.stage(spec.stage_name)
        version = None
        if model is not None:
            version = self.shelf.keep(model, spec.version, spec.model_id)
            self.shelf.keep_delta(version.model_id, spec.delta_from, spec.delta)
            if spec.kind is TaskKind.TRAIN:  # how far an update may move it
                version = bounded(version, declared.layout, spec.max_update_norm,
                                  spec.max_update_norm_ratio)
        accumulator = expected = None
        if spec.kind is TaskKind.TRAIN:
            if version is None:
                raise UpdateRejected("malformed", "a train stage needs the round's model")
            expected = expected_for(declared.layout, version, self.max_update_bytes)
            max_term = version.norm.limit * spec.max_examples if version.norm else None
            accumulator = strategy.start(ShareStart(spec=version.layout.spec(), base=version.base,
                                                    params=dict(spec.params), keep=self.keeper,
                                                    max_term=max_term))
        tasks = {uuid.uuid4().hex: TaskEntry(client, spec.version) for client in spec.clients}
        share = Share(session_id=spec.session_id, round=spec.round, kind=spec.kind,
                      strategy=strategy, accumulator=accumulator,
                      limits=Limits(spec.max_examples),
                      versions={spec.version: version} if version else {},
                      current=spec.version, deadline=time.monotonic() + spec.timeout_s,
                      stage=stage, expected=expected, tasks=tasks, buffer=spec.buffer,
                      attempt=spec.attempt)
        self.slot.open(share)
        deadline_unix = time.time() + spec.timeout_s
        for task_id, entry in tasks.items():
            link = self.registry.get(entry.client_id)
            if link is None:
                share.failed += 1
                share.failures[entry.client_id] = "offline when the round started"
                share.settled.add(entry.client_id)
                continue
            payload = spec.payloads.get(entry.client_id, b"")
            share.bytes_sent += len(payload)
            link.send(task_for(task_id, share, version, spec.config, deadline_unix,
                               (spec.package_sha256, spec.package_size),
                               payload, declared.client_half,
                               codec_of(declared.layout) if spec.kind is TaskKind.TRAIN
                               else (spec.codec, spec.codec_options),
                               self.shelf.delta_of(version.model_id) if version else ("", 0)))
        return share

    async def _run(self, spec: RoundSpec, model: np.ndarray | None, strategy: Strategy,
                   declared: Declaration) -> RoundResult:
        bytes_out_before = self.shelf.bytes_out
        share = self._open(spec, model, strategy, declared)
        self.check_close(share)
        timer = asyncio.get_running_loop().call_later(spec.timeout_s, self.check_close, share)
        try:
            await share.closed.wait()
        finally:
            timer.cancel()
        async with share.fold_lock:  # folds that were already accepted finish first
            partial = share.accumulator.partial() if share.accumulator else None
        result = RoundResult(
            combiner=self.name, session_id=spec.session_id, round=spec.round,
            asked=len(share.tasks), updates=share.accepted, rejected=sum(share.rejected.values()),
            failed=share.failed, close_reason=share.close_reason,
            seconds=time.monotonic() - share.started, bytes_in=share.bytes_in,
            bytes_out=self.shelf.bytes_out - bytes_out_before + share.bytes_sent,
            aggregation_s=share.aggregation_s, partial=partial, validations=share.validations,
            rejections=dict(share.rejected), metrics=share.metrics,
            failures=dict(share.failures), attempt=spec.attempt, stage=share.stage.name,
            replies=dict(share.replies), folded=tuple(share.folded))
        self.listener.round_closed(result)
        return result

    # ----------------------------------------------------------------- closing

    def settle(self, share: Share, client_id: str) -> None:
        share.settled.add(client_id)
        self.check_close(share)

    def check_close(self, share: Share) -> None:
        if share.closed.is_set() or share.asynchronous:
            return
        snapshot = ShareSnapshot(selected=len(share.tasks), accepted=share.accepted,
                                 settled=len(share.settled), buffer=share.buffer,
                                 now=time.monotonic(), deadline=share.deadline,
                                 round_accepted=share.round_accepted, stage=share.stage.name)
        try:
            decision = share.strategy.should_close(snapshot)
        except Exception:  # noqa: BLE001 - a broken strategy cannot keep a round open
            log.exception("strategy %s failed in should_close", type(share.strategy).__name__)
            decision = CloseReason.DEADLINE if snapshot.now >= snapshot.deadline \
                else CloseReason.WAITING
        if decision is not CloseReason.WAITING:
            self.slot.close(share, CloseReason(decision).value)

    async def claim(self, share: Share, client_id: str) -> bool:
        """A slot among a buffered round's first K updates, counted across combiners."""
        if self.claimer is None:  # a combiner on its own counts for itself
            granted = share.accepted < share.buffer
            share.round_accepted = share.accepted + int(granted)
            return granted
        try:
            total = await self.claimer(share.session_id, share.round, share.attempt, client_id)
        except Exception as exc:  # noqa: BLE001 - no controller to ask: the round reruns
            log.warning("cannot claim a buffer slot for round %s: %s", share.round, exc)
            return False
        share.round_accepted = max(share.round_accepted, total)
        return total > 0

    def buffer_full(self, session_id: str, round_: int, attempt: int) -> None:
        """The controller says a buffered round has its first K updates: close the share."""
        share = self.slot.share
        if share is not None and not share.asynchronous and share.session_id == session_id \
                and share.round == round_ and share.attempt == attempt:
            share.round_accepted = max(share.round_accepted, share.buffer)
            self.check_close(share)

    # ----------------------------------------------------------------- reports

    def push_validation(self, report: ValidationReport) -> tuple[bool, str]:
        try:
            share = self.slot.lookup(report.session_id)
            share.admit(report.client_id, report.task_id, report.session_id, report.round,
                        TaskKind.VALIDATE, report.model_id)
            if report.num_examples > share.limits.max_examples:  # it weighs the round's means
                raise UpdateRejected("too_many_examples", f"num_examples {report.num_examples}"
                                     f" is over session.max_examples_per_update "
                                     f"({share.limits.max_examples})")
        except UpdateRejected as exc:
            return False, str(exc)
        share.delivered(report.client_id)
        share.validations.append(report)
        share.accepted += 1
        self.settle(share, report.client_id)
        return True, "accepted"

    def push_reply(self, reply: StageReply) -> tuple[bool, str]:
        """A client half's answer to a task of kind STAGE, kept for the controller."""
        try:
            share = self.slot.lookup(reply.session_id)
            share.admit(reply.client_id, reply.task_id, reply.session_id, reply.round,
                        TaskKind.STAGE, stage=reply.stage)
        except UpdateRejected as exc:
            return False, str(exc)
        share.bytes_in += len(reply.payload)
        most = share.stage.max_reply_bytes
        if len(reply.payload) > most:  # its task is answered, and refused: settle it
            share.rejected["too_large"] = share.rejected.get("too_large", 0) + 1
            self.settle(share, reply.client_id)
            return False, (f"too_large: a reply to stage {share.stage.name} is at most "
                           f"{most} bytes, got {len(reply.payload)}")
        share.delivered(reply.client_id)
        share.replies[reply.client_id] = bytes(reply.payload)
        share.accepted += 1
        self.settle(share, reply.client_id)
        return True, "accepted"
