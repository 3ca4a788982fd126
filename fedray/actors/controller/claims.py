"""The first-K count of a buffered round (``session.buffer_size``), across combiners.

A combiner that has checked an update of a buffered round asks the controller for one of
the round's K slots before it folds the update (``Controller.claim_update``). The count
lives here, in one place, so that K is exact however many combiners there are; the K-th
claim tells every combiner to close its share.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fedray.actors.controller.session import Session

Closer = Callable[[int, int], Awaitable[None]]  # (round, attempt) -> every share closed


class BufferClaims:
    def __init__(self, session: Session, close_all: Closer) -> None:
        self.session = session
        self.close_all = close_all
        self._open: dict[tuple[int, int], list[int]] = {}  # (round, attempt) -> [count, K]

    def open(self, round_: int, attempt: int, k: int) -> None:
        self._open[(round_, attempt)] = [0, k]

    def close(self, round_: int, attempt: int) -> None:
        self._open.pop((round_, attempt), None)

    def claim(self, round_: int, attempt: int, client_id: str) -> int:
        """The round's count with this update, or 0 once the first K are in (or the
        round is not buffered, or over)."""
        entry = self._open.get((round_, attempt))
        if entry is None or entry[0] >= entry[1]:
            return 0
        entry[0] += 1
        if entry[0] == entry[1]:
            self.session.note("info", f"round {round_} has its first {entry[1]} updates "
                              "(session.buffer_size); closing it", round_)
            self.session.background(self.close_all(round_, attempt))
        return entry[0]
