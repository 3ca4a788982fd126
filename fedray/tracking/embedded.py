"""The embedded tracking database: an ``nx-27017`` server on loopback, run by fedray.

Tracking needs a MongoDB, but nobody should have to install one to try fedray. The
default (``tracking: {uri: embedded}``) launches ``nx-27017`` (a MongoDB wire-protocol
server backed by SQLite, installed from PyPI) as a child process bound to 127.0.0.1, with
its data under ``<data_dir>/tracking/``. fedray then talks to it with the same pymongo
code it uses for a real MongoDB, and so can mongosh, Compass or a notebook.

Files in ``<data_dir>/tracking/``:

    <db>.db            SQLite database per logical database (``fedray.db`` by default)
    server.json        ``{"pid", "port", "owner"}`` of the latest server, for reuse
    nx-27017.log       the server's log (appended across runs)
    nx-27017.out       its stdout/stderr of the latest run (start-up tracebacks land here)
    nx-27017.pid       the server's own pid file
    server.lock        serializes "reuse or start" between processes

Only the process that started a server (its ``owner``) stops it. A query command reuses
a live server, or starts one for itself and stops it when done. `fedray run` must not
depend on a server some other command will stop: it waits for such a server to go and
then starts its own, which it supervises (``connect_or_start(..., own=True)``).

The server runs in its own session, so a Ctrl-C in the terminal reaches the driver, which
then stops it by its PID (SIGTERM, then SIGKILL). It is also bound to the thread that
started it (``PR_SET_PDEATHSIG``): if the driver dies without stopping it, even by
SIGKILL, the kernel kills the server too. Nothing here ever signals a process by name.

nx-27017 has no authentication: any local user can talk to its loopback port. Its files
are at least private: the folder is 0700 and the server runs with umask 077, so what it
creates is 0600 (``docs/security.md`` says what it still exposes).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from fedray.bridge.keys import private_dir
from fedray.children import fate_shared
from fedray.errors import TrackingError
from fedray.tracking.loopback import HOST, free_port, mongo_uri, pid_alive, ping, port_is_free

log = logging.getLogger(__name__)

EXECUTABLE = "nx-27017"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
HANDOVER_WAIT_S = 60.0  # how long a run waits for another command's server to stop


def tracking_dir(data_dir: Path | str) -> Path:
    """Where the embedded server keeps its data for a federation's ``data_dir``."""
    return Path(data_dir).expanduser().resolve() / "tracking"


def find_executable() -> str:
    """The ``nx-27017`` launcher: next to this Python first (a venv), else on PATH."""
    beside = Path(sys.executable).parent / EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(EXECUTABLE)
    if found:
        return found
    raise TrackingError(
        f"the embedded tracking server {EXECUTABLE!r} was not found next to {sys.executable} "
        "or on PATH: install it (pip install 'fedray[server]') or set tracking.uri to a "
        "mongodb:// URI"
    )


def read_server_record(data_dir: Path | str) -> dict | None:
    """The ``{pid, port, owner}`` recorded in ``<data_dir>/tracking/server.json``, if
    readable; ``owner`` is the PID of the process that started it (None: not recorded)."""
    try:
        record = json.loads((tracking_dir(data_dir) / "server.json").read_text())
        owner = record.get("owner")
        return {"pid": int(record["pid"]), "port": int(record["port"]),
                "owner": None if owner is None else int(owner)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class EmbeddedMongo:
    """One ``nx-27017`` child process serving ``<data_dir>/tracking/`` on loopback.

    ``port`` is picked at the first start when not given, and kept, so ``stop()`` then
    ``start()`` brings the server back at the same URI (clients reconnect by themselves).
    """

    def __init__(self, data_dir: Path | str, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.dir = tracking_dir(self.data_dir)
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._exit_code: int | None = None

    def __repr__(self) -> str:
        return f"EmbeddedMongo({str(self.data_dir)!r}, port={self.port}, pid={self.pid})"

    @property
    def uri(self) -> str:
        if self.port is None:
            raise TrackingError("the embedded tracking server has not been started")
        return mongo_uri(self.port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_file(self) -> Path:
        return self.dir / "nx-27017.log"

    @property
    def out_file(self) -> Path:
        return self.dir / "nx-27017.out"

    @property
    def pid_file(self) -> Path:
        return self.dir / "nx-27017.pid"

    @property
    def server_file(self) -> Path:
        return self.dir / "server.json"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> EmbeddedMongo:
        """Launch the server and wait until it answers ``ping``; a no-op when running."""
        if self.running:
            return self
        executable = find_executable()
        try:
            _private_folder(self.dir)
        except OSError as exc:
            raise TrackingError(f"cannot create tracking folder {self.dir}: {exc}") from exc
        # Only a port we picked ourselves may be re-picked when another process grabs it
        # between our probe and the server's bind.
        attempts = 1 if self.port is not None else 3
        for attempt in range(attempts):
            if self.port is None or (attempts > 1 and attempt > 0):
                self.port = free_port()
            if self._launch(executable, timeout_s):
                self._write_record()
                return self
        raise TrackingError(
            f"{EXECUTABLE} exited during start-up (exit code {self._exit_code}); "
            f"see {self.out_file} and {self.log_file}"
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Terminate the server by its PID (SIGTERM, repeated, then SIGKILL); no-op if stopped."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # nx-27017 exits from its SIGTERM handler by raising SystemExit, which is lost when
        # the signal lands while a finalizer runs ("Exception ignored in ... __del__"). So
        # SIGTERM is repeated every second, and SIGKILL (safe for SQLite) ends the wait.
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        if proc.poll() is None:
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it",
                        EXECUTABLE, proc.pid, timeout_s)  # fmt: skip
            proc.kill()
            proc.wait()
        # server.json stays: a dead PID marks it stale, and the next server takes the same
        # port when it can, so clients holding the old URI find it again.

    def wait(self) -> int | None:
        """Block until the server process exits and return its exit code (None if not started)."""
        proc = self._proc
        return proc.wait() if proc is not None else None

    def __enter__(self) -> EmbeddedMongo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch(self, executable: str, timeout_s: float) -> bool:
        """Start one process; True once it answers, False if it exited (e.g. port taken)."""
        self._clear_stale_pid_file()
        argv = [
            executable,
            "--data-dir", str(self.dir),
            "--host", HOST,
            "-p", str(self.port),
            "--log-file", str(self.log_file),
            "--pid-file", str(self.pid_file),
        ]  # fmt: skip
        try:
            fd = os.open(self.out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as out:
                proc = self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.dir,
                    start_new_session=True,
                    close_fds=True,
                    umask=0o077,  # its databases, log and pid file: 0600
                    preexec_fn=fate_shared(signal.SIGKILL),  # SQLite survives a SIGKILL
                )
        except OSError as exc:
            raise TrackingError(f"cannot launch {executable}: {exc}") from exc
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not proc:  # stop() took it meanwhile (a supervisor's restart)
                raise TrackingError(f"{EXECUTABLE} was stopped while it started")
            self._exit_code = proc.poll()
            if self._exit_code is not None:
                self._proc = None
                return False
            if ping(self.uri, timeout_s=0.5):
                return True
            time.sleep(0.1)
        self.stop()
        raise TrackingError(
            f"{EXECUTABLE} did not answer on {self.uri} within {timeout_s:.0f} s; "
            f"see {self.log_file} and {self.out_file}"
        )

    def _clear_stale_pid_file(self) -> None:
        # nx-27017 refuses to start while its pid file names a live process, and after a
        # crash that PID may belong to an unrelated process by now. We only launch when no
        # server of ours answers, so the file is stale.
        with contextlib.suppress(OSError):
            self.pid_file.unlink()

    def _write_record(self) -> None:
        assert self._proc is not None
        record = {"pid": self._proc.pid, "port": self.port, "owner": os.getpid()}
        tmp = self.server_file.with_suffix(f".{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w") as out:
                out.write(json.dumps(record))
            os.replace(tmp, self.server_file)
        except OSError as exc:
            raise TrackingError(f"cannot write {self.server_file}: {exc}") from exc


def live_uri(data_dir: Path | str) -> str | None:
    """The URI of the server recorded for ``data_dir`` if its PID is alive and it answers."""
    record = read_server_record(data_dir)
    if record is None or not pid_alive(record["pid"]):
        return None
    uri = mongo_uri(record["port"])
    return uri if ping(uri) else None


def _private_folder(folder: Path) -> None:
    """``folder`` 0700, and the files an older version left in it 0600."""
    private_dir(folder)
    for path in folder.iterdir():
        with contextlib.suppress(OSError):
            if path.is_file() and path.stat().st_mode & 0o077:
                path.chmod(0o600)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600), "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def connect_or_start(
    data_dir: Path | str, timeout_s: float = START_TIMEOUT_S, *, own: bool = False,
    wait_s: float = HANDOVER_WAIT_S,
) -> tuple[str, EmbeddedMongo | None]:
    """The URI of the embedded server for ``data_dir``, starting one if none is live.

    A server recorded in ``server.json`` is reused when its PID is alive and it answers
    ``ping``; then the second item is None. Otherwise a new server is started (on the
    recorded port when that is free, so old clients find it again) and returned: the
    caller owns it and must ``stop()`` it.

    With ``own`` (`fedray run`) a live server is not reused while the process that started
    it lives, since that one stops it when it is done: this waits up to ``wait_s`` for it
    to go, then starts a server of its own. Only a server whose owner is gone (nobody
    will stop it) is reused.
    """
    folder = tracking_dir(data_dir)
    try:
        _private_folder(folder)
    except OSError as exc:
        raise TrackingError(f"cannot create tracking folder {folder}: {exc}") from exc
    deadline = time.monotonic() + wait_s
    while True:
        with _locked(folder / "server.lock"):
            uri = live_uri(data_dir)
            owner = _foreign_owner(data_dir) if uri is not None and own else None
            if owner is None:
                return (uri, None) if uri is not None else _start(data_dir, timeout_s)
        if time.monotonic() > deadline:  # the lock is free meanwhile: queries go on
            raise TrackingError(
                f"the embedded tracking server of {data_dir} belongs to another fedray "
                f"command (pid {owner}) that will stop it; let that command finish, then "
                "start the run again")
        time.sleep(0.2)


def _foreign_owner(data_dir: Path | str) -> int | None:
    """The PID of the live process that started the live server (and so will stop it);
    None when its owner is gone or unknown: nobody will stop that one, it may be reused."""
    record = read_server_record(data_dir)
    owner = record["owner"] if record is not None else None
    return owner if owner is not None and pid_alive(owner) else None


def _start(data_dir: Path | str, timeout_s: float) -> tuple[str, EmbeddedMongo]:
    """A new server, on the recorded port when that is free (called with the lock held)."""
    record = read_server_record(data_dir)
    port = record["port"] if record is not None and port_is_free(record["port"]) else None
    server = EmbeddedMongo(data_dir, port=port)
    try:
        server.start(timeout_s)
    except TrackingError:
        if port is None:
            raise
        server = EmbeddedMongo(data_dir).start(timeout_s)
    return server.uri, server
