"""One session's state and the services both of its loops (rounds, asynchronous) use.

A ``Session`` knows the strategy (and what it declared), the combiner pool, the model
store and the callbacks. It says what happens (typed events), moves the session's state
machine, keeps one object-store copy of the current model, and commits: model, strategy
state and tracking, waiting until they are durable. It makes no decision: planning is
``fedray.actors.controller.planning``, a round's stages ``sync_rounds``, an asynchronous
session ``async_runner``. Nothing here imports Ray: the pool and the store are protocols.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from fedray.actors.controller.aggregate import next_model, storable_report
from fedray.actors.controller.callbacks import (
    Callbacks,
    ModelRecorded,
    Notice,
    RoundCommitted,
    SessionMoved,
)
from fedray.actors.controller.pool import CombinerPool
from fedray.config import SessionConfig
from fedray.errors import AggregateRefused, AttemptFailed
from fedray.serialization import copy_model, decode, encode, read_layout
from fedray.states import SessionState, next_session_state
from fedray.storage.base import ModelStore
from fedray.strategies.base import Strategy
from fedray.strategies.codecs import make_codec
from fedray.strategies.codecs.downlink import Downlink
from fedray.strategies.snapshots import RoundState
from fedray.strategies.updates import Buffer
from fedray.tracking.resume import commit_mac

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Start:
    """Where a session begins: a new one from ``model_id``, or ``resume`` after
    ``rounds_done`` committed rounds; ``state_id`` names saved strategy state."""

    model_id: str
    rounds_done: int = 0
    state_id: str = ""
    resume: bool = False
    continued_from: str = ""  # a new session that continues another one's model and state
    submitted_by: str = ""  # who asked for the session (recorded with it)


@dataclass(frozen=True)
class StopRequest:
    """Someone asked the session to end (``SessionRunner.stop``)."""

    by: str
    reason: str


@dataclass(frozen=True)
class Commit:
    """What a round (or version) brings to its commit record, besides the model."""

    started: float  # monotonic, when the round started
    updates: int
    rejected: int = 0
    reduce_s: float = 0.0
    train_metrics: dict[str, float] | None = None
    combiners: dict[str, Any] | None = None
    lost_combiners: list[str] | None = None
    contributions: list[dict[str, Any]] | None = None
    mode: str = "sync"
    stages: dict[str, dict[str, Any]] | None = None  # the non-train stages' traffic


class Session:
    def __init__(self, *, federation: str, session_id: str, settings: SessionConfig,
                 strategy: Strategy, pool: CombinerPool, store: ModelStore,
                 callbacks: Callbacks, combiner_strategy: Strategy | None = None,
                 package: tuple[str, int] = ("", 0), secret: bytes | None = None) -> None:
        self.federation = federation
        self.secret = secret  # signs what is committed: a resume trusts only that
        self.session_id = session_id
        self.settings = settings
        self.strategy = strategy  # the controller's copy: it holds the server state
        self.combiner_strategy = combiner_strategy or strategy  # shipped once, stateless
        self.declaration = strategy.declare()  # read once: what the runtime does for it
        # A round needs session.min_clients updates, or more if the strategy cannot
        # aggregate fewer (Krum's 2f + 3): rounds wait for, ask and need that many.
        self.min_clients = max(settings.min_clients, self.declaration.min_updates)
        self.round_settings = settings if self.min_clients == settings.min_clients \
            else replace(settings, min_clients=self.min_clients)  # what configure sees
        # ...and commits with session.min_updates of them, when that is set (dropouts)
        self.min_updates = max(settings.min_updates, self.declaration.min_updates) \
            if settings.min_updates else self.min_clients
        self.pool = pool
        self.store = store
        self.callbacks = callbacks
        self.package = package  # (sha256, size) of the session's compute package
        self.state = SessionState.CREATED
        self.rounds_done = 0
        self.model_id = ""
        self.state_id = ""
        self.stop: StopRequest | None = None  # set once: no round starts after it
        self._put: tuple[str, Any] | None = None  # (model id, ref) of the last put
        # session.codec's downlink: commits move by what the codec can write, and clients
        # holding the parent fetch the delta. (model id, parent id, delta) of the last one.
        codec = make_codec(settings.codec, settings.codec_kwargs) \
            if settings.codec_downlink and not self.asynchronous else None
        self.downlink = Downlink(codec) if codec is not None else None
        self.delta: tuple[str, str, bytes] | None = None
        self._tasks: set[asyncio.Future] = set()  # fire-and-forget calls, until they are done

    @property
    def asynchronous(self) -> bool:
        return self.declaration.asynchronous is not None

    @property
    def min_clients_rule(self) -> str:
        """Where the fewest updates a round needs comes from, for messages."""
        configured = self.settings.min_clients
        if self.min_clients == configured:
            return f"session.min_clients is {configured}"
        return (f"{self.settings.aggregator!r} needs {self.min_clients} per round "
                f"(session.min_clients is {configured})")

    @property
    def min_updates_rule(self) -> str:
        """Where the fewest updates a round commits with comes from, for messages."""
        if not self.settings.min_updates:
            return self.min_clients_rule
        if self.min_updates == self.settings.min_updates:
            return f"session.min_updates is {self.min_updates}"
        return (f"{self.settings.aggregator!r} needs {self.min_updates} per round "
                f"(session.min_updates is {self.settings.min_updates})")

    # ----------------------------------------------------------------- what happens

    def emit(self, event: Any) -> None:
        self.callbacks.emit(event)

    def note(self, level: str, message: str, round_: int | None = None, **data: Any) -> None:
        self.emit(Notice(level, message, self.session_id, round_, data))

    def move(self, state: SessionState, **fields: Any) -> None:
        self.state = next_session_state(self.state, state)
        self.emit(SessionMoved(self.session_id, state.value, fields))
        if state is SessionState.RUNNING:
            self.note("info", f"session {self.session_id} is running")

    def background(self, aw: Any) -> None:
        """Run ``aw`` without waiting for it; the loop holds tasks weakly, so keep it
        referenced until it is done."""
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------------- models

    def model_ref(self, mid: str, model: bytes) -> Any:
        """One object-store copy per model: validation of round N and training of round
        N + 1 (and reruns of a round) share it."""
        if self._put is None or self._put[0] != mid:
            self._put = None  # the old copy goes before the new one comes
            self._put = (mid, self.pool.put_model(model))
        return self._put[1]

    async def shared_model(self, model: Buffer) -> Buffer:
        """The current model as a read-only view of its object-store copy, so that the
        controller keeps no private copy of it through a round (issue 16: memory)."""
        return await self.pool.resolve(self.model_ref(self.model_id, model))

    def record_model(self, mid: str, parent_id: str | None, number: int, data: bytes) -> None:
        spec = read_layout(data).spec()
        self.emit(ModelRecorded(mid, parent_id, self.session_id, number, len(data),
                                self.store.uri(mid),
                                {k: {"dtype": d, "shape": list(s)} for k, (d, s) in spec.items()}))

    def reduce_and_finish(self, model: bytes, partials: list[Any],
                          state: RoundState | None = None) -> bytes:
        """Runs in a worker thread. A model that is not finite is never committed."""
        try:
            return next_model(self.strategy, model, partials, state)
        except AggregateRefused as exc:
            raise AttemptFailed(str(exc)) from None

    async def restore_state(self) -> None:
        """After a refused aggregate: the strategy's state as of the last commit."""
        if self.state_id:
            state = await asyncio.to_thread(self.store.get, self.state_id)
            self.strategy.load_state_dict(copy_model(decode(state)))
        else:
            self.strategy.load_state_dict({})

    async def commit(self, number: int, attempt: int, parent_id: str, new_model: bytes,
                     facts: Commit) -> str:
        """Store the model and the strategy's state, record the round, wait until durable."""
        new_id = await asyncio.to_thread(self.store.put, new_model)
        state = self.strategy.state_dict()
        state_id = await asyncio.to_thread(self.store.put, encode(state)) if state else ""
        self.record_model(new_id, parent_id, number, new_model)
        self.emit(RoundCommitted(
            self.session_id, number, attempt, new_id, parent_id, facts.updates, facts.rejected,
            time.monotonic() - facts.started, facts.reduce_s, state_id,
            facts.train_metrics or {}, facts.combiners or {}, facts.lost_combiners or [],
            self.report(), facts.contributions or [], facts.mode,
            self.sign(number, new_id, state_id), self.settings.codec or "none",
            facts.stages or {}))
        await self.callbacks.flush()  # committed: a restarted controller resumes after this
        self.rounds_done, self.model_id, self.state_id = number, new_id, state_id
        return new_id

    def sign(self, number: int, model_id: str, state_id: str = "") -> str:
        """The signature a resume checks what it trains from against ("" without a secret)."""
        return commit_mac(self.secret, self.session_id, number, model_id, state_id) \
            if self.secret is not None else ""

    def report(self) -> dict[str, float | int | None]:
        """The strategy's ``round_report`` as tracking can store it (``storable_report``)."""
        try:
            return storable_report(self.strategy.round_report())
        except Exception as exc:  # noqa: BLE001 - user strategy code; the commit stands
            log.exception("strategy %s failed in round_report", self.settings.aggregator)
            self.note("warning", f"strategy {self.settings.aggregator!r} failed in round_report:"
                      f" {type(exc).__name__}: {exc}")
            return {}
