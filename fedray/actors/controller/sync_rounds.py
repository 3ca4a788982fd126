"""Synchronous rounds: each round runs the strategy's stages, reduces, commits, validates.

Per attempt: a snapshot of the online clients, ``strategy.configure`` over it, then every
stage declared before the commit, in order (the train stage folds updates on the
combiners; any other stage collects replies the strategy reads in ``plan_stage`` and
``reduce_round``), each over the clients that answered the ones before it. With enough
updates the partials are reduced and finished, a non-finite model is refused, the new
model is committed (model, strategy state, tracking, durably), and only then do the
stages after the commit run. An attempt that fails waits (with backoff, and until
``min_clients`` are back) and runs again, up to ``session.round_attempts``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from fedray.actors.controller.aggregate import resolve_kept
from fedray.actors.controller.callbacks import RoundDone, RoundFailed, RoundStarted, combiner_doc
from fedray.actors.controller.claims import BufferClaims
from fedray.actors.controller.dispatch import dispatch, replies_of
from fedray.actors.controller.planning import context, plan_round, plan_stage, wait_for_clients
from fedray.actors.controller.policy import round_verdict
from fedray.actors.controller.session import Commit, Session
from fedray.actors.controller.validation import after_commit
from fedray.errors import AttemptFailed, SessionError
from fedray.messages import MetricSums, RoundResult, TaskKind
from fedray.strategies.declaration import Stage
from fedray.strategies.snapshots import ClientInfo, RoundPlan, RoundState

RETRY_BACKOFF_S = (1.0, 30.0)  # a failed attempt waits this long, doubling up to the cap


class SyncRounds:
    def __init__(self, session: Session, claims: BufferClaims) -> None:
        self.s = session
        self.claims = claims

    async def run(self, model: bytes) -> None:
        for number in range(self.s.rounds_done + 1, self.s.settings.rounds + 1):
            if self.s.stop is not None:  # asked to stop: no round starts after that
                return
            model = await self.s.shared_model(model)  # the private bytes go here
            model = await self.round(number, model)

    async def round(self, number: int, model: bytes) -> bytes:
        """Run round ``number`` until an attempt commits (or the attempts run out)."""
        attempts = self.s.settings.round_attempts
        backoff, cap = RETRY_BACKOFF_S
        for attempt in range(1, attempts + 1):
            online = await wait_for_clients(self.s)
            try:
                return await self.attempt(number, attempt, model, online)
            except AttemptFailed as exc:
                if attempt == attempts:
                    raise SessionError(f"round {number} failed {attempts} time(s); last: "
                                       f"{exc}") from None
                if self.s.stop is not None:
                    raise SessionError(f"round {number} failed while the session was "
                                       f"stopping: {exc}") from None
                self.s.note("warning", f"round {number} attempt {attempt} failed: {exc}; "
                            f"running it again in {backoff:g}s ({attempt + 1} of {attempts})",
                            number)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, cap)
        raise AssertionError("unreachable")

    def _failed(self, number: int, attempt: int, reason: str,
                combiners: Mapping[str, Any] | None = None,
                failures: Mapping[str, str] | None = None) -> AttemptFailed:
        self.s.emit(RoundFailed(self.s.session_id, number, attempt, reason,
                                dict(combiners or {}), dict(failures or {})))
        return AttemptFailed(reason)

    async def attempt(self, number: int, attempt: int, model: bytes,
                      online: Mapping[str, list[ClientInfo]]) -> bytes:
        s = self.s
        started = time.monotonic()
        ctx = context(s, number, attempt, online)
        plan = plan_round(s, ctx)
        parent_id = s.model_id
        s.emit(RoundStarted(s.session_id, number, attempt, parent_id,
                            {k: len(v) for k, v in plan.clients.items()},
                            {k: list(v) for k, v in plan.clients.items()}))
        if plan.asked == 0:
            raise self._failed(number, attempt, "no client to ask: session.select matched "
                               f"none of the {len(ctx.online)} online")
        ref = s.model_ref(parent_id, model)
        state = RoundState(ctx, plan)
        results: list[RoundResult] = []
        lost: list[str] = []
        stages: dict[str, dict[str, Any]] = {}  # traffic of the stages that are not training
        for stage in s.declaration.before_commit:
            try:
                stage_plan = plan_stage(s, stage, state)
            except AttemptFailed as exc:  # the strategy cannot plan it: said like any failure
                raise self._failed(number, attempt, str(exc)) from None
            if stage.kind is TaskKind.TRAIN:
                results, lost = await self._train(number, attempt, stage, stage_plan, ref,
                                                  parent_id)
                state = state.with_trained({r.combiner: r.folded for r in results
                                            if r.partial is not None and r.updates})
            else:
                stage_started = time.monotonic()
                state, stage_results = await self._stage(number, attempt, stage, stage_plan,
                                                         ref, parent_id, state)
                stages[stage.name] = stage_doc(stage_results, state, stage.name,
                                               time.monotonic() - stage_started)
        return await self._commit(number, attempt, model, parent_id, started, plan, state,
                                  results, lost, stages)

    async def _train(self, number: int, attempt: int, stage: Stage, plan: RoundPlan,
                     ref: Any, parent_id: str) -> tuple[list[RoundResult], list[str]]:
        if plan.buffer:
            self.claims.open(number, attempt, plan.buffer)
        try:
            return await dispatch(self.s, number, stage, plan, ref, parent_id, attempt)
        finally:
            self.claims.close(number, attempt)

    async def _stage(self, number: int, attempt: int, stage: Stage, plan: RoundPlan,
                     ref: Any, parent_id: str, state: RoundState,
                     ) -> tuple[RoundState, list[RoundResult]]:
        """A stage that is not training: its replies, or a failed attempt with too few."""
        with_model = stage.sends_model
        results, lost = await dispatch(self.s, number, stage, plan,
                                       ref if with_model else None,
                                       parent_id if with_model else "", attempt)
        replies = replies_of(results, stage)
        least = stage.least(self.s.min_updates)
        if len(replies) < least:
            failures = {cid: why for r in results for cid, why in r.failures.items()}
            combiners = {r.combiner: combiner_doc(r) for r in results}
            gone = f"; combiners lost: {', '.join(lost)}" if lost else ""
            raise self._failed(number, attempt, f"stage {stage.name}: only {len(replies)} "
                               f"client(s) answered, {least} needed{gone}", combiners,
                               failures)
        return state.with_replies(stage.name, replies), results

    async def _commit(self, number: int, attempt: int, model: bytes, parent_id: str,
                      started: float, plan: RoundPlan, state: RoundState,
                      results: list[RoundResult], lost: list[str],
                      stages: dict[str, dict[str, Any]]) -> bytes:
        s = self.s
        updates = sum(r.updates for r in results)
        combiners = {r.combiner: combiner_doc(r) for r in results}
        failures = {cid: why for r in results for cid, why in r.failures.items()}
        train = s.declaration.train
        least = max(train.least(s.min_updates), s.declaration.min_updates)
        verdict = round_verdict(updates, least, lost,
                                s.min_updates_rule if least == s.min_updates else "")
        if not verdict.ok:
            raise self._failed(number, attempt, verdict.reason + failure_note(failures),
                               combiners, failures)
        reduce_started = time.monotonic()
        partials = [r.partial for r in results if r.partial is not None and r.updates]
        try:
            await self._resolve(partials)
            new_model = await asyncio.to_thread(s.reduce_and_finish, model, partials, state)
            delta = b""
            if s.downlink is not None and parent_id:  # what the codec's delta rebuilds
                new_model, delta = await asyncio.to_thread(s.downlink.step, model, new_model)
        except AttemptFailed as exc:
            await s.restore_state()
            raise self._failed(number, attempt, str(exc), combiners, failures) from None
        finally:
            partials.clear()  # kept updates: let the object store free them now
            for r in results:
                r.partial = None  # the sums too (views into the object store), before commit
        metrics = MetricSums()
        for r in results:
            metrics.add(r.metrics)
        new_id = await s.commit(number, attempt, parent_id, new_model, Commit(
            started=started, updates=updates, rejected=sum(r.rejected for r in results),
            reduce_s=time.monotonic() - reduce_started, train_metrics=metrics.means(),
            combiners=combiners, lost_combiners=lost, stages=stages))
        if delta:
            s.delta = (new_id, parent_id, delta)
        record = {"round": number, "updates": updates, "model_id": new_id,
                  "train_metrics": metrics.means(), "validation_metrics": {},
                  "report": s.report()}
        record["validation_metrics"] = await after_commit(s, number, new_model, new_id, plan)
        record["seconds"] = time.monotonic() - started
        s.emit(RoundDone(s.session_id, record))
        return new_model

    async def _resolve(self, partials: list[Any]) -> None:
        """Kept updates live in the object store of the combiner that put them: one that
        died after it answered took them along, so the attempt fails and runs again."""
        try:
            await resolve_kept(self.s.pool, partials)
        except Exception as exc:  # noqa: BLE001 - owner died, object lost, ...
            raise AttemptFailed(f"a kept update could not be read ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); its combiner may have died after it "
                                "answered") from None


def stage_doc(results: list[RoundResult], state: RoundState, name: str,
              seconds: float) -> dict[str, Any]:
    """A stage's traffic, as the round document records it (``rounds.stages``)."""
    return {"asked": sum(r.asked for r in results),
            "replies": len(state.replies.get(name, {})),
            "bytes_in": sum(r.bytes_in for r in results),
            "bytes_out": sum(r.bytes_out for r in results), "seconds": round(seconds, 4)}


def failure_note(failures: Mapping[str, str]) -> str:
    """The clients whose tasks failed, grouped by error, for a round's reason."""
    if not failures:
        return ""
    by_error: dict[str, list[str]] = {}
    for client, why in sorted(failures.items()):
        by_error.setdefault(why, []).append(client)
    parts = [f"[{', '.join(clients[:5])}{' …' if len(clients) > 5 else ''}]: {why[:200]}"
             for why, clients in by_error.items()]
    return "; failed clients " + "; ".join(parts[:5])
