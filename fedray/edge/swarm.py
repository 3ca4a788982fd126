"""`fedray edge swarm`: many real edge clients from one command, to load-test a federation.

Each client is a real ``EdgeRunner`` (its own channel, identity, heartbeats and tasks),
and a process hosts its share of them as asyncio tasks on one event loop; ``--procs``
processes split the count. The parent starts the processes, shows how many clients are
connected and how many tasks are done, and on Ctrl-C or SIGTERM stops them all (each
child also stops when its parent is gone). Children report on stdout as JSON lines.

The code a client runs is ``--app MODULE[:OBJECT]``: an object with ``train`` (and
``validate``) shared by every client, or a factory ``OBJECT(data) -> (train, validate)``
called once per client with that client's ``--data`` (``{i}`` in it is the client's
index), like ``examples.digits.app:make_client_fns``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedray.edge.client import EdgeRunner, EdgeSettings
from fedray.edge.workers import CallbackWorker, Worker
from fedray.errors import ConfigError

REPORT_S = 1.0  # a child reports its counts this often
MAX_COUNT = 100_000
STOP_TIMEOUT_S = 20.0


def split(count: int, procs: int) -> list[tuple[int, int]]:
    """(first index, count) of each process: as even as it gets, none empty."""
    procs = max(1, min(procs, count))
    sizes = [count // procs + (1 if k < count % procs else 0) for k in range(procs)]
    out, first = [], 0
    for size in sizes:
        out.append((first, size))
        first += size
    return out


def client_name(prefix: str, index: int) -> str:
    return f"{prefix}{index:05d}"


def workers_for(app: str, data: str, first: int, count: int) -> list[Worker]:
    """One worker per client: the app's shared callbacks, or the factory's per client."""
    from fedray.edge.apps import load_target

    obj = load_target(app)
    if callable(getattr(obj, "train", None)):
        shared = CallbackWorker(obj.train, getattr(obj, "validate", None))
        return [shared] * count
    if not callable(obj):
        raise ConfigError(f"--app {app}: neither has train(params, config) nor is a factory "
                          "OBJECT(data) -> (train, validate)")
    workers = []
    for index in range(first, first + count):
        made = obj(data.replace("{i}", str(index)))
        train, validate = (made.train, getattr(made, "validate", None)) \
            if hasattr(made, "train") else made
        workers.append(CallbackWorker(train, validate))
    return workers


# ---------------------------------------------------------------------- a child process


def child_main(spec: dict[str, Any]) -> int:
    """Host ``spec["count"]`` clients on one event loop until SIGTERM (or the parent goes)."""
    first, count = int(spec["first"]), int(spec["count"])
    workers = workers_for(spec["app"], spec.get("data", ""), first, count)
    token = os.environ.get(spec.get("token_env") or "FEDRAY_TOKEN") or None
    errors: list[str] = []

    def say(line: str) -> None:
        if spec.get("verbose") or "refused" in line or "error" in line.lower():
            print(line, file=sys.stderr, flush=True)

    runners = [EdgeRunner(worker, EdgeSettings(
        gateway=spec["gateway"], name=client_name(spec["prefix"], i), token=token,
        attrs=dict(spec.get("attrs") or {}), heartbeat_s=float(spec["heartbeat_s"])), say=say)
        for i, worker in zip(range(first, first + count), workers, strict=True)]

    def report(**fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        parent = os.getppid()
        tasks = [asyncio.ensure_future(r.run()) for r in runners]
        while not stop.is_set() and not all(t.done() for t in tasks):
            report(connected=sum(r.joined for r in runners),
                   tasks=sum(r.tasks_done for r in runners))
            if os.getppid() != parent:
                break  # the swarm command is gone: so are we
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REPORT_S)
        for r in runners:
            r.stop.set()
        for r, result in zip(runners, await asyncio.gather(*tasks, return_exceptions=True),
                             strict=True):
            if isinstance(result, BaseException):
                errors.append(f"{r.settings.name}: {type(result).__name__}: {result}")

    asyncio.run(serve())
    for line in errors[:5]:
        print(line, file=sys.stderr, flush=True)
    report(exit=True, connected=0, tasks=sum(r.tasks_done for r in runners), errors=len(errors))
    return 1 if errors else 0


# ---------------------------------------------------------------------- the parent


@dataclass
class Counts:
    connected: dict[int, int] = field(default_factory=dict)
    tasks: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    exited: set[int] = field(default_factory=set)

    @property
    def total_connected(self) -> int:
        return sum(self.connected.values())

    @property
    def total_tasks(self) -> int:
        return sum(self.tasks.values())


class Swarm:
    """The child processes and what they report."""

    def __init__(self, spec: dict[str, Any], count: int, procs: int) -> None:
        self.spec = spec
        self.parts = split(count, procs)
        self.count = count
        self.counts = Counts()
        self.procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for k, (first, size) in enumerate(self.parts):
            spec = json.dumps({**self.spec, "first": first, "count": size})
            proc = subprocess.Popen([sys.executable, "-m", "fedray.edge.swarm", spec],
                                    stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
            self.procs.append(proc)
            reader = threading.Thread(target=self._read, args=(k, proc), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, k: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            with self._lock:
                self.counts.connected[k] = int(msg.get("connected", 0))
                self.counts.tasks[k] = int(msg.get("tasks", 0))
                if msg.get("exit"):
                    self.counts.errors += int(msg.get("errors", 0))
                    self.counts.exited.add(k)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)

    def watch(self, show: Callable[[Counts], None], interval: float = 0.5) -> None:
        """Call ``show`` with the counts until every child has exited."""
        while self.running():
            with self._lock:
                show(self.counts)
            time.sleep(interval)  # the children report once a second; a display refresh
        with self._lock:
            show(self.counts)


if __name__ == "__main__":
    sys.exit(child_main(json.loads(sys.argv[1])))
