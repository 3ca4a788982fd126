"""One training session, round by round: select, dispatch, reduce, commit, validate.

Runs inside the controller actor's event loop. Combiners are reached only through the
``CombinerPool`` callables, the model store and tracking through their interfaces, so the
loop itself holds the policy of a session and none of the plumbing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from fedray.actors.observers import TrackingObserver
from fedray.aggregators import make_aggregator
from fedray.aggregators.base import Partial, fold_metrics
from fedray.config import SessionConfig
from fedray.errors import SessionError
from fedray.messages import RoundResult, RoundSpec, TaskKind
from fedray.policy import ResumePoint, clients_wanted, round_verdict, select_clients
from fedray.serialization import copy_model, decode, encode, read_layout
from fedray.states import RoundState, SessionState, next_round_state, next_session_state
from fedray.storage.base import ModelStore

log = logging.getLogger(__name__)

class RoundFailed(SessionError):
    """One attempt at a round ended with too few updates; the round may run again."""


RPC_GRACE_S = 30.0  # how long past a round's deadline a combiner may take to answer


class CombinerPool(Protocol):
    async def online(self) -> dict[str, list[str]]: ...
    async def wait_for_change(self, online: dict[str, list[str]], timeout_s: float) -> None: ...
    def put_model(self, data: bytes) -> Any: ...
    async def run_round(self, combiner: str, spec: RoundSpec, model_ref: Any) -> RoundResult: ...


@dataclass
class SessionStatus:
    """What `fedray run` shows while a session runs; sent as a plain dict."""

    session_id: str
    state: str = SessionState.CREATED.value
    rounds_planned: int = 0
    rounds_done: int = 0
    round: int = 0
    round_state: str = ""
    clients_online: int = 0
    model_id: str = ""
    reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


class SessionRunner:
    def __init__(self, federation: str, session_id: str, settings: SessionConfig, pool: CombinerPool,
                 store: ModelStore, observer: TrackingObserver,
                 on_change: Callable[[SessionStatus], Awaitable[None] | None],
                 package_sha256: str = "") -> None:
        self.federation = federation
        self.package_sha256 = package_sha256
        self.settings = settings
        self.pool = pool
        self.store = store
        self.observer = observer
        self.on_change = on_change
        self.aggregator = make_aggregator(settings.aggregator, settings.aggregator_kwargs)
        self.status = SessionStatus(session_id=session_id, rounds_planned=settings.rounds)
        self._state = SessionState.CREATED
        self._put: tuple[str, Any] | None = None  # (model id, ObjectRef) of the last ray.put

    @property
    def session_id(self) -> str:
        return self.status.session_id

    def _changed(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self.status, name, value)
        self.on_change(self.status)

    def _move(self, state: SessionState, **fields: Any) -> None:
        self._state = next_session_state(self._state, state)
        self.observer.write("update_session", self.session_id, status=state.value, **fields)
        if state is SessionState.RUNNING:
            self.observer.event("info", f"session {self.session_id} is running",
                                session_id=self.session_id)
        self._changed(state=state.value)

    async def run(self, seed_model_id: str, resume: ResumePoint | None = None) -> SessionStatus:
        """Run the session; with ``resume``, continue after its last committed round."""
        try:
            if resume is None:
                self.observer.write("create_session", self.session_id, self.federation,
                                    self.settings_dict(), self.settings.rounds, seed_model_id)
                self.observer.write("update_session", self.session_id,
                                    seed_model_id=seed_model_id,
                                    package_sha256=self.package_sha256)
                self.observer.event("info", f"session {self.session_id} created",
                                    session_id=self.session_id)
                model_id, first = seed_model_id, 1
            else:
                model_id, first = resume.model_id, resume.rounds_done + 1
                if resume.aggregator_state_id:
                    state = await asyncio.to_thread(self.store.get, resume.aggregator_state_id)
                    self.aggregator.load_state_dict(copy_model(decode(state)))
                self.observer.event("warning", f"session {self.session_id} resumed after round "
                                    f"{resume.rounds_done} from model {model_id[:12]}",
                                    session_id=self.session_id)
            model = await asyncio.to_thread(self.store.get, model_id)
            if resume is None:
                self._record_model(model_id, None, 0, model)
            await self._durable()
            self._changed(model_id=model_id, rounds_done=first - 1)
            for number in range(first, self.settings.rounds + 1):
                model = await self._round(number, model)
            self._move(SessionState.FINISHED, rounds_done=self.status.rounds_done,
                       model_id=self.status.model_id)
            self.observer.event("info", f"session {self.session_id} finished after "
                                f"{self.status.rounds_done} rounds", session_id=self.session_id)
        except (SessionError, Exception) as exc:  # noqa: BLE001 - every failure ends the session
            reason = str(exc) if isinstance(exc, SessionError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, SessionError):
                log.exception("session %s crashed", self.session_id)
            self.status.reason = reason
            self._move(SessionState.FAILED, reason=reason)
            self.observer.event("error", f"session {self.session_id} failed: {reason}",
                                session_id=self.session_id)
        await self._durable()
        return self.status

    async def _durable(self) -> None:
        """Wait until every tracking write so far has landed (retried while tracking is down).

        Called after each commit: a controller that dies later resumes from what is here.
        """
        while not await asyncio.to_thread(self.observer.flush, 10.0):
            log.warning("tracking is not answering; session %s waits for its writes",
                        self.session_id)

    def settings_dict(self) -> dict[str, Any]:
        return asdict(self.settings)

    async def _wait_for_clients(self) -> None:
        give_up = time.monotonic() + self.settings.wait_for_clients_s
        announced = False
        while True:
            online = await self.pool.online()
            count = sum(len(c) for c in online.values())
            self._changed(clients_online=count)
            if count >= self.settings.min_clients:
                if self._state is not SessionState.RUNNING:
                    self._move(SessionState.RUNNING)
                return
            if not announced:
                if self._state is not SessionState.WAITING:
                    self._move(SessionState.WAITING)
                self.observer.event("info", f"waiting for clients: {count} of "
                                    f"{self.settings.min_clients} connected", session_id=self.session_id)
                announced = True
            if time.monotonic() > give_up:
                raise SessionError(f"only {count} client(s) connected within "
                                   f"{self.settings.wait_for_clients_s:g}s; session.min_clients is "
                                   f"{self.settings.min_clients}")
            await self.pool.wait_for_change(online, min(5.0, max(0.1, give_up - time.monotonic())))

    async def _dispatch(self, number: int, kind: TaskKind, model_ref: Any, model_id: str,
                        plan: dict[str, list[str]], attempt: int = 1,
                        ) -> tuple[list[RoundResult], list[str]]:
        spec_for = {
            name: RoundSpec(session_id=self.session_id, round=number, kind=kind,
                            clients=tuple(clients), config=dict(self.settings.round_config),
                            timeout_s=self.settings.round_timeout_s,
                            aggregator=self.settings.aggregator,
                            aggregator_kwargs=dict(self.settings.aggregator_kwargs),
                            model_id=model_id, package_sha256=self.package_sha256,
                            attempt=attempt)
            for name, clients in plan.items() if clients
        }
        calls = [asyncio.wait_for(self.pool.run_round(name, spec, model_ref),
                                  self.settings.round_timeout_s + RPC_GRACE_S)
                 for name, spec in spec_for.items()]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        results, lost = [], []
        for name, answer in zip(spec_for, answers, strict=True):
            if isinstance(answer, BaseException):
                lost.append(name)
                self.observer.event("error", f"combiner {name} gave no result for round {number}: "
                                    f"{type(answer).__name__}: {answer}",
                                    session_id=self.session_id, round=number)
            else:
                results.append(answer)
        return results, lost

    async def _round(self, number: int, model: bytes) -> bytes:
        """Run round ``number``, rerunning it when too few updates arrived."""
        attempts = self.settings.round_attempts
        for attempt in range(1, attempts + 1):
            await self._wait_for_clients()
            try:
                return await self._attempt(number, attempt, model)
            except RoundFailed as exc:
                if attempt == attempts:
                    raise SessionError(f"round {number} failed {attempts} time(s); last: "
                                       f"{exc}") from None
                self.observer.event("warning", f"round {number} attempt {attempt} failed: {exc}; "
                                    f"running it again ({attempt + 1} of {attempts})",
                                    session_id=self.session_id, round=number)
        raise AssertionError("unreachable")

    async def _attempt(self, number: int, attempt: int, model: bytes) -> bytes:
        started = time.monotonic()
        state = RoundState.RUNNING
        online = await self.pool.online()
        count = sum(len(c) for c in online.values())
        plan = select_clients(online, clients_wanted(self.settings.clients_per_round, count,
                                                     self.settings.min_clients),
                              seed=self.settings.seed * 100_003 + number * 101 + attempt)
        parent_id = self.status.model_id
        self.observer.write("start_round", self.session_id, number, model_id=parent_id,
                            attempt=attempt, clients_asked={k: len(v) for k, v in plan.items()})
        self._changed(round=number, round_state=state.value)
        asked = sum(len(v) for v in plan.values())
        self.observer.event("info", f"round {number} started: {asked} client(s) asked to train "
                            f"model {parent_id[:12]}", session_id=self.session_id, round=number,
                            attempt=attempt, clients_asked={k: len(v) for k, v in plan.items()})
        model_ref = self._model_ref(parent_id, model)
        results, lost = await self._dispatch(number, TaskKind.TRAIN, model_ref, parent_id, plan,
                                             attempt)
        updates = sum(r.updates for r in results)
        verdict = round_verdict(updates, self.settings.min_clients, lost)
        combiners_doc = {r.combiner: _combiner_doc(r) for r in results}
        if not verdict.ok:
            self.observer.write("update_round", self.session_id, number, status=RoundState.FAILED.value,
                                reason=verdict.reason, combiners=combiners_doc, attempt=attempt)
            self.observer.event("error", f"round {number} failed: {verdict.reason}",
                                session_id=self.session_id, round=number)
            raise RoundFailed(verdict.reason)
        state = next_round_state(state, RoundState.REDUCING)
        self._changed(round_state=state.value)
        reduce_started = time.monotonic()
        new_model, reduced = await asyncio.to_thread(
            self._reduce, model, [r.partial for r in results if r.partial])
        new_id = await asyncio.to_thread(self.store.put, new_model)
        state_id = await asyncio.to_thread(self._save_aggregator_state)
        self._record_model(new_id, parent_id, number, new_model)
        reduce_s = time.monotonic() - reduce_started
        train_metrics = reduced.metrics()
        record: dict[str, Any] = {
            "round": number, "updates": updates, "seconds": 0.0, "model_id": new_id,
            "train_metrics": train_metrics, "validation_metrics": {},
        }
        if self.settings.validate:
            state = next_round_state(state, RoundState.VALIDATING)
            self._changed(round_state=state.value)
            record["validation_metrics"] = await self._validate(number, new_model, new_id)
        seconds = time.monotonic() - started
        record["seconds"] = seconds
        self.observer.write("update_round", self.session_id, number, status=RoundState.FINISHED.value,
                            model_id=new_id, parent_model_id=parent_id, updates=updates,
                            rejected=sum(r.rejected for r in results), combiners=combiners_doc,
                            lost_combiners=lost, reduce_s=reduce_s, seconds=seconds,
                            attempt=attempt, aggregator_state_id=state_id,
                            train_metrics=train_metrics,
                            validation_metrics=record["validation_metrics"])
        self.observer.write("update_session", self.session_id, rounds_done=number, model_id=new_id)
        await self._durable()  # committed: a restarted controller resumes after this round
        self.observer.round_committed(seconds)
        self.status.history.append(record)
        self._changed(rounds_done=number, model_id=new_id, round_state=RoundState.FINISHED.value)
        self.observer.event("info", f"round {number} committed model {new_id[:12]} from "
                            f"{updates} update(s) in {seconds:.2f}s",
                            session_id=self.session_id, round=number)
        return new_model

    def _record_model(self, mid: str, parent_id: str | None, number: int, data: bytes) -> None:
        spec = read_layout(data).spec()
        self.observer.write("add_model", mid, parent_id, self.session_id, number, len(data),
                            self.store.uri(mid),
                            {k: {"dtype": d, "shape": list(s)} for k, (d, s) in spec.items()})

    def _model_ref(self, mid: str, model: bytes) -> Any:
        """One object-store copy per model: validation of round N and training of round
        N + 1 (and reruns of a round) share it."""
        if self._put is None or self._put[0] != mid:
            self._put = (mid, self.pool.put_model(model))
        return self._put[1]

    def _save_aggregator_state(self) -> str:
        """Server-side optimizer state, content-addressed beside the models ("" if none)."""
        state = self.aggregator.state_dict()
        return self.store.put(encode(state)) if state else ""

    def _reduce(self, model: bytes, partials: list[Partial]) -> tuple[bytes, Partial]:
        reduced = self.aggregator.reduce(partials)
        new = self.aggregator.finish(decode(model), reduced)
        return encode(new), reduced

    async def _validate(self, number: int, model: bytes, mid: str) -> dict[str, float]:
        online = await self.pool.online()
        ref = self._model_ref(mid, model)
        results, _ = await self._dispatch(number, TaskKind.VALIDATE, ref, mid, online)
        weighted = Partial(sums={})
        for result in results:
            for report in result.validations:
                self.observer.write("add_validation", {
                    "session_id": self.session_id, "round": number, "model_id": report.model_id,
                    "client_id": report.client_id, "combiner": result.combiner,
                    "num_examples": report.num_examples, "metrics": report.metrics})
                fold_metrics(weighted, report.metrics, float(max(report.num_examples, 1)))
        return weighted.metrics()


def _combiner_doc(result: RoundResult) -> dict[str, Any]:
    return {"asked": result.asked, "updates": result.updates, "rejected": result.rejected,
            "rejections": result.rejections, "failed": result.failed,
            "close_reason": result.close_reason, "seconds": round(result.seconds, 4),
            "bytes_in": result.bytes_in, "bytes_out": result.bytes_out,
            "aggregation_s": round(result.aggregation_s, 4)}
