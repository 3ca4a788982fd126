"""A federation without Ray or gRPC: real ``CombinerCore``s behind the ``CombinerPool``
protocol, and simulated clients that read their task queues and push real update bytes.

The session runner, the strategies and the combiners' intake run exactly as in a
deployment; only the transport is replaced (Ray calls by awaits, gRPC by the core's own
methods). Tests of the runner's decisions, resume included, use it; tests of the real
transport use Ray and gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedray.actors.combiner.core import CombinerCore
from fedray.actors.controller.callbacks import Callbacks, SessionStatus, StatusCallback
from fedray.actors.controller.session_runner import SessionRunner, Start
from fedray.config import CombinersConfig, SessionConfig
from fedray.deploy.config_file import config_from_dict
from fedray.edge.halves import ClientHalves
from fedray.edge.tasks import encode_update, received
from fedray.messages import StageReply, TaskKind, UpdateHeader, ValidationReport
from fedray.serialization import copy_model, decode, encode
from fedray.storage.base import ModelStore
from fedray.strategies import make_strategy

HEARTBEAT_S = 0.05  # how often a SimClient beats (the pool's combiners expect one this often)

# train(params, config, client_id, round) -> (params, num_examples, metrics)
TrainFn = Callable[[dict[str, np.ndarray], dict, str, int], tuple[Mapping, int, dict]]


class MemoryStore(ModelStore):
    """Content-addressed models in a dict (the ModelStore contract, without a disk)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        mid = hashlib.sha256(data).hexdigest()
        self.objects[mid] = bytes(data)
        return mid

    def get(self, model_id: str) -> bytes:
        return self.objects[model_id]

    def exists(self, model_id: str) -> bool:
        return model_id in self.objects

    def uri(self, model_id: str) -> str:
        return f"memory://{model_id}"


class Recorder:
    """Every runner event, in order (a callback)."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_event(self, event: Any) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class CoreListener:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def event(self, level: str, message: str, **data: Any) -> None:
        self.events.append((level, message, data))

    def client_status(self, *args: Any, **kwargs: Any) -> None:
        pass

    def round_closed(self, result: Any) -> None:
        pass


class SimClient:
    """One client: answers its tasks with ``train`` (in a thread) after ``delay`` seconds."""

    def __init__(self, core: CombinerCore, client_id: str, train: TrainFn,
                 attrs: Mapping[str, str] | None = None, delay: float = 0.0,
                 validate: Callable[[dict, str], tuple[int, dict]] | None = None) -> None:
        self.core, self.client_id, self.train = core, client_id, train
        self.attrs, self.delay, self.validate = dict(attrs or {}), delay, validate
        self.tasks_seen: list[tuple[str, int]] = []
        self.replies: list[tuple[int, bool, str]] = []
        self.halves = ClientHalves(("tests", "examples"))

    async def run(self) -> None:
        link = self.core.connect(self.client_id, self.client_id, self.attrs)
        beat = asyncio.ensure_future(self._beat())
        try:
            async for task in self.core.tasks(link):
                self.tasks_seen.append((task.stage or task.kind.value, task.round))
                asyncio.ensure_future(self._answer(task)) if task.kind is not TaskKind.TRAIN \
                    else await self._answer(task)
        finally:
            beat.cancel()

    async def _beat(self) -> None:
        while True:
            self.core.heartbeat(self.client_id)
            await asyncio.sleep(HEARTBEAT_S)  # behaviour: a client's heartbeat period

    async def _answer(self, task) -> None:
        half = self.halves.for_task(task)  # the strategy's client half, as the edge runs it
        data = self.core.models.get(task.model_id) if task.model_id else None
        if half is not None:
            data = received(half, task, data)
        if task.kind is TaskKind.STAGE:
            try:
                reply = half.run_stage(task, decode(data) if data is not None else None)
            except Exception as exc:  # noqa: BLE001 - reported as the edge client does
                self.core.task_failed(self.client_id, task.task_id, str(exc),
                                      type(exc).__name__)
                return
            self.core.push_reply(StageReply(self.client_id, task.task_id, task.session_id,
                                            task.round, task.stage, reply))
            return
        if data is None:
            return
        params = copy_model(decode(data))
        if task.kind is TaskKind.VALIDATE:
            n, metrics = self.validate(params, self.client_id) if self.validate else (1, {})
            self.core.push_validation(ValidationReport(self.client_id, task.task_id,
                                                       task.session_id, task.round,
                                                       task.model_id, n, metrics))
            return
        if self.delay:
            await asyncio.sleep(self.delay)  # behaviour: a slow client
        try:
            new, n, metrics = await asyncio.to_thread(self.train, params, dict(task.config),
                                                      self.client_id, task.round)
        except Exception as exc:  # noqa: BLE001 - reported as the edge client does
            self.core.task_failed(self.client_id, task.task_id, str(exc), type(exc).__name__)
            return
        payload = encode({k: np.asarray(v, dtype=params[k].dtype) for k, v in new.items()})
        if half is not None:
            payload = encode_update(half, task, payload, data, int(n))
        header = UpdateHeader(self.client_id, task.task_id, task.session_id, task.round,
                              task.model_id, int(n), dict(metrics), len(payload),
                              hashlib.sha256(payload).hexdigest())
        accepted, reason = await self.core.push_update(header, _chunks(payload))
        self.replies.append((task.round, accepted, reason))


async def _chunks(data: bytes, step: int = 1 << 16):
    for i in range(0, len(data), step):
        yield data[i : i + step], i


class SimPool:
    """The ``CombinerPool`` protocol over in-process cores (strategies are deep-copied, as
    Ray would pickle them)."""

    def __init__(self, combiners: int = 1, **settings: Any) -> None:
        base = {"heartbeat_interval_s": HEARTBEAT_S, "offline_after_s": 5.0, "chunk_kib": 64}
        self.listener = CoreListener()
        self.runner: Any = None  # set by run_session: it counts buffered rounds
        self.cores = {f"combiner-{i}": CombinerCore(f"combiner-{i}",
                                                    CombinersConfig(**{**base, **settings}),
                                                    listener=self.listener, claimer=self._claim)
                      for i in range(combiners)}
        self.names = list(self.cores)
        self.clients: dict[str, SimClient] = {}
        self._runs: dict[str, asyncio.Task] = {}
        self.sessions_sent: list[str] = []  # each combiner a strategy was sent to, in order

    def add(self, client_id: str, train: TrainFn, combiner: str | None = None,
            **kwargs: Any) -> SimClient:
        name = combiner or self.names[len(self.clients) % len(self.names)]
        client = SimClient(self.cores[name], client_id, train, **kwargs)
        self.clients[client_id] = client
        self._runs[client_id] = asyncio.ensure_future(client.run())
        return client

    def remove(self, client_id: str) -> None:
        client = self.clients.pop(client_id)
        link = client.core.clients.get(client_id)
        if link is not None:
            link.queue.put_nowait(None)

    async def close(self) -> None:
        for name in list(self.clients):
            self.remove(name)
        for task in self._runs.values():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _claim(self, session_id, round_, attempt, client_id) -> int:
        return self.runner.claim(round_, attempt, client_id) if self.runner else 0

    # the CombinerPool protocol

    async def online(self):
        return {name: core.online_info() for name, core in self.cores.items()}

    async def wait_for_change(self, online, timeout_s: float) -> None:
        waits = [asyncio.ensure_future(core.wait_clients_changed(len(online.get(name, [])),
                                                                 timeout_s))
                 for name, core in self.cores.items()]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()

    def put_model(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    async def resolve(self, handle: Any) -> Any:
        return handle

    async def loads(self):
        return {name: (len(core.online_info()), f"sim://{name}")
                for name, core in self.cores.items()}

    async def balance(self, recent_s: float, settle_s: float):
        from fedray.actors.balance import CombinerLoad

        return {name: CombinerLoad(a["load"], f"sim://{name}", a["movable"], frozenset(a["joined"]))
                for name, core in self.cores.items()
                for a in [core.balance_info(recent_s, settle_s)]}

    async def release(self, combiner: str, count: int, settle_s: float):
        return self.cores[combiner].release(count, settle_s)

    async def start_session(self, session_id: str, strategy, combiners=None) -> None:
        self.sessions_sent.extend(self.names if combiners is None else combiners)
        for name in self.names if combiners is None else combiners:
            self.cores[name].start_session(session_id, copy.deepcopy(strategy))

    async def run_round(self, combiner, spec, model_ref):
        return await self.cores[combiner].run_round(spec, model_ref)

    async def start_async(self, combiner, spec, model_ref, version, model_id):
        await self.cores[combiner].start_async(spec, model_ref, version, model_id)

    async def add_clients(self, combiner, clients):
        self.cores[combiner].add_clients(clients)

    async def set_version(self, combiner, version, model_ref, model_id):
        await self.cores[combiner].set_version(version, model_ref, model_id)

    async def take_updates(self, combiner, session_id, timeout_s):
        return await self.cores[combiner].take_updates(session_id, timeout_s)

    async def stop_async(self, combiner, session_id):
        return self.cores[combiner].stop_async(session_id)

    async def buffer_full(self, combiner, session_id, round_, attempt):
        self.cores[combiner].buffer_full(session_id, round_, attempt)


def session_settings(**fields: Any) -> SessionConfig:
    """Session settings as a config file would give them (nested mappings included)."""
    base = {"rounds": 3, "min_clients": 2, "round_timeout_s": 10.0, "validate": False,
            "wait_for_clients_s": 10.0}
    config = config_from_dict({"federation": "sim", "seed_model": "unused",
                               "session": {**base, **fields}})
    return config.session


async def run_session(pool: SimPool, store: MemoryStore, settings: SessionConfig,
                      start: Start, session_id: str | None = None,
                      recorder: Recorder | None = None, strategy=None) -> tuple[str, str, Any]:
    """Run one session to its end; (state, reason, its ``Session``, with the events it
    reported as ``recorder``)."""
    recorder = recorder or Recorder()
    status = SessionStatus(session_id=session_id or uuid.uuid4().hex[:16])
    strategy = strategy or make_strategy(settings.aggregator, settings.aggregator_kwargs)
    runner = SessionRunner(federation="sim", session_id=status.session_id, settings=settings,
                           strategy=strategy, pool=pool, store=store,
                           callbacks=Callbacks([recorder, StatusCallback(status, lambda s: None)]),
                           combiner_strategy=copy.deepcopy(strategy))
    pool.runner = runner
    state, reason = await runner.run(start)
    session = runner.session
    session.recorder = recorder
    return state, reason, session
