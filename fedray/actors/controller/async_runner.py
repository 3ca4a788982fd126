"""The asynchronous session loop (FedBuff): no rounds, a new model version every K updates.

Every combiner keeps its participating clients training on the newest version it was
given and forwards each accepted update by handle (``take_updates``, a long poll). The
controller folds each update as it comes, weighted by its staleness against the version
it started from (the strategy's ``weigh`` decision: a weight, or drop it, with an
event), and commits version v+1 once K updates are in (``buffer_target``:
``session.buffer_size``, else half the clients taking part). Its next ``take_updates``
tells the combiner it is done with the updates the last one brought, so their clients'
next tasks start from the newest version, the one they may just have helped build. The
runtime keeps the last ``Asynchronous.max_staleness + 1`` versions (the strategy's
declaration). As many clients participate as the strategy plans over those online: one
gone is replaced, and joiners are added as far as the plan's count grows; nobody waits
for the slowest. An update that cannot be read or folded is dropped; a refused version
discards its buffer and is built again (up to ``session.round_attempts`` times in a
row). The session ends after ``session.rounds`` versions or ``session.time_budget_s``.
Each version's round document lists the updates that built it (client, base version,
staleness, examples, weight) and, like a round's, each combiner's share of it
(``VersionShares``: updates, refusals, bytes in and out, seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from fedray.actors.controller.callbacks import RoundDone, RoundFailed, RoundStarted, combiner_doc
from fedray.actors.controller.planning import context, plan_round, wait_for_clients
from fedray.actors.controller.session import Commit, Session
from fedray.actors.controller.validation import after_commit
from fedray.errors import AttemptFailed, SessionError
from fedray.messages import AsyncSpec, MetricSums, RoundResult
from fedray.serialization import decode
from fedray.strategies.snapshots import ClientInfo
from fedray.strategies.updates import Accumulator, Kept, KeptUpdates, ShareStart, Update

log = logging.getLogger(__name__)

TAKE_S = 2.0  # one long poll of a combiner's forwarded updates
RETRY_S = 1.0  # after a combiner failed, before asking it again


class AsyncLoop:
    def __init__(self, session: Session) -> None:
        self.r = session
        self.k = 1  # updates per version: buffer_target, at the start of each version
        self.taking_part = 0  # participants online, as of the last plan
        declared = session.declaration.asynchronous
        self.max_staleness = declared.max_staleness if declared is not None else 0
        self.versions: OrderedDict[int, tuple[str, Any, Mapping[str, Any]]] = OrderedDict()
        self.participants: dict[str, set[str]] = {}
        self.dropped = 0
        self.first_version = session.rounds_done
        self.attempt = 1  # of the next version: a refused aggregate discards its buffer
        self._watch_error = ""  # the last failure of the watch, said once

    # ----------------------------------------------------------------- versions

    async def _add_version(self, version: int, model_id: str, data: bytes) -> Any:
        """Put the version in the object store once; keep the ones updates may start from."""
        ref = self.r.pool.put_model(data)
        views = decode(await self.r.pool.resolve(ref))
        self.versions[version] = (model_id, ref, views)
        while len(self.versions) > self.max_staleness + 1:
            self.versions.popitem(last=False)
        return ref

    def _spec(self, clients: list[str]) -> AsyncSpec:
        s = self.r.settings
        return AsyncSpec(session_id=self.r.session_id, clients=tuple(clients),
                         config=dict(s.round_config), timeout_s=s.round_timeout_s,
                         package_sha256=self.r.package[0], package_size=self.r.package[1],
                         max_examples=s.max_examples_per_update,
                         max_update_norm=s.max_update_norm,
                         max_update_norm_ratio=s.max_update_norm_ratio,
                         kept_versions=self.max_staleness + 1, max_pending=s.max_kept_updates,
                         codec=s.codec, codec_options=dict(s.codec_kwargs))

    async def _start_combiner(self, name: str, version: int) -> None:
        model_id, ref, _ = self.versions[version]
        # This combiner only: it may be one Ray restarted, and the others have it already.
        await self.r.pool.start_session(self.r.session_id, self.r.combiner_strategy, [name])
        await self.r.pool.start_async(name, self._spec(sorted(self.participants[name])), ref,
                                      version, model_id)

    def _fresh(self, version: int) -> Accumulator:
        """The buffer of the next version (its size set now: the participants may have
        changed since the last one)."""
        self.k = buffer_target(self.r.settings.buffer_size, self.taking_part)
        _, _, views = self.versions[version]
        spec = {name: (str(a.dtype), tuple(a.shape)) for name, a in views.items()}
        return self.r.strategy.start(ShareStart(spec=spec, base=views,
                                                base_of=lambda v: self.versions[v][2]))

    # ----------------------------------------------------------------- clients

    async def _participants_from(self, online: Mapping[str, list[ClientInfo]],
                                 version: int) -> dict[str, list[str]]:
        """Clients to add, per combiner: as many participate as the strategy plans over
        the clients online now, topped up from its picks when participants went offline
        (or moved), never beyond that count."""
        ctx = context(self.r, version + 1, 1, online)
        plan = plan_round(self.r, ctx)
        here = {name: {c.client_id for c in clients} for name, clients in online.items()}
        active = sum(len(self.participants.get(name, set()) & ids) for name, ids in here.items())
        fresh = [(name, cid) for name, ids in sorted(plan.clients.items()) for cid in ids
                 if cid not in self.participants.setdefault(name, set())]
        random.Random(ctx.seed).shuffle(fresh)
        new: dict[str, list[str]] = {}
        for name, cid in fresh[: max(0, plan.asked - active)]:
            self.participants[name].add(cid)
            new.setdefault(name, []).append(cid)
        self.taking_part = active + sum(len(ids) for ids in new.values())
        return {name: sorted(ids) for name, ids in new.items()}

    async def _watch(self, online: Mapping[str, list[ClientInfo]], version: list[int]) -> None:
        """Clients that join later, or replace participants gone, contribute too."""
        while True:
            try:
                await self.r.pool.wait_for_change(online, 5.0)
                online = await self.r.pool.online()
                added = await self._participants_from(online, version[0])
            except Exception as exc:  # noqa: BLE001 - the watch outlives a failed plan
                self._watch_failed(exc, version[0] + 1)
                await asyncio.sleep(RETRY_S)
                continue
            self._watch_error = ""
            # A client that moved combiners is new to the one it is on now; one that came
            # back to the same combiner is dispatched again by that combiner itself.
            for name, ids in added.items():
                with contextlib.suppress(Exception):  # a restarting combiner: next time
                    await self.r.pool.add_clients(name, ids)

    def _watch_failed(self, exc: Exception, number: int) -> None:
        """Say why no client could be added, once per distinct reason (it retries)."""
        why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SessionError) else str(exc)
        if why != self._watch_error:
            self._watch_error = why
            self.r.note("warning", f"no client could be added for version {number}: {why}; "
                        "trying again as clients change", number)

    # ----------------------------------------------------------------- the loop

    async def run(self, model: bytes) -> None:
        r, s = self.r, self.r.settings
        version = r.rounds_done
        if version >= s.rounds:
            return
        budget_end = time.monotonic() + s.time_budget_s if s.time_budget_s else float("inf")
        online = await wait_for_clients(r)
        await self._add_version(version, r.model_id, model)
        for name in r.pool.names:
            self.participants.setdefault(name, set())
        try:
            await self._participants_from(online, version)
        except AttemptFailed as exc:  # this snapshot only: the watch plans again
            self._watch_failed(exc, version + 1)
        await asyncio.gather(*(self._start_combiner(name, version) for name in r.pool.names))
        current = [version]
        watcher = asyncio.ensure_future(self._watch(online, current))
        takers: dict[str, asyncio.Future] = {}
        try:
            model = await self._collect(model, current, takers, budget_end)
        finally:
            watcher.cancel()
            for task in takers.values():
                task.cancel()
            await asyncio.gather(*(r.pool.stop_async(name, r.session_id) for name in r.pool.names),
                                 return_exceptions=True)
        if s.validate and r.rounds_done > version and r.declaration.after_commit:
            metrics = await after_commit(r, r.rounds_done, model, r.model_id)
            r.emit(RoundDone(r.session_id, {"round": r.rounds_done, "updates": 0,
                                            "model_id": r.model_id, "train_metrics": {},
                                            "validation_metrics": metrics, "seconds": 0.0,
                                            "report": r.report(),
                                            "final": True}))

    async def _collect(self, model: bytes, current: list[int], takers: dict[str, asyncio.Future],
                       budget_end: float) -> bytes:
        r, s = self.r, self.r.settings
        silence_limit = s.round_timeout_s * s.round_attempts
        acc, contributions, shares = self._fresh(current[0]), [], VersionShares(r.pool.names)
        started = last_arrival = time.monotonic()
        self._started(current[0] + 1)
        for name in r.pool.names:
            takers[name] = asyncio.ensure_future(r.pool.take_updates(name, r.session_id, TAKE_S))
        while current[0] < s.rounds:
            now = time.monotonic()
            if r.stop is not None:
                break  # asked to stop: the versions committed stand, the buffer goes
            if now >= budget_end:
                r.note("info", f"time budget of {s.time_budget_s:g}s used up after "
                       f"{current[0] - self.first_version} version(s)")
                break
            if now - last_arrival > silence_limit:
                raise SessionError(f"no update arrived for {silence_limit:g}s "
                                   "(session.round_timeout_s x round_attempts)")
            done, _ = await asyncio.wait(set(takers.values()), timeout=min(budget_end - now, 5.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            for name in [n for n, t in takers.items() if t in done]:
                taken = await self._taken(name, takers[name], current[0])
                items = shares.add(taken) if taken is not None else []
                for kept in items:
                    if current[0] >= s.rounds:
                        break  # the last version is out: what is left arrived too late
                    last_arrival = time.monotonic()
                    contribution = await self._fold(acc, kept, current[0])
                    if contribution is not None:
                        contributions.append(contribution)
                    if len(contributions) >= self.k:
                        model = await self._commit(model, acc, contributions, current, started,
                                                   shares)
                        # committed or refused, the buffer is spent: a fresh one
                        acc, contributions, started = self._fresh(current[0]), [], time.monotonic()
                        shares = VersionShares(r.pool.names)
                        if current[0] < s.rounds:
                            self._started(current[0] + 1)
                # Only now, with its updates folded and the version they completed committed
                # and announced: the next take tells the combiner, whose clients' next tasks
                # then start from that version.
                takers[name] = asyncio.ensure_future(
                    r.pool.take_updates(name, r.session_id, TAKE_S))
        return model

    def _started(self, number: int) -> None:
        self.r.emit(RoundStarted(self.r.session_id, number, self.attempt, self.r.model_id,
                                 {n: len(ids) for n, ids in self.participants.items()}))

    async def _taken(self, name: str, task: asyncio.Future, version: int) -> RoundResult | None:
        try:
            return task.result()
        except asyncio.CancelledError:
            return None
        except Exception as exc:  # noqa: BLE001 - a combiner died or was restarted by Ray
            self.r.note("warning", f"combiner {name} stopped forwarding updates "
                        f"({type(exc).__name__}); serving the session on it again")
            await asyncio.sleep(RETRY_S)
            with contextlib.suppress(Exception):
                self.participants[name] = set()
                await self._start_combiner(name, version)
            return None

    async def _fold(self, acc: Accumulator, kept: Kept, version: int) -> dict[str, Any] | None:
        """Fold one forwarded update; one that is stale, lost or refused by the strategy
        is dropped with an event, and the session goes on."""
        meta = dataclasses.replace(kept.meta, staleness=version - kept.meta.base_version)
        try:
            decision = self.r.strategy.weigh(meta)
        except Exception as exc:  # noqa: BLE001 - user strategy code: this update only
            return self._drop(meta, version, "strategy_error", "warning", f"strategy "
                              f"{self.r.settings.aggregator!r} failed to weigh it: "
                              f"{type(exc).__name__}: {exc}")
        if decision.drop:
            return self._drop(meta, version, decision.drop, "info", f"trained from version "
                              f"{meta.base_version}, {meta.staleness} version(s) old"
                              f"{': ' + decision.detail if decision.detail else ''}",
                              staleness=meta.staleness)
        if meta.base_version not in self.versions:  # older than the versions kept
            return self._drop(meta, version, "stale", "info", f"trained from version "
                              f"{meta.base_version}, which is no longer kept",
                              staleness=meta.staleness)
        weight = float(decision.weight)
        meta = dataclasses.replace(meta, weight=weight)
        try:
            raw = await self.r.pool.resolve(kept.handle)
        except Exception as exc:  # noqa: BLE001 - its combiner died after forwarding it
            return self._drop(meta, version, "lost", "warning", f"it could not be read "
                              f"({type(exc).__name__}: {str(exc)[:200]})")
        try:
            await asyncio.to_thread(acc.fold, Update(model=decode(raw), meta=meta, raw=raw))
        except Exception as exc:  # noqa: BLE001 - user strategy code: this update only
            return self._drop(meta, version, "strategy_error", "warning", f"strategy "
                              f"{self.r.settings.aggregator!r} failed to fold it: "
                              f"{type(exc).__name__}: {exc}")
        return {"client_id": meta.client_id, "base_version": meta.base_version,
                "staleness": meta.staleness, "num_examples": meta.num_examples,
                "weight": round(weight, 6)}

    def _drop(self, meta: Any, version: int, reason: str, level: str, why: str,
              **data: Any) -> None:
        self.dropped += 1
        self.r.note(level, f"update from {meta.client_id} dropped: {why}", version + 1,
                    reason=reason, client_id=meta.client_id, **data)

    async def _commit(self, model: bytes, acc: Accumulator, contributions: list[dict[str, Any]],
                      current: list[int], started: float, shares: VersionShares) -> bytes:
        """Version ``current + 1`` from the buffer; a refused aggregate (not finite, or the
        strategy failed) discards the buffer and keeps the previous model, up to
        ``session.round_attempts`` times in a row."""
        r = self.r
        parent = r.model_id
        number = current[0] + 1
        try:
            new_model = await asyncio.to_thread(r.reduce_and_finish, model, [acc.partial()])
        except AttemptFailed as exc:
            await self._refused(number, str(exc), len(contributions))
            return model
        stale = [c["staleness"] for c in contributions]
        combiners = shares.docs(time.monotonic() - started,
                                {name: len(ids) for name, ids in self.participants.items()})
        await r.commit(number, self.attempt, parent, new_model, Commit(
            started=started, updates=len(contributions),
            rejected=sum(doc["rejected"] for doc in combiners.values()),
            train_metrics={**shares.metrics.means(), "staleness_mean": sum(stale) / len(stale),
                           "staleness_max": float(max(stale))},
            combiners=combiners, contributions=contributions, mode="async"))
        current[0] = number
        self.attempt = 1
        ref = await self._add_version(number, r.model_id, new_model)
        await asyncio.gather(*(r.pool.set_version(name, number, ref, r.model_id)
                               for name in r.pool.names), return_exceptions=True)
        r.emit(RoundDone(r.session_id, {"round": number, "updates": len(contributions),
                                        "model_id": r.model_id, "seconds":
                                        time.monotonic() - started, "report":
                                        r.report(),
                                        "train_metrics": {"staleness_max": float(max(stale))},
                                        "validation_metrics": {}}))
        return new_model

    async def _refused(self, number: int, reason: str, updates: int) -> None:
        r, attempts = self.r, self.r.settings.round_attempts
        await r.restore_state()
        r.emit(RoundFailed(r.session_id, number, self.attempt, reason))
        if self.attempt >= attempts:
            raise SessionError(f"version {number} was refused {attempts} time(s) in a row "
                               f"(session.round_attempts); last: {reason}")
        r.note("warning", f"version {number} attempt {self.attempt} refused: {reason}; its "
               f"{updates} update(s) were discarded and the next {self.k} build it again "
               f"({self.attempt + 1} of {attempts})", number)
        self.attempt += 1


def buffer_target(buffer_size: int, taking_part: int) -> int:
    """Updates per version: ``session.buffer_size``, else half the clients taking part
    (rounded up). Measured on the digits example (docs/strategies.md, "How the defaults
    were chosen"): every 2 updates lost to FedAvg when training is quick; from half the
    clients to all of them FedBuff matched it, and half commits the most versions while
    an update stays 1-2 versions old and a 5x straggler's within ``max_staleness``."""
    return buffer_size or max(1, math.ceil(taking_part / 2))


class VersionShares:
    """Each combiner's share of the version being built, as a round document records a
    synchronous round's (``combiner_doc``): what the combiner counted from the previous
    commit to this one, that is what the ``take_updates`` answers in between reported,
    added up. So the bytes of an update count in the version being built when its
    combiner received it (never a later one than it is folded into), and a version
    built from updates that were all in already counts none."""

    def __init__(self, names: list[str]) -> None:
        self.shares = {name: {**dict.fromkeys(COUNTED, 0), "rejections": {}, "failures": {}}
                       for name in names}
        self.metrics = MetricSums()  # the clients' training metrics, example-weighted

    def add(self, taken: RoundResult) -> list[Kept]:
        """Count one ``take_updates`` answer; the updates it brought."""
        new = combiner_doc(taken)
        doc = self.shares.setdefault(taken.combiner, {**dict.fromkeys(COUNTED, 0),
                                                      "rejections": {}, "failures": {}})
        for key in COUNTED:
            doc[key] += new[key]
        for reason, count in new["rejections"].items():
            doc["rejections"][reason] = doc["rejections"].get(reason, 0) + count
        doc["failures"].update(new["failures"])
        self.metrics.add(taken.metrics)
        kept = taken.partial
        return list(kept.items) if isinstance(kept, KeptUpdates) else []

    def docs(self, seconds: float, asked: Mapping[str, int]) -> dict[str, dict[str, Any]]:
        return {name: {**doc, "asked": asked.get(name, 0), "close_reason": "buffer_full",
                       "seconds": round(seconds, 4),
                       "aggregation_s": round(doc["aggregation_s"], 4)}
                for name, doc in self.shares.items()}


COUNTED = ("updates", "rejected", "failed", "bytes_in", "bytes_out", "aggregation_s")
