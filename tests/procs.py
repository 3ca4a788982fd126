"""Which processes a command under test started, found by a mark in their environment.

The test gives the command a unique ``FEDRAY_TEST_MARK``. Every process it starts (edge
clients, nx-27017, a local Ray's gcs_server, raylet, agents and workers, and whatever
those start) inherits that environment, so ``/proc/<pid>/environ`` names exactly the
command's descendants, whatever they renamed themselves to and whoever their parent is
by now. A process that replaced its environment is still caught when its command line
mentions the test's folder. Zombies (already dead, waiting to be reaped) don't count.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from pathlib import Path

from tests.waiting import wait_until

MARK = "FEDRAY_TEST_MARK"


def new_mark() -> str:
    return uuid.uuid4().hex


def marked(env: dict[str, str], mark: str) -> dict[str, str]:
    return {**env, MARK: mark}


def survivors(mark: str, folder: Path | None = None) -> list[str]:
    """``pid: command line`` of each live process that carries ``mark`` (or names ``folder``)."""
    needle, me, found = f"{MARK}={mark}".encode(), os.getpid(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if state in {"Z", "X"}:
            continue
        if needle in environ or (folder is not None and str(folder) in cmdline):
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


def assert_none_left(mark: str, folder: Path | None = None, grace_s: float = 3.0) -> None:
    """Fail (after killing them) if processes of ``mark`` are still alive ``grace_s`` after
    the command ended; the grace only covers the kernel finishing kills already sent."""
    left: list[str] = []

    def gone() -> bool:
        left[:] = survivors(mark, folder)
        return not left

    with contextlib.suppress(AssertionError):  # still alive after the grace: killed, reported
        wait_until(gone, "the command's processes to end", timeout=grace_s, poll_s=0.1)
    for line in left:  # ours: don't leave them to the next test
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line.partition(":")[0]), signal.SIGKILL)
    assert not left, "processes outlived the command:\n" + "\n".join(left)
