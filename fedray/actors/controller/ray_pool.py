"""``CombinerPool`` over Ray: combiner actors looked up by name in the federation's namespace.

Models go into the object store once per version and every combiner gets the same ref;
kept updates come back as refs the controller reads zero-copy. The session's strategy is
sent to each combiner once; a combiner that Ray restarted has forgotten it, says so
(``UnknownSession``), and is sent it again before the call is retried.

This is the seam between controller and combiners: every Ray error a call raises leaves
it translated (``translate``) into fedray's own tree, naming the combiner and the round
(``CombinerLost``, ``CombinerFailed``, ``CombinerTimeout``); a fedray error the combiner
raised itself comes through as it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import ray

from fedray.actors.balance import CombinerLoad
from fedray.errors import (
    CombinerError,
    CombinerFailed,
    CombinerLost,
    CombinerTimeout,
    FedrayError,
    UnknownSession,
)
from fedray.messages import AsyncSpec, RoundResult, RoundSpec
from fedray.strategies.base import Strategy
from fedray.strategies.snapshots import ClientInfo


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:300]


def translate(exc: BaseException, combiner: str, round_: int | None) -> FedrayError:
    """A Ray error from a call to ``combiner`` as fedray's own (see the module docstring)."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, FedrayError):
        return cause  # the combiner said what went wrong itself (UnknownSession, ...)
    if isinstance(exc, FedrayError):
        return exc
    kind = type(exc).__name__
    if isinstance(exc, ray.exceptions.ActorUnavailableError):
        return CombinerLost(combiner, round_, f"unreachable, Ray is restarting it ({kind})")
    if isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.ActorUnschedulableError):
        return CombinerLost(combiner, round_, f"died ({kind}): {_first_line(exc)}")
    if isinstance(exc, ray.exceptions.ObjectLostError):
        return CombinerLost(combiner, round_, f"what it returned was lost ({kind})")
    if isinstance(exc, ray.exceptions.GetTimeoutError):
        return CombinerTimeout(combiner, round_, f"no answer in time ({kind})")
    if isinstance(exc, ray.exceptions.RayTaskError):
        inner = type(cause).__name__ if cause is not None else kind
        return CombinerFailed(combiner, round_, f"failed with {inner}: "
                              f"{_first_line(cause if cause is not None else exc)}")
    if isinstance(exc, ray.exceptions.RayError):
        return CombinerFailed(combiner, round_, f"{kind}: {_first_line(exc)}")
    return CombinerFailed(combiner, round_, f"{kind}: {_first_line(exc)}")


class RayCombinerPool:
    """The controller's view of its combiners, through Ray actor handles looked up by name.

    The session's strategy is sent to each combiner once; a combiner that Ray restarted
    has forgotten it, says so (``UnknownSession``), and is sent it again.
    """

    def __init__(self, names: list[str], namespace: str) -> None:
        self.names = names
        self.namespace = namespace
        self.strategies: dict[str, Strategy] = {}
        self._handles: dict[str, Any] = {}
        # Awaited before every snapshot of who is online (the controller's: until clients
        # the rebalancer moved have landed, so a round planned now asks them too).
        self.before_online: Callable[[], Awaitable[None]] | None = None

    def handle(self, name: str):
        """The actor's handle: looked up once (a blocking call to Ray's control plane, in
        the controller's event loop), then kept until a call finds the actor gone."""
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = ray.get_actor(name, namespace=self.namespace)
        return handle

    async def _ask(self, name: str, method: str, *args: Any, round_: int | None = None) -> Any:
        try:
            handle = self.handle(name)
        except ValueError as exc:  # ray.get_actor: no actor by that name (yet)
            raise CombinerLost(name, round_, f"not found in {self.namespace}: "
                               f"{_first_line(exc)}") from None
        try:
            return await getattr(handle, method).remote(*args)
        except ray.exceptions.RayActorError as exc:
            # Dead or unreachable: the next call looks the name up again, and finds the
            # actor that was started under it since.
            if self._handles.get(name) is handle:
                del self._handles[name]
            raise translate(exc, name, round_) from None
        except CombinerError:
            raise
        except Exception as exc:  # noqa: BLE001 - every other failure, translated once here
            raise translate(exc, name, round_) from None

    # The elastic tier (``fedray.actors.controller.tier``) changes the set between rounds:
    # ``names`` is replaced, never changed in place, so a round keeps the set it planned on.

    def add(self, name: str, handle: Any) -> None:
        """A combiner joins the set: the next round's planning sees it."""
        self._handles[name] = handle
        self.names = [*[n for n in self.names if n != name], name]

    def retire(self, name: str) -> None:
        """Out of the set (a drain begins); calls by name still reach it, for the round in
        flight there."""
        self.names = [n for n in self.names if n != name]

    def forget(self, name: str) -> None:
        """The combiner is gone for good."""
        self.retire(name)
        self._handles.pop(name, None)

    async def call(self, name: str, method: str, *args: Any) -> Any:
        """Any combiner method, with the pool's error translation (``translate``)."""
        return await self._ask(name, method, *args)

    async def online(self) -> dict[str, list[ClientInfo]]:
        if self.before_online is not None:
            await self.before_online()
        answers = await asyncio.gather(*(self._ask(n, "online_info") for n in self.names),
                                       return_exceptions=True)
        return {n: a for n, a in zip(self.names, answers, strict=True) if isinstance(a, list)}

    async def loads(self) -> dict[str, tuple[int, str]]:
        answers = await asyncio.gather(*(self._ask(n, "info") for n in self.names),
                                       return_exceptions=True)
        return {n: (a["load"], a["address"]) for n, a in zip(self.names, answers, strict=True)
                if isinstance(a, dict)}

    async def balance(self, recent_s: float, settle_s: float) -> dict[str, CombinerLoad]:
        answers = await asyncio.gather(*(self._ask(n, "balance_info", recent_s, settle_s)
                                         for n in self.names), return_exceptions=True)
        return {n: CombinerLoad(a["load"], a["address"], a["movable"], frozenset(a["joined"]))
                for n, a in zip(self.names, answers, strict=True) if isinstance(a, dict)}

    async def release(self, combiner: str, count: int, settle_s: float) -> list[str]:
        return await self._ask(combiner, "release", count, settle_s)

    async def wait_for_change(self, online: dict[str, list[Any]], timeout_s: float) -> None:
        """Return as soon as any combiner's number of online clients changes."""
        waits = [asyncio.ensure_future(self._ask(n, "wait_clients_changed", len(online.get(n, [])),
                                                 timeout_s)) for n in self.names]
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if any(task.exception() is not None for task in done):
            await asyncio.sleep(0.5)  # a combiner is restarting: ask again shortly, not in a spin

    def put_model(self, data: bytes) -> Any:
        # One copy in the object store per model; every combiner gets the same ref.
        return ray.put(np.frombuffer(data, dtype=np.uint8))

    async def resolve(self, handle: Any) -> np.ndarray:
        return await handle  # zero-copy: a view of the object store's shared memory

    async def start_session(self, session_id: str, strategy: Strategy,
                            combiners: Sequence[str] | None = None) -> None:
        self.strategies = {session_id: strategy}
        await asyncio.gather(*(self._ask(n, "start_session", session_id, strategy)
                               for n in (self.names if combiners is None else combiners)),
                             return_exceptions=True)

    async def _with_session(self, combiner: str, session_id: str, method: str, *args: Any,
                            round_: int | None = None) -> Any:
        try:
            return await self._ask(combiner, method, *args, round_=round_)
        except UnknownSession:
            if session_id not in self.strategies:
                raise
        await self._ask(combiner, "start_session", session_id, self.strategies[session_id],
                        round_=round_)
        return await self._ask(combiner, method, *args, round_=round_)

    async def run_round(self, combiner: str, spec: RoundSpec, model_ref: Any) -> RoundResult:
        return await self._with_session(combiner, spec.session_id, "run_round", spec, model_ref,
                                        round_=spec.round)

    async def start_async(self, combiner: str, spec: AsyncSpec, model_ref: Any, version: int,
                          model_id: str) -> None:
        await self._with_session(combiner, spec.session_id, "start_async", spec, model_ref,
                                 version, model_id)

    async def add_clients(self, combiner: str, clients: list[str]) -> None:
        await self._ask(combiner, "add_clients", clients)

    async def set_version(self, combiner: str, version: int, model_ref: Any,
                          model_id: str) -> None:
        await self._ask(combiner, "set_version", version, model_ref, model_id)

    async def take_updates(self, combiner: str, session_id: str,
                           timeout_s: float) -> RoundResult:
        return await self._ask(combiner, "take_updates", session_id, timeout_s)

    async def stop_async(self, combiner: str, session_id: str) -> dict[str, Any]:
        return await self._ask(combiner, "stop_async", session_id)

    async def buffer_full(self, combiner: str, session_id: str, round_: int, attempt: int) -> None:
        await self._ask(combiner, "buffer_full", session_id, round_, attempt, round_=round_)
