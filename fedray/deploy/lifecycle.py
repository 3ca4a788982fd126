"""Stopping everything a `fedray run` or `fedray demo` started, however the command ends.

The command runs inside ``running()``, which hands it a ``Teardown``: whatever the command
starts (the data directory's run lock, the tracking server, a local Ray, the federation's
actors, edge clients) is registered there with a label and the call that stops it.
``Teardown.close`` stops them in a fixed order (federation, edge clients, tracking server,
Ray, lock) and goes on past a failing step.

- **Signals.** The first SIGINT or SIGTERM raises ``Stopped`` in the main thread (a
  ``KeyboardInterrupt``, the one exception Ray's blocking calls pass through), the stack
  unwinds, and the CLI prints one line: ``fedray: stopped by SIGTERM: federation demo,
  4 edge clients, tracking server, Ray``, then exits 128 + the signal's number. Signals that
  arrive while the teardown runs are noted and ignored, so a second Ctrl-C cannot cut the
  clean-up short. ``ray.init`` installs its own SIGTERM handler (and Ray's C++ crash
  handler, which prints a stack dump): ``claim_signals`` takes them back.
- **Children.** Processes fedray starts get ``fedray.children.fate_shared()`` as
  ``preexec_fn``: ``PR_SET_PDEATHSIG`` makes the kernel signal them when the thread that
  started them ends, even if the command is killed with SIGKILL.
- **Last sweep.** ``running()`` puts a unique ``FEDRAY_RUN`` into the environment, which
  every descendant inherits (Ray's gcs_server, raylet, agents and workers included). When
  the teardown is done, any live process that still carries it is killed. Nothing else
  is: the mark is this command's alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedray.errors import AlreadyRunning

log = logging.getLogger(__name__)

RUN_ENV = "FEDRAY_RUN"
SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Stages, in the order ``close`` stops them.
FEDERATION, CLIENTS, TRACKING, RAY, LOCK = range(5)


class Stopped(KeyboardInterrupt):
    """The command got SIGINT or SIGTERM. A KeyboardInterrupt because Ray's blocking calls
    (``ray.get``) let only that through; ``running()`` re-raises whatever arrives as this."""

    def __init__(self, signum: int, stopped: list[str] | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
        self.stopped = stopped or []

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        name = signal.Signals(self.signum).name
        if not self.stopped:
            return f"stopped by {name} (nothing was running)"
        return f"stopped by {name}: " + ", ".join(self.stopped)


@dataclass
class _Entry:
    stage: int
    label: str | Callable[[], str]  # "" or a callable returning "": stopped, not listed
    stop: Callable[[], None]


class Teardown:
    """What one command started, stopped in stage order (last added first within a stage)."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex
        self.signum: int | None = None
        self.closing = False
        self.stopped: list[str] = []  # labels, in the order they were stopped
        self._from = 0  # where the labels stopped because of the signal start
        self._entries: list[_Entry] = []

    def add(self, stage: int, label: str | Callable[[], str], stop: Callable[[], None]) -> None:
        self._entries.append(_Entry(stage, label, stop))

    def close(self) -> list[str]:
        """Stop everything registered so far (again: only what was added since); return the
        labels of what this call stopped. Signals wait until it is done."""
        if self.closing:
            return []
        self.closing = True
        try:
            done = []
            entries, self._entries = self._entries, []
            for entry in sorted(reversed(entries), key=lambda e: e.stage):
                try:
                    entry.stop()
                except Exception as exc:  # noqa: BLE001 - stopping the rest matters more
                    log.warning("stopping %s failed: %s", entry.label, exc)
                label = entry.label() if callable(entry.label) else entry.label
                if label:
                    done.append(label)
            self.stopped.extend(done)
            sweep(self.run_id)
            return done
        finally:
            self.closing = False

    def _on_signal(self, signum: int, frame) -> None:
        if self.closing or self.signum is not None:
            log.info("got signal %d while stopping; still stopping", signum)
            return
        self.signum, self._from = signum, len(self.stopped)
        raise Stopped(signum)

    def since_signal(self) -> list[str]:
        return self.stopped[self._from:]


_active: Teardown | None = None


def claim_signals() -> None:
    """(Re)install the active command's SIGINT/SIGTERM handler, e.g. after ``ray.init``
    replaced it (Ray's own handler exits at once, and its C++ one prints a stack dump)."""
    if _active is not None and sys.platform != "win32":
        for sig in SIGNALS:
            signal.signal(sig, _active._on_signal)


def checkpoint() -> None:
    """Raise ``Stopped`` if the active command got a signal that nobody has acted on yet.

    A handler's exception can be lost: raised while a finalizer or a logging lock release
    runs, Python prints "Exception ignored" and carries on. The signal is recorded before
    the raise, so the long waits of a command (starting Ray, following a session) look
    here too, and a signal stops the command however it landed."""
    if _active is not None and _active.signum is not None and not _active.closing:
        raise Stopped(_active.signum)


@contextlib.contextmanager
def ours_kept() -> Iterator[None]:
    """While ``ray.init`` runs, keep the command's SIGTERM handler: Ray installs one that
    calls ``sys.exit`` from wherever the signal lands (a swallowed SystemExit then lets a
    stopped command carry on)."""
    if _active is None:
        yield
        return
    from ray._private import utils

    original = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = original
        claim_signals()


def stop_by(signum: int) -> Stopped:
    """Record ``signum`` as the active command's stop (a signal another handler caught)."""
    if _active is not None and _active.signum is None:
        _active.signum, _active._from = signum, len(_active.stopped)
    return Stopped(signum)


@contextlib.contextmanager
def running() -> Iterator[Teardown]:
    """Run a command that starts things: see the module docstring."""
    global _active
    teardown = Teardown()
    saved_env = os.environ.get(RUN_ENV)
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    os.environ[RUN_ENV] = teardown.run_id
    _active = teardown
    claim_signals()
    saved_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_about_stops(saved_hook)
    try:
        try:
            yield teardown
        finally:
            teardown.close()
    except KeyboardInterrupt:
        if teardown.signum is None:
            raise
        raise Stopped(teardown.signum, teardown.since_signal()) from None
    finally:
        _active = None
        sys.unraisablehook = saved_hook
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if saved_env is None:
            os.environ.pop(RUN_ENV, None)
        else:
            os.environ[RUN_ENV] = saved_env


def _quiet_about_stops(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable hook that says nothing of a ``Stopped`` lost where Python cannot raise
    (a fork hook, a finalizer): the signal is recorded, and the next ``checkpoint`` acts
    on it. Without this the one-line stop came after an "Exception ignored" traceback."""

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, Stopped):
            previous(unraisable)

    return hook


def _marked(needle: bytes) -> list[int]:
    me, found = os.getpid(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
            if state not in {"Z", "X"} and needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue  # gone, or another user's
    return found


def sweep(run_id: str, rounds: int = 10) -> int:
    """SIGKILL every live process still carrying ``FEDRAY_RUN=run_id``; return how many."""
    if not Path("/proc/self/environ").exists():
        return 0
    needle, killed = f"{RUN_ENV}={run_id}".encode(), 0
    for _ in range(rounds):  # a dying parent may still start a child: look again
        pids = _marked(needle)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.05)
    if killed:
        log.info("killed %d leftover process(es) of this run", killed)
    return killed


class RunLock:
    """An exclusive ``flock`` on ``<data_dir>/run.lock``, holding the owner's PID.

    The kernel drops it when the process ends, however it ends, so a lock is never stale;
    the file is opened close-on-exec, so no child keeps it.
    """

    def __init__(self, data_dir: Path, federation: str) -> None:
        self.path = Path(data_dir) / "run.lock"
        self.federation = federation
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"federation {self.federation} is already running from {self.path.parent} "
                f"(pid {owner}); stop that run first, or use another --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock; the file stays, harmless

    @staticmethod
    def held(data_dir: Path) -> bool:
        """Whether a live process holds ``data_dir``'s run lock (a run is going on there)."""
        path = Path(data_dir) / "run.lock"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # a lock we took goes with the descriptor
        return False


RUN_RECORD = "ray.json"  # in the data directory while a run holds its lock


def record_run(data_dir: Path, federation: str, ray_address: str) -> Callable[[], None]:
    """Say where this run's Ray is, for `fedray status` on this data directory; returns
    the call that takes it back."""
    path = Path(data_dir) / RUN_RECORD
    path.write_text(json.dumps({"ray_address": ray_address, "federation": federation,
                                "pid": os.getpid()}) + "\n")
    return lambda: path.unlink(missing_ok=True)


GATEWAY_RECORD = "gateway.json"


def record_gateway(data_dir: Path, gateway: str, tls: bool) -> None:
    """Say where clients dial this federation (kept after the run): what ``fedray client
    add`` writes into credential bundles when not told ``--gateway``."""
    (Path(data_dir) / GATEWAY_RECORD).write_text(json.dumps({"gateway": gateway,
                                                             "tls": tls}) + "\n")


def recorded_gateway(data_dir: Path) -> str:
    """The gateway address of this data directory's last run ("" if none was recorded)."""
    try:
        return str(json.loads((Path(data_dir) / GATEWAY_RECORD).read_text())["gateway"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def recorded_run(data_dir: Path) -> tuple[str, str] | None:
    """(Ray address, federation) of the run going on in ``data_dir`` (``fedray run``
    records them while it holds the directory's run lock), if one is."""
    try:
        record = json.loads((Path(data_dir) / RUN_RECORD).read_text())
        address, federation = str(record["ray_address"]), str(record["federation"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (address, federation) if RunLock.held(data_dir) else None
