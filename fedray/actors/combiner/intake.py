"""Update intake on a combiner: upload slots, bounded receive, checks, accept, fold.

An update goes through, in order: the header's task (``Share.admit``: right round, right
client, right model, not answered yet, round still open), the header's numbers (size
within what the expected layout needs, ``num_examples`` in ``(0, max_examples_per_update]``),
an upload slot (``max_inflight_uploads`` per combiner, one per client, held until the
check ends), the chunks (in order, each within ``upload_idle_s`` of the last, on average
at least ``MIN_UPLOAD_BYTES_PER_S``, in a bounded number of parts, never past the
announced size), and
then, in a worker thread so the event loop keeps serving heartbeats: the sha256, the
safetensors header (bounded by the round model's own header size), the tensors the
strategy's declared ``UpdateLayout`` expects (by default the global model's names, dtypes
and shapes), finite values that cannot overflow the float64 sums once weighted, the norm
of the update's difference from its base model when the layout computes it
(``max_update_norm``; always for a strategy that reads it), the strategy's ``accept``,
and the fold. Every refusal is an ``UpdateRejected`` with a short reason, and
every refusal but a duplicate settles the client's task, so the round never waits on it.
A refused update never touches the aggregate: each check runs before the fold starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np

from fedray.actors.combiner.checks import check_update
from fedray.actors.combiner.share import Share, TaskEntry
from fedray.bridge.limits import RateLimiter
from fedray.bridge.streamhash import StreamHash
from fedray.errors import UpdateRejected
from fedray.messages import TaskKind, UpdateHeader
from fedray.strategies.declaration import NormCheck
from fedray.strategies.numeric import BlockwiseModel, delta_norm, norm_upper_bound
from fedray.strategies.snapshots import UpdateMeta
from fedray.strategies.updates import Update

log = logging.getLogger(__name__)

MAX_WEIGHTED = 1e290  # max |value| * num_examples: float64 sums of 10^15 such stay finite
MIN_UPLOAD_BYTES_PER_S = 64 * 1024  # an upload slower than this on average is cut off
CHUNK_BYTES_PER_PART = 1024  # an upload may come in size / this (+ CHUNK_SLACK) parts at most
CHUNK_SLACK = 16
REJECTIONS_PER_S = 1.0  # rejection events recorded per client (bursts of 30 s' worth)
# Refusals counted but not taken as the client's answer: a stream that ends before its
# bytes do is also what gRPC shows a handler when it drops the call (an oversized message,
# a reset), so the client may send its update again.
LEAVES_TASK_OPEN = frozenset({"truncated"})


ShareLookup = Callable[[str], Share]  # session id -> the open share (UpdateRejected: none)
Settle = Callable[[Share, str, bool], None]  # (share, client id, accepted)
Claim = Callable[[Share, str], Awaitable[bool]]  # a buffered round's slot for this client


class UpdateIntake:
    """Receives, checks and folds updates into whichever share they belong to."""

    def __init__(self, max_inflight: int, max_update_bytes: int, idle_s: float,
                 lookup: ShareLookup, settle: Settle, events: Any, claim: Claim) -> None:
        self._slots = asyncio.Semaphore(max_inflight)
        self.max_update_bytes = max_update_bytes
        self.idle_s = idle_s
        self._lookup = lookup
        self._settle = settle
        self._claim = claim
        self._events = events  # .event(level, message, **data)
        self._rejections = RateLimiter(REJECTIONS_PER_S, burst_s=30.0)
        self.unrecorded = 0  # rejections over a client's event budget (counted, not recorded)

    async def push(self, header: UpdateHeader,
                   chunks: AsyncIterator[tuple[bytes, int]]) -> tuple[bool, str]:
        """Receive, check and fold one update; (accepted, reason) for the client.

        Once every byte has arrived the rest runs shielded from cancellation: a client
        that hangs up during the check cannot leave a folded update uncounted.
        """
        share: Share | None = None
        try:
            share = self._lookup(header.session_id)
            share.admit(header.client_id, header.task_id, header.session_id, header.round,
                        TaskKind.TRAIN, header.model_id)
            self._check_numbers(header, share)
            if header.client_id in share.uploading:  # else one client could take every slot
                raise UpdateRejected("duplicate", "an upload for this task is already running")
            share.uploading.add(header.client_id)
            try:
                await self._slots.acquire()
            except BaseException:
                share.uploading.discard(header.client_id)
                raise
            accepting: asyncio.Future | None = None
            try:
                data, digest = await self._receive_while_open(share, header, chunks)
                share.bytes_in += len(data)
                accepting = asyncio.ensure_future(self._accept(share, data, header, digest))
                # The slot stays taken until the check ends, even if the client hangs up.
                accepting.add_done_callback(
                    lambda done: self._settled(done, share, header.client_id))
            finally:
                if accepting is None:
                    self._release(share, header.client_id)
            return await asyncio.shield(accepting)
        except UpdateRejected as exc:
            self.reject(share, header, exc)
            return False, str(exc)

    def _release(self, share: Share, client_id: str) -> None:
        self._slots.release()
        share.uploading.discard(client_id)

    def _settled(self, done: asyncio.Future, share: Share, client_id: str) -> None:
        self._release(share, client_id)
        if not done.cancelled() and done.exception() is not None:
            log.error("checking an update from %s failed", client_id, exc_info=done.exception())

    def _check_numbers(self, header: UpdateHeader, share: Share) -> None:
        assert share.expected is not None  # a train share always has one
        limit = share.expected.size_bound
        if header.size > limit:
            raise UpdateRejected("too_large", f"{header.size} bytes, the limit is {limit}")
        if header.num_examples <= 0:
            raise UpdateRejected("no_examples", "num_examples must be positive")
        if header.num_examples > share.limits.max_examples:
            raise UpdateRejected("too_many_examples", f"num_examples {header.num_examples} is "
                                 f"over session.max_examples_per_update "
                                 f"({share.limits.max_examples})")

    async def _accept(self, share: Share, data: np.ndarray, header: UpdateHeader,
                      digest: str = "") -> tuple[bool, str]:
        """Check, fold and count a fully received update. The checks of the bytes (hash,
        layout, values, norm) run outside the share's fold lock, so that two updates are
        checked at once (hashlib and numpy release the GIL); the strategy's ``accept``, the
        fold and the counting run under it, after the task is asked for again."""
        try:
            entry = share.admit(header.client_id, header.task_id, header.session_id,
                                header.round, TaskKind.TRAIN, header.model_id)
            started = time.perf_counter()
            checked = await asyncio.to_thread(self._verify, share, entry, data, header, digest)
            async with share.fold_lock:
                # Asked again now: while this update waited its round may have closed (its
                # partial is taken) or a concurrent copy of it may have been folded.
                entry = share.admit(header.client_id, header.task_id, header.session_id,
                                    header.round, TaskKind.TRAIN, header.model_id)
                if share.buffer:  # a slot among the round's first K, between check and fold
                    update = await asyncio.to_thread(self._decide, share, entry, checked,
                                                     data, header)
                    if not await self._claim(share, header.client_id):
                        raise UpdateRejected("round_closed", f"the round's first {share.buffer}"
                                             " updates arrived before this one "
                                             "(session.buffer_size)")
                    await asyncio.to_thread(self._fold, share, update)
                else:  # one trip to the worker thread
                    await asyncio.to_thread(lambda: self._fold(
                        share, self._decide(share, entry, checked, data, header)))
                share.aggregation_s += time.perf_counter() - started
                share.delivered(header.client_id)  # marked offline mid-upload, but delivered
                share.accepted += 1
                if not share.asynchronous:  # a stream's would grow without end
                    share.folded.append(header.client_id)
                share.arrived.set()
                self._settle(share, header.client_id, True)
        except UpdateRejected as exc:
            self.reject(share, header, exc)
            return False, str(exc)
        self._events.event("debug", f"update from {header.client_id} accepted for round "
                           f"{header.round}", client_id=header.client_id,
                           session_id=header.session_id, round=header.round,
                           num_examples=header.num_examples)
        return True, "accepted"

    def _verify(self, share: Share, entry: TaskEntry, data: np.ndarray,
                header: UpdateHeader, digest: str = "") -> tuple[Any, float | None]:
        """The checks of the bytes alone, in a worker thread (they never stall the event
        loop): the model view and its norm (None when not computed). ``digest`` is the
        bytes' sha256 when it was taken as they arrived."""
        if header.sha256 and (digest or hashlib.sha256(data).hexdigest()) != header.sha256:
            raise UpdateRejected("checksum", "payload does not match the header's sha256")
        version = share.versions[entry.version]
        assert share.expected is not None
        parts, magnitude = check_update(data, share.expected, self.max_update_bytes)
        model = share.expected.layout.view(parts, version.base)  # decodes, if encoded
        if magnitude * header.num_examples > MAX_WEIGHTED:
            raise UpdateRejected("overflow", f"values up to {magnitude:.3g} weighted by "
                                 f"{header.num_examples} examples would overflow the sums")
        norm = None
        rule, bound = share.expected.layout.norm, version.norm
        if rule is NormCheck.WHEN_LIMITED and bound is not None \
                and not isinstance(model, BlockwiseModel) \
                and norm_upper_bound(model, bound.base_norm) <= bound.limit:
            pass  # within the bound for sure; the strategy does not read the exact norm
        elif rule is NormCheck.ALWAYS or (rule is NormCheck.WHEN_LIMITED and bound is not None):
            norm = delta_norm(model, version.base)
            if bound is not None and not norm <= bound.limit:
                raise UpdateRejected("norm", f"the update moves the model by {norm:.4g} (L2), "
                                     f"over {bound.rule} = {bound.limit:.4g}")
        return model, norm

    def _decide(self, share: Share, entry: TaskEntry, checked: tuple[Any, float | None],
                data: np.ndarray, header: UpdateHeader) -> Update:
        """The strategy's ``accept`` over the update's metadata (user code: refuses, never
        crashes)."""
        model, norm = checked
        meta = UpdateMeta(client_id=header.client_id, round=header.round,
                          num_examples=header.num_examples, base_version=entry.version,
                          staleness=share.current - entry.version, norm=norm,
                          metrics=header.metrics)
        try:
            verdict = share.strategy.accept(meta)
        except Exception as exc:  # noqa: BLE001 - a broken strategy refuses, never crashes
            log.exception("strategy %s failed in accept", type(share.strategy).__name__)
            raise UpdateRejected("strategy_error", f"{type(exc).__name__}: {exc}") from None
        if not verdict.ok:
            raise UpdateRejected(verdict.reason or "refused", verdict.detail)
        return Update(model=model, meta=meta, raw=data)

    def _fold(self, share: Share, update: Update) -> None:
        """Runs in a worker thread, after every check passed."""
        assert share.accumulator is not None
        try:
            share.accumulator.fold(update)
        except UpdateRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken strategy refuses, never crashes
            log.exception("strategy %s failed in fold", type(share.strategy).__name__)
            raise UpdateRejected("strategy_error", f"{type(exc).__name__}: {exc}") from None
        share.metrics.fold(update.meta.metrics, float(update.meta.num_examples))

    async def _receive_while_open(self, share: Share, header: UpdateHeader,
                                  chunks: AsyncIterator[tuple[bytes, int]]) -> tuple[np.ndarray, str]:
        """``_receive``, given up when the share closes: an upload that stalls cannot keep
        its buffer and its upload slot past the round it was for."""
        receive = asyncio.ensure_future(self._receive(header, chunks))
        closed = asyncio.ensure_future(share.closed.wait())
        try:
            await asyncio.wait({receive, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            receive.cancel()  # no-op once it finished
        if receive.done() and not receive.cancelled():
            return receive.result()
        raise UpdateRejected("round_closed", f"round {header.round} closed "
                             f"({share.close_reason}) before the upload ended")

    async def _receive(self, header: UpdateHeader,
                       chunks: AsyncIterator[tuple[bytes, int]]) -> tuple[np.ndarray, str]:
        """The announced bytes, in order, and their sha256 (hashed as they arrive; "" when
        the header names none). Bounded three ways, so a client with a valid task
        cannot hold its upload slot by sending little: ``idle_s`` without data, an average
        under ``MIN_UPLOAD_BYTES_PER_S``, or more parts than ``size / CHUNK_BYTES_PER_PART``
        (+ ``CHUNK_SLACK``) each end the upload."""
        data = np.empty(header.size, dtype=np.uint8)  # not zero-filled: every byte is written
        hasher = StreamHash(data) if header.sha256 else None
        received = parts = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.idle_s + header.size / MIN_UPLOAD_BYTES_PER_S
        max_parts = header.size // CHUNK_BYTES_PER_PART + CHUNK_SLACK
        try:
            # One timer for the whole upload, pushed back by every chunk (no task per chunk).
            async with asyncio.timeout_at(min(started + self.idle_s, deadline)) as idle:
                async for chunk, offset in chunks:
                    parts += 1
                    if parts > max_parts:
                        raise UpdateRejected("too_many_chunks", f"more than {max_parts} parts "
                                             f"for {header.size} bytes")
                    if chunk:  # an empty chunk is no sign of life
                        idle.reschedule(min(loop.time() + self.idle_s, deadline))
                    if offset != received:
                        raise UpdateRejected("out_of_order", f"chunk at {offset}, expected "
                                             f"{received}")
                    end = received + len(chunk)
                    if end > header.size:
                        raise UpdateRejected("too_large", f"more than the announced "
                                             f"{header.size} bytes")
                    data[received:end] = np.frombuffer(chunk, dtype=np.uint8)
                    received = end
                    if hasher is not None:
                        await hasher.advance(received)
        except TimeoutError:
            if loop.time() >= deadline:
                raise UpdateRejected("too_slow", f"{received} of {header.size} bytes in "
                                     f"{loop.time() - started:.1f}s; an upload must average "
                                     f"{MIN_UPLOAD_BYTES_PER_S // 1024} KiB/s") from None
            raise UpdateRejected("stalled", f"no data for {self.idle_s:g}s after {received} "
                                 f"of {header.size} bytes") from None
        if received != header.size:
            raise UpdateRejected("truncated", f"{received} of {header.size} bytes arrived")
        return data, (await hasher.hexdigest(received) if hasher is not None else "")

    def reject(self, share: Share | None, header: UpdateHeader, exc: UpdateRejected) -> None:
        """Say why, and settle the client's task unless the refusal changes nothing."""
        late = exc.reason in {"stale", "round_closed"}
        level = "info" if late else "warning"
        what = "dropped (late)" if late else "rejected"
        if self._rejections.allow(f"rejected:{header.client_id}"):
            self._events.event(level, f"update from {header.client_id} for round "
                               f"{header.round} {what}: {exc}", client_id=header.client_id,
                               session_id=header.session_id, round=header.round,
                               reason=exc.reason)
        else:  # a client sending refused updates over and over writes no event per try
            self.unrecorded += 1
        # A late update changes nothing in a round. Asynchronously its task is over all
        # the same, and the client's next one must come (else it would never train again).
        if share is None or exc.reason == "duplicate" or (late and not share.asynchronous):
            return
        entry = share.tasks.get(header.task_id)
        if entry is None or entry.client_id != header.client_id:
            return  # a foreign task: nothing of the open share changes
        share.rejected[exc.reason] = share.rejected.get(exc.reason, 0) + 1
        if exc.reason not in LEAVES_TASK_OPEN:
            self._settle(share, header.client_id, False)
