"""A compute package's own Python environment: a venv built once per package and
requirement list, reused across sessions and client restarts, safe to share.

Layout under the package cache (``fedray.packages.run.default_cache_dir``)::

    envs/<key>/                  the venv (``python -m venv``, then pip install)
    envs/<key>/fedray-env.json   written last: the venv is complete and may be used
    envs/<key>.lock              held (flock) while a client checks or builds the venv
    envs/<key>.log               what venv and pip printed during the last build

``key`` is a sha256 over the package's identity (the sha256 of its archive, or the folder
of a local package), its requirement list and this interpreter (version and base
executable), so a new package, a changed requirement or another Python gets a new venv.
Clients sharing the cache wait for each other's build instead of racing it; a build that
died half-way (no ``fedray-env.json``) is removed and done again.

The venv does not see the client's site-packages (no ``--system-site-packages``): a
package runs with what it declares and nothing the site happened to install, so it runs
the same on every site, and the client's own dependencies (grpcio, fedray) never pin the
package's. pip uses the site's configuration (pip.conf, ``PIP_*`` variables) for indexes.
The client's own pip installs into the venv (``pip --python``), so the venv gets no pip
of its own (a package that needs one lists ``pip``); without a recent pip here, the venv
is made with one (ensurepip, some seconds more) and that installs.
Runs on edge machines: it must never import ray, pymongo or minio.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedray.errors import PythonEnvError

READY = "fedray-env.json"
BUILD_TIMEOUT_S = 1800.0  # venv plus pip install; a big framework can take minutes
RETRY_AFTER_S = 60.0  # a failed build is not tried again sooner (each try runs pip)
_HIDDEN_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")  # would leak the client's Python

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class PackageEnv:
    """A ready venv: ``built`` is False when an existing one was reused."""

    key: str
    path: Path
    built: bool
    seconds: float = 0.0

    @property
    def python(self) -> Path:
        return venv_python(self.path)

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` as a process running in this venv sees it (as after ``activate``)."""
        env = {k: v for k, v in base.items() if k not in _HIDDEN_ENV}
        scripts = str(self.python.parent)
        return env | {"VIRTUAL_ENV": str(self.path),
                      "PATH": os.pathsep.join(p for p in (scripts, base.get("PATH", "")) if p)}


def venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def env_key(package_id: str, requirements: Sequence[str]) -> str:
    """What a venv is for: the package, its requirements and this interpreter."""
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    spec = {"package": package_id, "requirements": list(requirements),
            "python": sys.version, "executable": base}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def ensure_env(package_id: str, requirements: Sequence[str], cache_dir: Path, *, label: str,
               cwd: Path, environ: Mapping[str, str], say: Say = lambda line: None,
               timeout_s: float = BUILD_TIMEOUT_S) -> PackageEnv:
    """The venv for ``requirements`` of package ``package_id``, built if it is not there.

    ``say`` hears what happens (building, built in N s, reused, waiting for another
    client); pip runs in ``cwd`` (the package folder) with ``environ``. A failure raises
    ``PythonEnvError`` whose first line says what pip said, and leaves no venv behind.
    """
    envs = Path(cache_dir) / "envs"
    envs.mkdir(parents=True, exist_ok=True)
    key = env_key(package_id, requirements)
    target = envs / key
    if (found := _ready(target, key)) is not None:
        say(_reused(label, key, found))
        return PackageEnv(key, target, built=False)
    with _locked(envs / f"{key}.lock", lambda: say(f"waiting: another client is building "
                                                   f"the python env of {label}")):
        if (found := _ready(target, key)) is not None:
            say(_reused(label, key, found))
            return PackageEnv(key, target, built=False)
        shown = ", ".join(requirements)
        say(f"building the python env of {label} ({len(requirements)} requirement(s)"
            f"{': ' + shown[:200] if shown else ''})")
        started = time.monotonic()
        log = envs / f"{key}.log"
        log.write_bytes(b"")
        shutil.rmtree(target, ignore_errors=True)  # a build that died half-way
        penv = PackageEnv(key, target, built=True)
        own_pip = _pip_can_target()
        try:
            _run([sys.executable, "-m", "venv", *(["--without-pip"] if own_pip else []),
                  str(target)], log, cwd, environ, timeout_s, f"python -m venv for {label}")
            listing = target / "fedray-requirements.txt"
            listing.write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")
            if requirements:
                pip = [sys.executable, "-m", "pip", "--python", str(penv.python)] if own_pip \
                    else [str(penv.python), "-m", "pip"]
                _run([*pip, "install", "--disable-pip-version-check", "--no-input",
                      "--progress-bar", "off", "-r", str(listing)], log, cwd,
                     penv.environ(environ), timeout_s - (time.monotonic() - started),
                     f"pip install for {label}")
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        seconds = time.monotonic() - started
        record = {"key": key, "package": package_id, "requirements": list(requirements),
                  "python": sys.version.split()[0], "seconds": round(seconds, 3),
                  "built_at": time.time()}
        (target / READY).write_text(json.dumps(record), encoding="utf-8")
        say(f"built the python env of {label} in {seconds:.1f}s ({key[:12]})")
        return PackageEnv(key, target, built=True, seconds=seconds)


def _pip_can_target() -> bool:
    """Whether this environment's pip can install into another interpreter (pip >= 22.3
    has ``--python``): then the venv is made without a pip of its own, in a fraction of
    a second instead of the seconds ensurepip takes."""
    try:
        major, minor = (int(p) for p in importlib.metadata.version("pip").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (22, 3)


def _ready(target: Path, key: str) -> dict | None:
    """The build record of a complete venv for ``key`` whose interpreter still runs."""
    try:
        record = json.loads((target / READY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    return record if os.access(venv_python(target), os.X_OK) else None


def _reused(label: str, key: str, record: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.get("built_at") or 0))
    return f"reusing the python env of {label} ({key[:12]}, built {when})"


@contextlib.contextmanager
def _locked(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (and threads: one open file each)."""
    with open(path, "a+b") as fh:
        if os.name == "nt":  # pragma: no cover - edge sites on Windows
            import msvcrt

            msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
            return
        import fcntl

        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(argv: list[str], log: Path, cwd: Path, environ: Mapping[str, str], timeout_s: float,
         what: str) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=dict(environ),
                                    start_new_session=True)
        except OSError as exc:
            raise PythonEnvError(f"{what}: cannot start {argv[0]!r} ({exc})") from None
        try:
            code = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise PythonEnvError(f"{what}: timed out after {timeout_s:g} s\n"
                                 f"(its output: {log})") from None
        except BaseException:
            _kill(proc)
            raise
    if code != 0:
        raise PythonEnvError(f"{what} failed: {_summary(log)}\n(its output: {log})")


def _summary(log: Path) -> str:
    """pip's last ``ERROR:`` line (what went wrong, in its words), else its last line."""
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("$ ")]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1][:300]


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()
