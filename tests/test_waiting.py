"""The shared wait helpers (tests/waiting.py): a value as soon as the condition holds, and
a timeout that names what did not happen."""

from __future__ import annotations

import itertools

import pytest

from tests.waiting import async_wait_until, connections, wait_until


def test_wait_until_returns_the_conditions_first_truthy_value():
    asked = itertools.count(1)

    assert wait_until(lambda: next(asked) >= 3 and "ready", "the third ask") == "ready"


def test_a_timeout_names_what_did_not_happen_and_the_state_last_seen():
    with pytest.raises(AssertionError, match=r"waiting for the sky to fall; last seen: "
                                             r"\['clouds'\]"):
        wait_until(lambda: False, "the sky to fall", timeout=0.05,
                   describe=lambda: ["clouds"])


def test_retry_on_counts_an_exception_as_not_yet_and_others_end_the_wait():
    asked = itertools.count(1)

    def flaky() -> bool:
        if next(asked) < 3:
            raise ConnectionError("restarting")
        return True

    def broken() -> bool:
        raise KeyError("a bug, not a service restarting")

    assert wait_until(flaky, "the service", retry_on=(ConnectionError,))
    with pytest.raises(KeyError):
        wait_until(broken, "the service", retry_on=(ConnectionError,))


async def test_async_wait_until_awaits_an_async_condition():
    asked = itertools.count(1)

    async def ready() -> int:
        return next(asked) >= 2 and 7

    assert await async_wait_until(ready, "the second ask") == 7
    with pytest.raises(AssertionError, match="timed out after 0.05s waiting for never"):
        await async_wait_until(lambda: False, "never", timeout=0.05)


def test_connections_counts_the_edge_clients_connected_lines():
    lines = ["[a] connected to combiner-0 at 127.0.0.1:1", "[a] round 1 train",
             "[b] connected to combiner-1 at 127.0.0.1:2"]
    assert connections(lines) == 2
