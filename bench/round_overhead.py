#!/usr/bin/env python
"""Round overhead of a real federation: N edge clients over the gRPC bridge, P parameters.

    python bench/round_overhead.py --clients N --params P --rounds R [--combiners K] [--procs M]

The federation is deployed exactly like ``fedray run`` does it (``run_federation``: a private
local Ray, the embedded nx-27017 tracking server, ``Federation.deploy``), with K combiners
on 127.0.0.1. The N clients are real ``EdgeRunner``s (asyncio, many per process) spread over
M worker processes, each started as ``python bench/round_overhead.py --worker ...``.
"Training" adds small deterministic noise (seeded by client index and round) to every
parameter and reports 100 examples, so the figures are the runtime's own overhead.

Exactly one JSON line goes to stdout; everything else (progress, logs) goes to stderr.
The exit status is non-zero when the session did not finish. See bench/README.md.
"""

from __future__ import annotations

import time

T0 = time.time()  # "start of the bench": before the heavy imports (Ray, grpc, numpy)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

TENSORS = 4
EXAMPLES = 100
NOISE = 1e-3  # noise amplitude: uniform in [-NOISE, +NOISE)
LOAD_AT_START = round(os.getloadavg()[0], 2)
SAMPLE_S = 0.2  # how often /proc/<pid>/status is read for VmHWM


def log(msg: str) -> None:
    print(f"[bench {time.time() - T0:7.2f}s] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int | str = "self") -> float | None:
    """utime + stime of a process (all its threads) in seconds, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssShmem of a process in MiB ({} when it is gone)."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in {"VmRSS", "VmHWM", "RssAnon", "RssShmem"}:
                    out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        return {}
    return out


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """VmHWM (peak resident set size) of a process in MiB, or None when it is gone."""
    return memory_mb(pid).get("VmHWM")


# --------------------------------------------------------------------------- worker side


class BenchDropout(RuntimeError):
    """Raised by the train callback of a client that ``--drop`` makes drop every round."""


def make_train(index: int, drops: bool = False):
    """A client's train callback: params + noise seeded by (client index, round). A client
    that ``drops`` fails every train task: under secagg it has shared its keys by then, so
    the round pays for unmasking it (the costly dropout)."""
    rounds = 0

    def train(params: dict[str, np.ndarray], config: dict[str, Any]):
        nonlocal rounds
        rounds += 1  # every client trains every round (clients_per_round 1.0, min_clients N)
        if drops:
            raise BenchDropout(f"client {index} drops out of round {rounds} (--drop)")
        rng = np.random.default_rng([index, rounds])
        for arr in params.values():
            flat = arr.reshape(-1)
            noise = rng.random(flat.size, dtype=np.float32)
            noise -= 0.5
            noise *= 2 * NOISE
            flat += noise
        return params, EXAMPLES, {"loss": 1.0 / rounds}

    return train


def worker_main(args: argparse.Namespace) -> int:
    """Host ``--count`` edge clients (indices from ``--first``) in one asyncio loop."""
    from fedray.edge.client import EdgeRunner, EdgeSettings
    from fedray.edge.tasks import TaskRunner
    from fedray.edge.workers import CallbackWorker

    first_task: list[float] = []

    def report(**fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    timings: dict[str, list[float]] = {"fetch": [], "train": [], "task": [], "heartbeat": []}

    class TimedWorker(CallbackWorker):
        def train(self, model, config):  # noqa: ANN001 - Worker protocol
            started = time.perf_counter()
            try:
                return super().train(model, config)
            finally:
                timings["train"].append(time.perf_counter() - started)

    class TimedStub:
        """Times Heartbeat RPCs (round trip as the client sees it); passes the rest on."""

        def __init__(self, stub) -> None:  # noqa: ANN001
            self._stub = stub

        def __getattr__(self, name: str) -> Any:
            return getattr(self._stub, name)

        async def Heartbeat(self, *a: Any, **kw: Any) -> Any:  # noqa: N802 - gRPC's name
            started = time.perf_counter()
            try:
                return await self._stub.Heartbeat(*a, **kw)
            finally:
                timings["heartbeat"].append(time.perf_counter() - started)

    class TimedTasks(TaskRunner):
        """Times each task (received -> update acknowledged) and each model download."""

        async def handle(self, link, task):  # noqa: ANN001 - TaskRunner's own signature
            if not first_task:
                first_task.append(time.time())
                report(first_task=first_task[0], name=self.settings.name,
                       idle_rss_mb=memory_mb().get("VmRSS"), idle_cpu_s=cpu_seconds())
            started = time.perf_counter()
            await super().handle(link, task)
            timings["task"].append(time.perf_counter() - started)

        async def _fetch(self, link, model_id, size=0, task=None):  # noqa: ANN001
            started = time.perf_counter()
            try:
                return await super()._fetch(link, model_id, size, task)
            finally:
                timings["fetch"].append(time.perf_counter() - started)

    class BenchRunner(EdgeRunner):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.tasks = TimedTasks(self.worker, self.settings, self._line, self.say)

        async def _heartbeats(self, stub, stream):  # noqa: ANN001
            return await super()._heartbeats(TimedStub(stub), stream)

    def say(line: str) -> None:
        routine = line.endswith("-> update accepted") or "] connected to " in line
        if not (args.quiet and routine):
            print(line, file=sys.stderr, flush=True)

    token = os.environ.get("FEDRAY_TOKEN") or None
    runners = [
        BenchRunner(TimedWorker(make_train(i, drops=i < args.drop_count)),
                    EdgeSettings(gateway=args.gateway, name=f"client-{i:05d}", token=token),
                    say=say)
        for i in range(args.first, args.first + args.count)
    ]

    async def serve() -> list[Any]:
        loop = asyncio.get_running_loop()

        def stop_all() -> None:
            for r in runners:
                r.stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_all)
        parent = os.getppid()

        async def orphan_guard() -> None:  # stop if the bench driver died
            while not all(r.stop.is_set() for r in runners):
                if os.getppid() != parent:
                    stop_all()
                await asyncio.sleep(2.0)

        guard = asyncio.ensure_future(orphan_guard())
        try:
            return await asyncio.gather(*(r.run() for r in runners), return_exceptions=True)
        finally:
            guard.cancel()

    results = asyncio.run(serve())
    errors = [f"{r.settings.name}: {type(e).__name__}: {e}"
              for r, e in zip(runners, results, strict=True) if isinstance(e, BaseException)]
    for line in errors[:5]:
        print(line, file=sys.stderr)
    report(exit=True, tasks=sum(r.tasks_done for r in runners), errors=len(errors),
           peak_rss_mb=peak_rss_mb(), cpu_s=round(cpu_seconds() or 0.0, 2), timings=timings)
    return 1 if errors else 0


# --------------------------------------------------------------------------- driver side


def write_seed(data_dir: Path, params: int) -> tuple[Path, int]:
    """P float32 parameters over up to TENSORS 1-D tensors, as a .safetensors file."""
    from fedray.serialization import encode

    parts = min(TENSORS, params)
    sizes = [params // parts + (1 if k < params % parts else 0) for k in range(parts)]
    rng = np.random.default_rng(0)
    model = {f"layer{k}.weight": rng.standard_normal(n, dtype=np.float32) * 0.01
             for k, n in enumerate(sizes)}
    data = encode(model)
    path = data_dir / "seed.safetensors"
    path.write_bytes(data)
    return path, len(data)


def bench_config(args: argparse.Namespace, data_dir: Path, seed: Path) -> dict[str, Any]:
    return {
        "federation": "bench",
        "seed_model": str(seed),
        "data_dir": str(data_dir),
        "ray": {"address": "local", "num_cpus": 2},
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": args.combiners, "host": "127.0.0.1", "base_port": 0},
        "session": {"rounds": args.rounds, "aggregator": args.aggregator,
                    "clients_per_round": 1.0,
                    "min_clients": args.clients, "min_updates": args.clients - dropped(args),
                    "round_timeout_s": args.round_timeout,
                    "wait_for_clients_s": args.round_timeout, "validate": False,
                    **({"secagg": secagg_options(args)} if args.aggregator == "secagg" else {})},
    }


def dropped(args: argparse.Namespace) -> int:
    """How many clients (the first ones) fail every train task under ``--drop F``."""
    return round(args.drop * args.clients)


def secagg_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--secagg clip=1.0 dropout=0.1``: session.secagg (clip 1.0 by default; the noise
    "training" moves P parameters by ~NOISE/sqrt(3) each, ||delta|| ~ 0.58 at P = 1M)."""
    options: dict[str, Any] = {"clip": 1.0, "stage_timeout_s": args.round_timeout}
    if args.drop:  # the masks must survive the drops asked for
        options["dropout"] = max(0.1, args.drop)
    for item in args.secagg:
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)
    return options


class Workers:
    """The client worker processes, and what they report on stdout."""

    def __init__(self, args: argparse.Namespace, logs: Path) -> None:
        self.args = args
        self.logs = logs
        self.procs: list[subprocess.Popen] = []
        self.first_task: list[float] = []
        self.exits: dict[int, dict[str, Any]] = {}
        self.idle_rss: dict[int, float] = {}  # per process: VmRSS when its first task came
        self.idle_cpu: dict[int, float] = {}  # per process: CPU seconds at its first task
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []

    def start(self, gateway: str) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        n, m = self.args.clients, min(self.args.procs, self.args.clients)
        counts = [n // m + (1 if k < n % m else 0) for k in range(m)]
        first = 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for k, count in enumerate(counts):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--gateway", gateway,
                   "--first", str(first), "--count", str(count), "--params", str(self.args.params),
                   "--drop-count", str(dropped(self.args))]
            if not self.args.client_logs:
                cmd.append("--quiet")
            with open(self.logs / f"worker-{k}.log", "wb") as err:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env,
                                        stdin=subprocess.DEVNULL)
            self.procs.append(proc)
            reader = threading.Thread(target=self._read, args=(k, proc), daemon=True)
            reader.start()
            self._readers.append(reader)
            first += count
        log(f"started {len(self.procs)} worker process(es) with {counts} clients "
            f"(pids {[p.pid for p in self.procs]})")

    def _read(self, k: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            with self._lock:
                if "first_task" in msg:
                    self.first_task.append(float(msg["first_task"]))
                    if msg.get("idle_rss_mb") is not None:
                        self.idle_rss.setdefault(k, float(msg["idle_rss_mb"]))
                    if msg.get("idle_cpu_s") is not None:
                        self.idle_cpu.setdefault(k, float(msg["idle_cpu_s"]))
                if msg.get("exit"):
                    self.exits[k] = msg

    def stop(self, timeout: float = 20.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"worker {proc.pid} ignored SIGTERM; killing it")
                proc.kill()
                proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)

    def tails(self, lines: int = 15) -> str:
        """The first lines of each worker's log: the first trouble, not the teardown noise."""
        out = []
        for path in sorted(self.logs.glob("worker-*.log")):
            text = path.read_text(errors="replace").splitlines()
            out.append(f"--- {path.name} (first {min(lines, len(text))} of {len(text)} lines)\n"
                       + "\n".join(text[:lines]))
        return "\n".join(out)


def over_idle_models(sampler: PeakSampler, model_bytes: int) -> dict[str, float]:
    """(own-memory peak - own memory at ready) / model size, per actor: issue 16's memory
    bounds are idle + 3 models (4 for a 400 MB model)."""
    model_mib = model_bytes / 2**20
    return {name: round((peak - sampler.idle[name]) / model_mib, 2)
            for name, peak in sorted(sampler.private_peaks.items()) if name in sampler.idle}


class PeakSampler:
    """Samples VmHWM of the federation's actor processes until stopped (VmHWM only grows,
    so the last sample before teardown is the peak of the whole run)."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.peaks: dict[str, float] = {}
        self.private_peaks: dict[str, float] = {}  # max of VmRSS - RssShmem over the samples
        self.idle: dict[str, float] = {}  # VmRSS - RssShmem when the federation is ready
        self.cpu_start: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds since start(), at the last sample
        self.after_round: dict[int, dict[str, dict[str, float]]] = {}  # round -> name -> MiB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, names: set[str]) -> None:
        import ray._private.state as ray_state  # the GCS actor table; no dashboard needed

        for entry in ray_state.actors().values():
            if entry.get("State") == "ALIVE" and entry.get("Name") in names:
                self.pids[entry["Name"]] = int(entry["Pid"])
        log(f"actor pids: {self.pids}")
        self.ray_pids = ray_process_pids()
        for name, pid in self.pids.items():
            self.cpu_start[name] = cpu_seconds(pid) or 0.0
            if mem := memory_mb(pid):
                self.idle[name] = round(mem["VmRSS"] - mem["RssShmem"], 1)
        self._sample()
        self._thread.start()

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            mem = memory_mb(pid)
            if mem:
                self.peaks[name] = max(mem["VmHWM"], self.peaks.get(name, 0.0))
                private = round(mem["VmRSS"] - mem["RssShmem"], 1)
                self.private_peaks[name] = max(private, self.private_peaks.get(name, 0.0))
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self.cpu[name] = round(cpu - self.cpu_start[name], 2)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def current(self, after_round: int) -> None:
        """Record each actor's current memory (VmRSS: what it holds now, not its peak),
        and what the object store holds."""
        sample: dict[str, dict[str, float]] = {
            name: {"rss": m["VmRSS"], "anon": m["RssAnon"], "shmem": m["RssShmem"]}
            for name, pid in self.pids.items() if (m := memory_mb(pid))}
        sample["object_store"] = object_store_use()
        for name, pid in self.ray_pids.items():  # Ray's own processes (task metadata...)
            if m := memory_mb(pid):
                sample[name] = {"rss": m["VmRSS"], "anon": m["RssAnon"]}
        self.after_round[after_round] = sample
        log(f"after round {after_round}: " + ", ".join(
            f"{n} {m['rss']:.0f} MiB (anon {m['anon']:.0f})"
            for n, m in sorted(sample.items()) if n in self.pids)
            + f"; object store {sample['object_store']}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


PEAK_STEP = 16 * 2**20  # a new snapshot at the traced peak each time it grows by this


def _trace_start(actor: Any) -> None:
    """Start tracemalloc, and a thread that snapshots what is live at each new traced peak
    (the snapshot says what the peak was made of; the growth alone says only what stayed)."""
    import threading
    import tracemalloc

    tracemalloc.start(8)
    actor._bench_trace = tracemalloc.take_snapshot()
    actor._bench_peak = (0, None)

    def watch() -> None:
        while True:
            current, _ = tracemalloc.get_traced_memory()
            if current > actor._bench_peak[0] + PEAK_STEP:
                actor._bench_peak = (current, tracemalloc.take_snapshot())
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True, name="bench-peak").start()


def _stat_lines(stats: list[Any], top: int) -> list[str]:
    lines = []
    for stat in stats[:top]:
        frames = " <- ".join(f"{f.filename.rpartition('/site-packages/')[2]}:{f.lineno}"
                             for f in list(stat.traceback)[::-1][:5])  # newest first
        lines.append(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+6d} blocks  {frames}")
    return lines


def _trace_diff(actor: Any, top: int = 12) -> list[str]:
    import tracemalloc

    now = tracemalloc.take_snapshot()
    # Not tracemalloc.stop(): on Python < 3.12 it races numpy's allocation tracking in
    # threads that do not hold the GIL and can crash the actor (cpython gh-128679).
    lines = _stat_lines(now.compare_to(actor._bench_trace, "traceback"), top)
    peak, snapshot = actor._bench_peak
    if snapshot is not None:
        lines.append(f"at the traced peak ({peak / 2**20:.1f} MiB live), over the start:")
        lines += _stat_lines(snapshot.compare_to(actor._bench_trace, "traceback"), top)
    return lines


def trace_actors(names: set[str], namespace: str, start: bool) -> None:
    """tracemalloc inside each actor (through ``__ray_call__``): start it, or log the top
    allocation growth since it was started."""
    import ray

    for name in sorted(names):
        handle = ray.get_actor(name, namespace=namespace)
        if start:
            ray.get(handle.__ray_call__.remote(_trace_start))
        else:
            lines = ray.get(handle.__ray_call__.remote(_trace_diff))
            log(f"tracemalloc {name}, growth since it started:\n    " + "\n    ".join(lines))


def ray_process_pids() -> dict[str, int]:
    """PIDs of the local Ray node's own processes this driver started (GCS, raylet)."""
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    found: dict[str, int] = {}
    for kind in ("gcs_server", "raylet"):
        for info in (getattr(node, "all_processes", None) or {}).get(kind, []):
            found[kind] = info.process.pid
    return found


def object_store_use() -> dict[str, float]:
    """MiB and number of objects in the local object store (the raylet's own figures)."""
    import ray._private.internal_api as internal
    import ray._private.state as ray_state

    try:
        stats = internal.get_memory_info_reply(ray_state.state, timeout_seconds=5).store_stats
    except Exception as exc:  # noqa: BLE001 - a figure, never a reason to fail the bench
        log(f"object store stats unavailable: {exc}")
        return {}
    return {"mb": round(stats.object_store_bytes_used / 2**20, 1),
            "objects": stats.num_local_objects}


def read_rounds(data_dir: Path, database: str, session_id: str) -> list[dict[str, Any]]:
    """The session's round documents, from the embedded tracking data the run left behind."""
    from fedray.tracking.embedded import EmbeddedMongo
    from fedray.tracking.store import TrackingStore

    with EmbeddedMongo(data_dir) as server:
        store = TrackingStore.from_uri(server.uri, database)
        try:
            return store.find("rounds", {"session_id": session_id}, sort=[("round", 1)])
        finally:
            store.close()


def bench_main(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.pop("FEDRAY_DATA_DIR", None)  # it would override the bench's own data dir
    os.environ["FEDRAY_TOKEN"] = secrets.token_hex(16)  # exercise token auth on every RPC

    from rich.console import Console

    from fedray.deploy.config_file import config_from_dict
    from fedray.deploy.federation import CONTROLLER, combiner_name
    from fedray.deploy.runner import run_federation

    data_dir = Path(args.data_dir).resolve() if args.data_dir else \
        Path(tempfile.mkdtemp(prefix="fedray-bench-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    seed, model_bytes = write_seed(data_dir, args.params)
    config = config_from_dict(bench_config(args, data_dir, seed), source="bench/round_overhead.py")
    console = Console(stderr=True, width=120)
    workers = Workers(args, data_dir / "logs")
    sampler = PeakSampler()
    ready_at: list[float] = []
    sample_at = rss_rounds(args)
    log(f"{args.clients} clients x {args.params:,} params ({model_bytes / 2**20:.1f} MiB model), "
        f"{args.rounds} rounds, {args.combiners} combiner(s), {args.procs} worker process(es); "
        f"data in {data_dir}")

    def on_ready(gateway: str) -> None:
        ready_at.append(time.time())
        sampler.start({CONTROLLER, *(combiner_name(i) for i in range(args.combiners))})
        workers.start(gateway)

    traced = [int(r) for r in args.tracemalloc.split(",")] if args.tracemalloc else []
    actors = {CONTROLLER, *(combiner_name(i) for i in range(args.combiners))}

    def on_status(status: dict[str, Any]) -> None:
        # The first status at or past each asked round (watch coalesces fast changes), once
        # the round is done (in the history): committed, and its temporaries released.
        done = status["history"][-1]["round"] if status["history"] else 0
        while sample_at and done >= sample_at[0]:
            sampler.current(sample_at.pop(0))
        while traced and done >= traced[0]:
            trace_actors(actors, config.namespace, start=len(traced) == 2)
            traced.pop(0)

    out: dict[str, Any] = {
        "aggregator": args.aggregator,
        **({"secagg": secagg_options(args)} if args.aggregator == "secagg" else {}),
        "clients": args.clients, "params": args.params, "rounds": args.rounds,
        "combiners": args.combiners, "procs": min(args.procs, args.clients),
        "model_bytes": model_bytes,
    }
    status: dict[str, Any] = {}
    try:
        try:
            result = run_federation(config, console=console, on_ready=on_ready,
                                    on_status=on_status)
            status = result.status
        finally:
            sampler.stop()
            workers.stop()
        total_s = time.time() - T0
        rounds = read_rounds(data_dir, config.tracking.database, status["session_id"])
    except Exception as exc:  # noqa: BLE001 - report it in the JSON line, then fail
        traceback.print_exc()
        out.update(state="error", reason=f"{type(exc).__name__}: {exc}")
        print(workers.tails(), file=sys.stderr)
        print(json.dumps(out))
        cleanup(args, data_dir)
        return 2

    round_s = [round(r["seconds"], 3) for r in status["history"]]
    by_round = {r["round"]: r for r in rounds}
    bytes_per_round, stage_bytes_per_round, reduce_s = [], [], []
    for record in status["history"]:
        doc = by_round.get(record["round"], {})
        combiners = doc.get("combiners") or {}
        bytes_per_round.append(sum(int(c.get("bytes_in", 0)) + int(c.get("bytes_out", 0))
                                   for c in combiners.values()))
        if doc.get("reduce_s") is not None:
            reduce_s.append(float(doc["reduce_s"]))
        stages = doc.get("stages") or {}  # secagg's key stages (rounds.stages)
        stage_bytes_per_round.append(sum(int(t.get("bytes_in", 0)) + int(t.get("bytes_out", 0))
                                         for t in stages.values()))
    first_doc = rounds[0] if rounds else {}
    clients_asked = {name: c.get("asked") for name, c in
                     sorted((first_doc.get("combiners") or {}).items())}
    lost = sum(int(c.get("failed", 0)) + int(c.get("rejected", 0))
               for doc in rounds for c in (doc.get("combiners") or {}).values())
    exits = [workers.exits.get(k, {}) for k in range(len(workers.procs))]
    out.update(
        startup_s=round(min(workers.first_task) - T0, 3) if workers.first_task else None,
        ready_s=round(ready_at[0] - T0, 3) if ready_at else None,
        round_s=round_s,
        median_round_s=round(statistics.median(round_s), 3) if round_s else None,
        bytes_per_round=bytes_per_round,
        stage_bytes_per_round=stage_bytes_per_round,
        stage_s=stage_seconds(rounds),
        median_reduce_s=round(statistics.median(reduce_s), 3) if reduce_s else None,
        dropped_per_round=dropped(args),
        expected_bytes_per_round=2 * args.clients * model_bytes,
        clients_asked=clients_asked,
        updates_failed_or_rejected=lost,
        peak_rss_mb={n: v for n, v in sorted(sampler.peaks.items()) if n != CONTROLLER},
        controller_peak_rss_mb=sampler.peaks.get(CONTROLLER),
        peak_private_rss_mb=dict(sorted(sampler.private_peaks.items())),
        idle_private_rss_mb=dict(sorted(sampler.idle.items())),
        over_idle_models=over_idle_models(sampler, model_bytes),
        rss_after_round_mb={str(k): v for k, v in sorted(sampler.after_round.items())},
        client_proc_peak_rss_mb=[e.get("peak_rss_mb") for e in exits],
        client_proc_idle_rss_mb=[workers.idle_rss.get(k) for k in range(len(workers.procs))],
        client_tasks=sum(int(e.get("tasks", 0)) for e in exits),
        actor_cpu_s=dict(sorted(sampler.cpu.items())),
        client_timings_s=summarize_timings(exits),
        client_proc_cpu_s=[e.get("cpu_s") for e in exits],
        client_cpu_s_per_round=client_cpu_per_round(workers, exits, args),
        total_s=round(total_s, 2),
        loadavg_1m=[LOAD_AT_START, round(os.getloadavg()[0], 2)],  # others' work skews times
        state=status["state"],
        reason=status.get("reason", ""),
        rounds_done=status["rounds_done"],
    )
    ok = status["state"] == "finished"
    if not ok:
        print(workers.tails(), file=sys.stderr)
    print(json.dumps(out))
    cleanup(args, data_dir)
    return 0 if ok else 1


def stage_seconds(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds of each non-train stage over the rounds (rounds.stages)."""
    seconds: dict[str, list[float]] = {}
    for doc in rounds:
        for name, traffic in (doc.get("stages") or {}).items():
            seconds.setdefault(name, []).append(float(traffic.get("seconds", 0.0)))
    return {name: round(statistics.median(v), 3) for name, v in sorted(seconds.items())}


def client_cpu_per_round(workers: Workers, exits: list[dict[str, Any]],
                         args: argparse.Namespace) -> float | None:
    """CPU seconds one client spends per round: the worker processes' CPU from their
    first task to their exit, over clients x rounds (imports and connecting excluded)."""
    spent = [e["cpu_s"] - workers.idle_cpu[k] for k, e in enumerate(exits)
             if e.get("cpu_s") is not None and k in workers.idle_cpu]
    if not spent or not args.rounds:
        return None
    return round(sum(spent) / (args.clients * args.rounds), 4)


def summarize_timings(exits: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median and max, over all clients, of per-task fetch/train/task and heartbeat seconds."""
    merged: dict[str, list[float]] = {}
    for e in exits:
        for key, values in (e.get("timings") or {}).items():
            merged.setdefault(key, []).extend(values)
    return {key: {"median": round(statistics.median(v), 4), "max": round(max(v), 4)}
            for key, v in merged.items() if v}


def rss_rounds(args: argparse.Namespace) -> list[int]:
    """The rounds after which each actor's current memory is sampled, in order."""
    rounds = {int(r) for r in args.rss_at.split(",") if r.strip()} if args.rss_at else set()
    if args.rss_every:
        rounds.update(range(args.rss_every, args.rounds + 1, args.rss_every))
    return sorted(r for r in rounds if 1 <= r <= args.rounds)


def cleanup(args: argparse.Namespace, data_dir: Path) -> None:
    if args.keep or args.data_dir:
        log(f"kept {data_dir}")
    else:
        shutil.rmtree(data_dir, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="edge clients (N)")
    p.add_argument("--params", type=int, default=100_000, help="float32 parameters (P)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (R)")
    p.add_argument("--combiners", type=int, default=2, help="combiner actors (K)")
    p.add_argument("--aggregator", default="fedavg", choices=("fedavg", "secagg"),
                   help="the session's strategy (secagg: SecAgg+ over the same workload)")
    p.add_argument("--secagg", nargs="*", default=[], metavar="KEY=VALUE",
                   help="session.secagg options (clip=1.0 by default)")
    p.add_argument("--drop", type=float, default=0.0, metavar="F",
                   help="this fraction of the clients fails every train task (a dropout "
                        "after secagg's key stages); the rounds commit without them")
    p.add_argument("--procs", type=int, default=1, help="client worker processes (M)")
    p.add_argument("--round-timeout", type=float, default=600.0,
                   help="session.round_timeout_s and wait_for_clients_s")
    p.add_argument("--data-dir", default=None, help="keep everything here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp data dir")
    p.add_argument("--rss-every", type=int, default=0, metavar="K",
                   help="sample each actor's current RSS after every K-th round")
    p.add_argument("--rss-at", default="", metavar="R1,R2,...",
                   help="sample each actor's current RSS after these rounds")
    p.add_argument("--tracemalloc", default="", metavar="A,B",
                   help="trace allocations inside each actor from round A to round B and "
                        "log the largest growth (tracing stays on until teardown)")
    p.add_argument("--client-logs", action="store_true",
                   help="let clients log every task to <data_dir>/logs/worker-*.log")
    # worker entry (started by the driver, not by hand)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gateway", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--drop-count", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("clients", "params", "rounds", "combiners", "procs", "count"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if not 0 <= args.drop < 1:
        p.error("--drop is a fraction in [0, 1)")
    if args.tracemalloc and len(args.tracemalloc.split(",")) != 2:
        p.error("--tracemalloc needs two rounds, A,B")
    if args.worker and not args.gateway:
        p.error("--worker needs --gateway")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return worker_main(args) if args.worker else bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
