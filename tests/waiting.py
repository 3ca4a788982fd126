"""Waiting in tests for something to happen, never for a fixed time.

``wait_until`` (in a thread) and ``async_wait_until`` (in a coroutine) ask a condition
until it holds and return its (truthy) value. When ``timeout`` passes first they raise
``AssertionError`` naming what did not happen (``what``) and, given ``describe``, the
state as it stood then::

    wait_until(lambda: marker.exists(), "the client to start training", timeout=60)
    await async_wait_until(lambda: "a" in share.gone, "'a' to be marked gone",
                           describe=lambda: sorted(share.gone))

Prefer a real event when the code under test offers one (``asyncio.Event.wait``, a
Future, a process's output line, ``threading.Event.wait``); these helpers are for state a
test can only observe. A timeout is a bound for a failing test, not a delay: a passing
wait ends as soon as its condition holds, so timeouts are generous (a loaded two-core
machine is slow). Conditions that several test files wait for live here too.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Iterable
from typing import Any

POLL_S = 0.02  # how often a condition is asked again: the helpers' own mechanism
TIMEOUT_S = 30.0  # the default bound (failing tests only: a passing wait ends at once)

Condition = Callable[[], Any]


def wait_until(condition: Condition, what: str, *, timeout: float = TIMEOUT_S,
               describe: Callable[[], Any] | None = None,
               retry_on: tuple[type[BaseException], ...] = (),
               poll_s: float = POLL_S) -> Any:
    """``condition()``'s first truthy value, asked every ``poll_s`` for up to ``timeout``
    seconds. An exception in ``retry_on`` counts as "not yet" (a service that restarts
    meanwhile); any other exception, an ``AssertionError`` included, ends the wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = _ask(condition, retry_on)
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout, describe))
        time.sleep(poll_s)  # the helper's own poll interval (POLL_S)


async def async_wait_until(condition: Condition, what: str, *, timeout: float = TIMEOUT_S,
                           describe: Callable[[], Any] | None = None,
                           retry_on: tuple[type[BaseException], ...] = (),
                           poll_s: float = POLL_S) -> Any:
    """``wait_until`` for a coroutine: the event loop runs while it waits. ``condition``
    may also return an awaitable (an ``async def`` condition), which is awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = _ask(condition, retry_on)
        if inspect.isawaitable(value):
            try:
                value = await value
            except retry_on:
                value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout, describe))
        await asyncio.sleep(poll_s)  # the helper's own poll interval (POLL_S)


def _ask(condition: Condition, retry_on: tuple[type[BaseException], ...]) -> Any:
    try:
        return condition()
    except retry_on:
        return None


def _timed_out(what: str, timeout: float, describe: Callable[[], Any] | None) -> str:
    message = f"timed out after {timeout:g}s waiting for {what}"
    if describe is not None:
        try:
            seen = describe()
        except Exception as exc:  # noqa: BLE001 - the timeout is the failure to report
            seen = f"(describe failed: {exc!r})"
        message += f"; last seen: {seen}"
    return message


# --- conditions several test files wait for ---


def connections(lines: Iterable[str]) -> int:
    """How many times edge clients said they connected to a combiner (their ``say`` lines)."""
    return sum("connected to" in line for line in lines)


def wait_connected(fleet: Any, count: int, timeout: float = TIMEOUT_S) -> None:
    """Until the ``EdgeFleet``'s clients connected ``count`` times in all."""
    wait_until(lambda: connections(fleet.lines) >= count,
               f"{count} edge client connection(s)", timeout=timeout,
               describe=lambda: fleet.lines[-20:])
