"""Runtime policies: pure decisions over frozen snapshots; the actors carry them out.

Whether a round may commit, and which combiner a client joins. (Where a session resumes
is read off its tracking documents: ``fedray.tracking.resume``.)
(A round's own decisions, who is asked and when a share closes, are the strategy's:
``fedray.strategies`` and ``fedray.strategies.selection``.) Nothing here does I/O or knows about
Ray or gRPC, so every rule is unit-tested directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RoundVerdict:
    ok: bool
    reason: str = ""


def round_verdict(updates: int, min_clients: int, lost_combiners: Sequence[str]) -> RoundVerdict:
    """Whether a round's reduced updates are enough to commit a new model."""
    if updates >= min_clients:
        return RoundVerdict(True)
    lost = f"; combiners lost: {', '.join(lost_combiners)}" if lost_combiners else ""
    return RoundVerdict(False, f"only {updates} update(s) arrived, session.min_clients is "
                               f"{min_clients}{lost}")


def pick_combiner(loads: Mapping[str, int], capacity: int, avoid: str = "") -> str | None:
    """Gateway balancing: the least-loaded combiner with room, avoiding the one named."""
    candidates = [(load, name) for name, load in loads.items() if load < capacity]
    preferred = [c for c in candidates if c[1] != avoid] or candidates
    return min(preferred)[1] if preferred else None
