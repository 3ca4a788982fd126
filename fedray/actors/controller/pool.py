"""How the session runner reaches its combiners: the ``CombinerPool`` protocol.

In a federation it is ``fedray.actors.controller.ray_pool.RayCombinerPool`` (actor handles looked up
by name; models and kept updates are object-store refs); in tests it is in-process
combiner cores (tests/simfed.py). Nothing here imports Ray, so the runner's decisions
are tested without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from fedray.actors.balance import CombinerLoad
from fedray.messages import AsyncSpec, RoundResult, RoundSpec
from fedray.strategies.base import Strategy
from fedray.strategies.snapshots import ClientInfo
from fedray.strategies.updates import Buffer


class CombinerPool(Protocol):
    """How the runner reaches its combiners (Ray actors, or in-process cores in tests)."""

    names: list[str]

    async def online(self) -> dict[str, list[ClientInfo]]: ...
    async def loads(self) -> dict[str, tuple[int, str]]: ...  # name -> (clients, address)
    async def balance(self, recent_s: float, settle_s: float) -> dict[str, CombinerLoad]:
        """Each live combiner's load, movable clients and recent joins (``fedray.actors.balance``)."""
    async def release(self, combiner: str, count: int, settle_s: float) -> list[str]:
        """Ask ``combiner`` to send up to ``count`` idle clients back to the gateway."""
    async def wait_for_change(self, online: Mapping[str, list[Any]], timeout_s: float) -> None: ...
    def put_model(self, data: bytes) -> Any: ...
    async def resolve(self, handle: Any) -> Buffer: ...
    async def start_session(self, session_id: str, strategy: Strategy,
                            combiners: Sequence[str] | None = None) -> None:
        """Send the strategy to ``combiners`` (every one by default) and keep it, so that a
        combiner Ray restarted can be sent it again."""
    async def run_round(self, combiner: str, spec: RoundSpec, model_ref: Any) -> RoundResult: ...
    async def start_async(self, combiner: str, spec: AsyncSpec, model_ref: Any, version: int,
                          model_id: str) -> None: ...
    async def add_clients(self, combiner: str, clients: list[str]) -> None: ...
    async def set_version(self, combiner: str, version: int, model_ref: Any,
                          model_id: str) -> None: ...
    async def take_updates(self, combiner: str, session_id: str,
                           timeout_s: float) -> RoundResult:
        """The updates the combiner accepted since the last call (its ``partial``:
        ``KeptUpdates``) and what it counted meanwhile; calling again says the runner is
        done with them (their clients' next tasks go out then)."""
    async def stop_async(self, combiner: str, session_id: str) -> dict[str, Any]: ...
    async def buffer_full(self, combiner: str, session_id: str, round_: int, attempt: int) -> None: ...
