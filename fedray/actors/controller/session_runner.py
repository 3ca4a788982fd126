"""One training session: carry out the strategy's decisions, round by round, and report.

Runs inside the controller actor's event loop, but knows nothing of Ray: combiners are a
``CombinerPool`` (Ray actors in production, in-process cores in tests), models go to a
``ModelStore``, and everything that happens is a typed event for the ``Callbacks``
(tracking, metrics, progress). Per round: wait for clients, ``strategy.configure`` over a
snapshot of the online clients, dispatch the plan, reduce the partials, ``finish``,
refuse a non-finite model, commit (model, strategy state, tracking, durably), and only
then validate. Asynchronous strategies (FedBuff) run ``fedray.actors.controller.async_runner``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedray.actors.controller.aggregate import (
    next_model,
    resolve_kept,
    storable_report,
)
from fedray.actors.controller.callbacks import (
    Callbacks,
    ClientsOnline,
    ModelRecorded,
    Notice,
    RoundCommitted,
    RoundDone,
    RoundFailed,
    RoundStarted,
    RoundValidated,
    SessionCreated,
    SessionMoved,
    combiner_doc,
)
from fedray.actors.controller.policy import round_verdict
from fedray.actors.controller.pool import CombinerPool
from fedray.config import SessionConfig
from fedray.errors import AggregateRefused, ConfigError, FedrayError, SessionError
from fedray.errors import RoundFailed as RoundFailedError  # RoundFailed here is the event
from fedray.messages import MetricSums, RoundResult, RoundSpec, TaskKind
from fedray.serialization import copy_model, decode, encode, read_layout
from fedray.states import SessionState, next_session_state
from fedray.storage.base import ModelStore
from fedray.strategies.base import (
    ClientInfo,
    RoundContext,
    RoundPlan,
    Strategy,
)

log = logging.getLogger(__name__)

RPC_GRACE_S = 30.0  # how long past a round's deadline a combiner may take to answer
RETRY_BACKOFF_S = (1.0, 30.0)  # a failed attempt waits this long, doubling up to the cap


@dataclass(frozen=True)
class Start:
    """Where a session begins: a new one from ``model_id``, or ``resume`` after
    ``rounds_done`` committed rounds; ``state_id`` names saved strategy state."""

    model_id: str
    rounds_done: int = 0
    state_id: str = ""
    resume: bool = False
    continued_from: str = ""  # a new session that continues another one's model and state


class SessionRunner:
    def __init__(self, *, federation: str, session_id: str, settings: SessionConfig,
                 strategy: Strategy, pool: CombinerPool, store: ModelStore,
                 callbacks: Callbacks, combiner_strategy: Strategy | None = None,
                 package: tuple[str, int] = ("", 0)) -> None:
        self.federation = federation
        self.session_id = session_id
        self.settings = settings
        self.strategy = strategy  # the controller's copy: it holds the server state
        self.combiner_strategy = combiner_strategy or strategy  # shipped once, stateless
        self.pool = pool
        self.store = store
        self.callbacks = callbacks
        self.package = package  # (sha256, size) of the session's compute package
        self.state = SessionState.CREATED
        self.rounds_done = 0
        self.model_id = ""
        self.state_id = ""
        self._put: tuple[str, Any] | None = None  # (model id, ref) of the last put
        self._buffers: dict[tuple[int, int], list[int]] = {}  # (round, attempt) -> [count, K]
        self._tasks: set[asyncio.Future] = set()  # fire-and-forget calls, until they are done

    # ----------------------------------------------------------------- lifecycle

    def emit(self, event: Any) -> None:
        self.callbacks.emit(event)

    def note(self, level: str, message: str, round_: int | None = None, **data: Any) -> None:
        self.emit(Notice(level, message, self.session_id, round_, data))

    def _move(self, state: SessionState, **fields: Any) -> None:
        self.state = next_session_state(self.state, state)
        self.emit(SessionMoved(self.session_id, state.value, fields))
        if state is SessionState.RUNNING:
            self.note("info", f"session {self.session_id} is running")

    async def run(self, start: Start) -> tuple[str, str]:
        """Run the session to its end; (final state, reason if it failed)."""
        reason = ""
        try:
            model = await self._begin(start)
            if self.strategy.asynchronous:
                from fedray.actors.controller.async_runner import AsyncLoop

                await AsyncLoop(self).run(model)
            else:
                for number in range(self.rounds_done + 1, self.settings.rounds + 1):
                    model = await self._round(number, model)
            self._move(SessionState.FINISHED, rounds_done=self.rounds_done,
                       model_id=self.model_id)
            self.note("info", f"session {self.session_id} finished after {self.rounds_done} "
                      f"{'versions' if self.strategy.asynchronous else 'rounds'}")
        except Exception as exc:  # noqa: BLE001 - every failure ends the session, said once
            reason = str(exc) if isinstance(exc, FedrayError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, FedrayError):
                log.exception("session %s crashed", self.session_id)
            if not self.state.terminal:
                self._move(SessionState.FAILED, reason=reason)
            self.note("error", f"session {self.session_id} failed: {reason}")
        await self.callbacks.flush()
        return self.state.value, reason

    async def _begin(self, start: Start) -> bytes:
        self.model_id, self.rounds_done, self.state_id = (start.model_id, start.rounds_done,
                                                          start.state_id)
        if not start.resume:
            self.emit(SessionCreated(self.session_id, self.federation, asdict(self.settings),
                                     self.settings.rounds, start.model_id, self.package[0],
                                     self.package[1], start.continued_from,
                                     self.settings.aggregator,
                                     self.strategy.asynchronous))
        else:
            self.note("warning", f"session {self.session_id} resumed after round "
                      f"{start.rounds_done} from model {start.model_id[:12]}")
        if start.state_id:
            state = await asyncio.to_thread(self.store.get, start.state_id)
            self.strategy.load_state_dict(copy_model(decode(state)))
        model = await asyncio.to_thread(self.store.get, start.model_id)
        if not start.resume:
            self._record_model(start.model_id, None, 0, model)
        await self.callbacks.flush()
        self.emit(SessionMoved(self.session_id, self.state.value,
                               {"rounds_done": start.rounds_done, "model_id": start.model_id}))
        await self.pool.start_session(self.session_id, self.combiner_strategy)
        return model

    # ----------------------------------------------------------------- clients

    async def wait_for_clients(self) -> dict[str, list[ClientInfo]]:
        """Until ``min_clients`` are online (or ``wait_for_clients_s`` passed: SessionError)."""
        give_up = time.monotonic() + self.settings.wait_for_clients_s
        announced = False
        while True:
            online = await self.pool.online()
            count = sum(len(c) for c in online.values())
            self.emit(ClientsOnline(self.session_id, count))
            if count >= self.settings.min_clients:
                if self.state is not SessionState.RUNNING:
                    self._move(SessionState.RUNNING)
                return online
            if not announced:
                if self.state is not SessionState.WAITING:
                    self._move(SessionState.WAITING)
                self.note("info", f"waiting for clients: {count} of {self.settings.min_clients} "
                          "connected")
                announced = True
            if time.monotonic() > give_up:
                raise SessionError(f"only {count} client(s) connected within "
                                   f"{self.settings.wait_for_clients_s:g}s; session.min_clients "
                                   f"is {self.settings.min_clients}")
            await self.pool.wait_for_change(online, min(5.0, max(0.1, give_up - time.monotonic())))

    def context(self, number: int, attempt: int,
                online: Mapping[str, list[ClientInfo]]) -> RoundContext:
        clients = tuple(c for name in sorted(online) for c in online[name])
        return RoundContext(session_id=self.session_id, round=number, attempt=attempt,
                            online=clients, settings=self.settings,
                            seed=self.settings.seed * 100_003 + number * 101 + attempt)

    def plan(self, ctx: RoundContext) -> RoundPlan:
        """The strategy's plan, checked: it may only ask clients that are online.

        Settings that can never work (a ConfigError or SessionError from ``configure``, more
        kept updates than ``session.max_kept_updates``) end the session; anything else
        fails this attempt only (RoundFailedError): the next one sees other clients.
        """
        name = self.settings.aggregator
        try:
            plan = self.strategy.configure(ctx)
        except RoundFailedError:
            raise
        except (ConfigError, SessionError) as exc:
            raise SessionError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - user strategy code
            raise RoundFailedError(f"strategy {name!r} failed in configure: "
                                   f"{type(exc).__name__}: {exc}") from None
        where = {c.client_id: c.combiner for c in ctx.online}
        for combiner, ids in plan.clients.items():
            wrong = [i for i in ids if where.get(i) != combiner]
            if wrong:
                raise RoundFailedError(f"strategy {name!r} asked clients that are not online "
                                       f"at {combiner}: {wrong[:5]}")
        self._check_kept(ctx.round, plan)
        return plan

    def _check_kept(self, number: int, plan: RoundPlan) -> None:
        """A strategy that keeps every update (object store) may keep at most
        ``session.max_kept_updates`` per round; the config's estimate cannot see a select
        policy or a custom ``configure``, so the plan itself is checked."""
        if not self.strategy.keeps_updates or self.strategy.asynchronous:
            return
        kept = min(plan.asked, plan.buffer) if plan.buffer else plan.asked
        most = self.settings.max_kept_updates
        if kept > most:
            raise SessionError(f"strategy {self.settings.aggregator!r} keeps every update of a "
                               f"round (in Ray's object store) and round {number} asks {kept} "
                               f"clients, more than session.max_kept_updates ({most}); ask "
                               "fewer (session.clients_per_round, session.select) or raise "
                               "max_kept_updates (memory: that many model sizes)")

    # ----------------------------------------------------------------- synchronous rounds

    async def _round(self, number: int, model: bytes) -> bytes:
        """Run round ``number``; an attempt that fails waits (with backoff, and until
        ``min_clients`` are back) and runs again, up to ``session.round_attempts``."""
        attempts = self.settings.round_attempts
        backoff, cap = RETRY_BACKOFF_S
        for attempt in range(1, attempts + 1):
            online = await self.wait_for_clients()
            try:
                return await self._attempt(number, attempt, model, online)
            except RoundFailedError as exc:
                if attempt == attempts:
                    raise SessionError(f"round {number} failed {attempts} time(s); last: "
                                       f"{exc}") from None
                self.note("warning", f"round {number} attempt {attempt} failed: {exc}; running "
                          f"it again in {backoff:g}s ({attempt + 1} of {attempts})", number)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, cap)
        raise AssertionError("unreachable")

    async def _attempt(self, number: int, attempt: int, model: bytes,
                       online: Mapping[str, list[ClientInfo]]) -> bytes:
        started = time.monotonic()
        ctx = self.context(number, attempt, online)
        plan = self.plan(ctx)
        parent_id = self.model_id
        asked = {k: len(v) for k, v in plan.clients.items()}
        self.emit(RoundStarted(self.session_id, number, attempt, parent_id, asked,
                               {k: list(v) for k, v in plan.clients.items()}))
        if plan.asked == 0:
            reason = (f"no client to ask: session.select matched none of the "
                      f"{len(ctx.online)} online")
            self.emit(RoundFailed(self.session_id, number, attempt, reason))
            raise RoundFailedError(reason)
        ref = self.model_ref(parent_id, model)
        if plan.buffer:
            self._buffers[(number, attempt)] = [0, plan.buffer]
        try:
            results, lost = await self.dispatch(number, TaskKind.TRAIN, ref, parent_id, plan,
                                                attempt)
        finally:
            self._buffers.pop((number, attempt), None)
        updates = sum(r.updates for r in results)
        combiners = {r.combiner: combiner_doc(r) for r in results}
        failures = {cid: why for r in results for cid, why in r.failures.items()}
        verdict = round_verdict(updates, self.settings.min_clients, lost)
        if not verdict.ok:
            reason = verdict.reason + _failure_note(failures)
            self.emit(RoundFailed(self.session_id, number, attempt, reason, combiners, failures))
            raise RoundFailedError(reason)
        reduce_started = time.monotonic()
        partials = [r.partial for r in results if r.partial is not None and r.updates]
        try:
            await self.resolve_kept(partials)
            new_model = await asyncio.to_thread(self.reduce_and_finish, model, partials)
        except RoundFailedError as exc:
            await self.restore_state()
            self.emit(RoundFailed(self.session_id, number, attempt, str(exc), combiners, failures))
            raise
        finally:
            partials.clear()  # kept updates: let the object store free them now
            for r in results:
                r.partial = None  # the sums too (views into the object store), before commit
        metrics = MetricSums()
        for r in results:
            metrics.add(r.metrics)
        new_id = await self.commit(number, attempt, parent_id, new_model, {
            "updates": updates, "rejected": sum(r.rejected for r in results),
            "combiners": combiners, "lost_combiners": lost,
            "reduce_s": time.monotonic() - reduce_started, "started": started,
            "train_metrics": metrics.means()})
        record = {"round": number, "updates": updates, "model_id": new_id,
                  "train_metrics": metrics.means(), "validation_metrics": {},
                  "report": self.report()}
        if self.settings.validate:
            record["validation_metrics"] = await self.validate(number, new_model, new_id)
        record["seconds"] = time.monotonic() - started
        self.emit(RoundDone(self.session_id, record))
        return new_model

    async def dispatch(self, number: int, kind: TaskKind, model_ref: Any, model_id: str,
                       plan: RoundPlan, attempt: int = 1,
                       ) -> tuple[list[RoundResult], list[str]]:
        s = self.settings
        specs = {
            name: RoundSpec(session_id=self.session_id, round=number, kind=kind,
                            clients=tuple(clients), config=dict(plan.config),
                            timeout_s=s.round_timeout_s, model_id=model_id,
                            package_sha256=self.package[0], package_size=self.package[1],
                            attempt=attempt, params=dict(plan.params),
                            buffer=plan.buffer if kind is TaskKind.TRAIN else 0,
                            max_examples=s.max_examples_per_update,
                            max_update_norm=s.max_update_norm, version=self.rounds_done)
            for name, clients in plan.clients.items() if clients
        }
        calls = [asyncio.wait_for(self.pool.run_round(name, spec, model_ref),
                                  s.round_timeout_s + RPC_GRACE_S)
                 for name, spec in specs.items()]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        results, lost = [], []
        for name, answer in zip(specs, answers, strict=True):
            if isinstance(answer, BaseException):
                lost.append(name)
                self.note("error", f"combiner {name} gave no result for round {number}: "
                          f"{type(answer).__name__}: {str(answer)[:300]}", number)
            else:
                results.append(answer)
        return results, lost

    def claim(self, round_: int, attempt: int, client_id: str) -> int:
        """A combiner asks to fold an update of a buffered round: the round's count with
        it, or 0 once the first K are in. The K-th closes every combiner's share."""
        entry = self._buffers.get((round_, attempt))
        if entry is None or entry[0] >= entry[1]:
            return 0
        entry[0] += 1
        if entry[0] == entry[1]:
            self.note("info", f"round {round_} has its first {entry[1]} updates "
                      "(session.buffer_size); closing it", round_)
            self.background(asyncio.gather(
                *(self.pool.buffer_full(name, self.session_id, round_, attempt)
                  for name in self.pool.names), return_exceptions=True))
        return entry[0]

    def background(self, aw: Any) -> None:
        """Run ``aw`` without waiting for it; the loop holds tasks weakly, so keep it
        referenced until it is done."""
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resolve_kept(self, partials: list[Any]) -> None:
        """Kept updates live in the object store of the combiner that put them: one that
        died after it answered took them along, so the attempt fails and runs again."""
        try:
            await resolve_kept(self.pool, partials)
        except Exception as exc:  # noqa: BLE001 - owner died, object lost, ...
            raise RoundFailedError(f"a kept update could not be read ({type(exc).__name__}: "
                                   f"{str(exc)[:200]}); its combiner may have died after it "
                                   "answered") from None

    def reduce_and_finish(self, model: bytes, partials: list[Any]) -> bytes:
        """Runs in a worker thread. A model that is not finite is never committed."""
        try:
            return next_model(self.strategy, model, partials)
        except AggregateRefused as exc:
            raise RoundFailedError(str(exc)) from None

    async def restore_state(self) -> None:
        """After a refused aggregate: the strategy's state as of the last commit."""
        if self.state_id:
            state = await asyncio.to_thread(self.store.get, self.state_id)
            self.strategy.load_state_dict(copy_model(decode(state)))
        else:
            self.strategy.load_state_dict({})

    async def commit(self, number: int, attempt: int, parent_id: str, new_model: bytes,
                     facts: dict[str, Any], mode: str = "sync",
                     contributions: list[dict[str, Any]] | None = None) -> str:
        """Store the model and the strategy's state, record the round, wait until durable."""
        new_id = await asyncio.to_thread(self.store.put, new_model)
        state = self.strategy.state_dict()
        state_id = await asyncio.to_thread(self.store.put, encode(state)) if state else ""
        self._record_model(new_id, parent_id, number, new_model)
        seconds = time.monotonic() - facts["started"]
        self.emit(RoundCommitted(
            self.session_id, number, attempt, new_id, parent_id, facts["updates"],
            facts.get("rejected", 0), seconds, facts.get("reduce_s", 0.0), state_id,
            facts.get("train_metrics", {}), facts.get("combiners", {}),
            facts.get("lost_combiners", []), self.report(),
            contributions or [], mode))
        await self.callbacks.flush()  # committed: a restarted controller resumes after this
        self.rounds_done, self.model_id, self.state_id = number, new_id, state_id
        return new_id

    def report(self) -> dict[str, float | int | None]:
        """The strategy's ``round_report`` as tracking can store it (``storable_report``)."""
        try:
            return storable_report(self.strategy.round_report())
        except Exception as exc:  # noqa: BLE001 - user strategy code; the commit stands
            log.exception("strategy %s failed in round_report", self.settings.aggregator)
            self.note("warning", f"strategy {self.settings.aggregator!r} failed in round_report:"
                      f" {type(exc).__name__}: {exc}")
            return {}

    def _record_model(self, mid: str, parent_id: str | None, number: int, data: bytes) -> None:
        spec = read_layout(data).spec()
        self.emit(ModelRecorded(mid, parent_id, self.session_id, number, len(data),
                                self.store.uri(mid),
                                {k: {"dtype": d, "shape": list(s)} for k, (d, s) in spec.items()}))

    def model_ref(self, mid: str, model: bytes) -> Any:
        """One object-store copy per model: validation of round N and training of round
        N + 1 (and reruns of a round) share it."""
        if self._put is None or self._put[0] != mid:
            self._put = None  # the old copy goes before the new one comes
            self._put = (mid, self.pool.put_model(model))
        return self._put[1]

    async def validate(self, number: int, model: bytes, mid: str) -> dict[str, float]:
        """Validation of a committed model: its metrics are added to the round after."""
        online = await self.pool.online()
        plan = RoundPlan(clients={name: tuple(c.client_id for c in clients)
                                  for name, clients in online.items()})
        results, _ = await self.dispatch(number, TaskKind.VALIDATE, self.model_ref(mid, model),
                                         mid, plan)
        weighted = MetricSums()
        reports = []
        for result in results:
            for report in result.validations:
                reports.append((result.combiner, report))
                weighted.fold(report.metrics, float(max(report.num_examples, 1)))
        metrics = weighted.means()
        self.emit(RoundValidated(self.session_id, number, mid, metrics, reports))
        return metrics


def _failure_note(failures: Mapping[str, str]) -> str:
    """The clients whose tasks failed, grouped by error, for a round's reason."""
    if not failures:
        return ""
    by_error: dict[str, list[str]] = {}
    for client, why in sorted(failures.items()):
        by_error.setdefault(why, []).append(client)
    parts = [f"[{', '.join(clients[:5])}{' …' if len(clients) > 5 else ''}]: {why[:200]}"
             for why, clients in by_error.items()]
    return "; failed clients " + "; ".join(parts[:5])
