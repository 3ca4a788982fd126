"""Sessions asked of a running federation, waiting their turn (they run one at a time).

A ``SessionRequest`` is everything a session needs that may differ from the last one: its
settings, its seed, its compute package. The service (``fedray serve``) builds it from the
user's config and ``--set`` overrides; the controller queues it here and runs the oldest
when the one running ends. Pure bookkeeping: nothing here knows Ray or asyncio.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from fedray.config import SessionConfig
from fedray.errors import SessionError

MAX_QUEUED = 64  # sessions waiting at once; more is refused with the reason


@dataclass(frozen=True)
class SessionRequest:
    """A session to run: its settings, what it trains from, and who asked for it."""

    session_id: str
    settings: SessionConfig
    seed_model_id: str  # "" with settings.continue_from: that session's last model
    package_sha256: str = ""
    package_size: int = 0
    submitted_by: str = ""
    submitted_at: float = field(default_factory=time.time)

    def summary(self, position: int) -> dict[str, Any]:
        """What ``fedray session list`` shows of a queued session."""
        s = self.settings
        return {"session_id": self.session_id, "state": "queued", "position": position,
                "strategy": s.aggregator, "rounds_planned": s.rounds,
                "submitted_by": self.submitted_by, "submitted_at": self.submitted_at,
                "continue_from": s.continue_from or None,
                "seed_model_id": self.seed_model_id or None}


class SessionQueue:
    """Requests in the order they came, bounded by ``limit``."""

    def __init__(self, limit: int = MAX_QUEUED) -> None:
        self.limit = limit
        self._waiting: OrderedDict[str, SessionRequest] = OrderedDict()

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._waiting

    def push(self, request: SessionRequest) -> int:
        """Queue ``request``; its position (1: next to run)."""
        if len(self._waiting) >= self.limit:
            raise SessionError(f"{len(self._waiting)} sessions are already waiting (the limit "
                               f"is {self.limit}); stop some with fedray session stop ID")
        if request.session_id in self._waiting:
            raise SessionError(f"session {request.session_id} is already queued")
        self._waiting[request.session_id] = request
        return len(self._waiting)

    def pop(self) -> SessionRequest | None:
        """The oldest request, taken off the queue (None when none waits)."""
        if not self._waiting:
            return None
        return self._waiting.popitem(last=False)[1]

    def remove(self, session_id: str) -> SessionRequest | None:
        return self._waiting.pop(session_id, None)

    def listing(self) -> list[dict[str, Any]]:
        return [request.summary(i) for i, request in enumerate(self._waiting.values(), 1)]
