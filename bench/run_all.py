#!/usr/bin/env python
"""Rerun every performance figure of docs/performance.md: one JSON line per workload.

    python bench/run_all.py [--only NAME ...] [--runs N] [--out FILE] [--quick] [--list]

Each workload runs as its own subprocess (``bench/raw_grpc.py`` or
``bench/round_overhead.py``), ``--runs`` times (default 3), each time under a timeout; its
line carries the medians over the runs and every run's own figures. A workload that fails
or times out writes a line with ``"error"`` and the others still run. Lines go to stdout
and are appended to ``--out`` (default bench/results.jsonl; bench/results-quick.jsonl with
``--quick``, which runs a tiny version of every workload as a smoke test). Each run's
stderr is kept in bench/logs/. bench/plot_performance.py draws the file; for each workload
it takes the last line. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FLOWER_PIP = 'pip install "flwr[simulation]==1.42.0"'
STOP_GRACE_S = 60.0  # after SIGINT, time for a bench to tear its federation down


@dataclass(frozen=True)
class Workload:
    """One figure: a bench script, its flags, and a tiny version of them for ``--quick``."""

    name: str
    script: str  # a file in bench/, or "" for a workload that cannot run here
    argv: tuple[str, ...]
    quick: tuple[str, ...]
    timeout_s: float  # per run
    groups: tuple[str, ...] = ()  # the plots it belongs to: clients, size
    note: str = ""
    skip: str = field(default="", compare=False)


def fedavg(clients: int, params: int, *, rounds: int = 3, procs: int = 2, combiners: int = 2,
           quick: tuple[int, int], timeout_s: float, groups: tuple[str, ...],
           round_timeout_s: int = 0, note: str = "") -> Workload:
    slow = ("--round-timeout", str(round_timeout_s)) if round_timeout_s else ()

    def flags(n: int, p: int, r: int, m: int, *extra: str) -> tuple[str, ...]:
        return ("--clients", str(n), "--params", str(p), "--rounds", str(r),
                "--procs", str(min(m, n)), "--combiners", str(combiners), *extra)

    label = f"{params / 1e6:g}M" if params >= 1_000_000 else f"{params // 1000}k"
    return Workload(f"fedavg_{clients}x{label}", "round_overhead.py",
                    flags(clients, params, rounds, procs, *slow),
                    flags(quick[0], quick[1], 2, min(procs, 2)), timeout_s, groups, note)


WORKLOADS: list[Workload] = [
    Workload("raw_grpc_4x100MB", "raw_grpc.py", ("--clients", "4", "--mb", "100", "--repeat", "3"),
             ("--clients", "2", "--mb", "4", "--repeat", "3"), 300, ("ceiling",),
             "plain grpcio on loopback: the transport ceiling"),
    fedavg(4, 25_000_000, procs=4, quick=(2, 100_000), timeout_s=900, groups=("clients", "size")),
    fedavg(100, 1_000_000, rounds=5, quick=(10, 10_000), timeout_s=900, groups=("clients",)),
    fedavg(500, 100_000, quick=(20, 1_000), timeout_s=900, groups=("clients",)),
    fedavg(1_000, 10_000, quick=(30, 1_000), timeout_s=1200, groups=("clients",),
           note="2 combiners"),
    fedavg(3_000, 10_000, procs=4, quick=(40, 1_000), timeout_s=2400, groups=("clients",),
           round_timeout_s=1200),
    fedavg(10_000, 10_000, procs=4, quick=(50, 1_000), timeout_s=5400, groups=("clients",),
           round_timeout_s=1800),
    fedavg(4, 100_000_000, procs=4, quick=(2, 200_000), timeout_s=1800, groups=("size",),
           note="memory sweep"),
    fedavg(2, 250_000_000, procs=2, quick=(2, 500_000), timeout_s=1800, groups=("size",),
           note="memory sweep"),
    Workload("flower_4x25M", "", (), (), 0, ("compare",),
             "Flower's deployment engine, 4 clients x 100 MB"),
    Workload("flower_sim_100x1M", "flower_sim.py",
             ("--clients", "100", "--params", "1000000", "--rounds", "5"),
             ("--clients", "10", "--params", "10000", "--rounds", "2"), 900, ("compare",),
             "Flower's Ray simulation, 100 clients x 4 MB (against fedavg_100x1M)"),
    Workload("flower_sim_500x100k", "flower_sim.py",
             ("--clients", "500", "--params", "100000", "--rounds", "3"),
             ("--clients", "20", "--params", "1000", "--rounds", "2"), 900, ("compare",),
             "Flower's Ray simulation, 500 clients x 400 kB (against fedavg_500x100k)"),
]
FLOWER_ENV = "FEDRAY_FLOWER_PYTHON"  # the python of a venv with Flower (it pins its own Ray)


def flower_python() -> str | None:
    """The interpreter that runs flower_sim.py: $FEDRAY_FLOWER_PYTHON, or this one when it
    has Flower; None when neither does."""
    chosen = os.environ.get(FLOWER_ENV)
    if chosen:
        return chosen if Path(chosen).exists() else None
    return sys.executable if importlib.util.find_spec("flwr") is not None else None


def flower_skip(w: Workload | None = None) -> str:
    """Why a Flower workload cannot run here ("" when it can)."""
    if w is not None and w.script and flower_python() is not None:
        return ""
    if w is not None and not w.script:
        return "no bench in bench/ drives Flower's deployment engine yet"
    return (f"Flower is not installed: python3 -m venv /tmp/flower && /tmp/flower/bin/"
            f"{FLOWER_PIP}, then {FLOWER_ENV}=/tmp/flower/bin/python")


# --------------------------------------------------------------------------- running


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, even when this script was
    started in the background (which ignores it), so that the bench's Python turns it into
    KeyboardInterrupt and tears its federation down."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """The workload's process, in a process group of its own, so a timeout stops all of it."""

    current: subprocess.Popen | None = None

    @classmethod
    def run(cls, cmd: list[str], log_path: Path, timeout_s: float) -> tuple[int | None, str]:
        """(exit status or None on timeout, stdout)."""
        with open(log_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                    stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
                                    preexec_fn=default_sigint)
            cls.current = proc
            try:
                out, _ = proc.communicate(timeout=timeout_s)
                return proc.returncode, out.decode(errors="replace")
            except subprocess.TimeoutExpired:
                cls.stop()
                return None, ""
            finally:
                cls.current = None
                leftovers(proc.pid)

    @classmethod
    def stop(cls) -> None:
        """SIGINT to the bench (it tears its federation down), then its whole group."""
        proc = cls.current
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGTERM, 10.0),
                            (signal.SIGKILL, 10.0)):
            try:
                if sig == signal.SIGINT:
                    proc.send_signal(sig)
                else:
                    os.killpg(proc.pid, sig)  # the group this script created for it
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait_s)  # not communicate: its children may hold stdout
                if sig == signal.SIGINT:  # the bench is gone; now whatever it left behind
                    os.killpg(proc.pid, signal.SIGTERM)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return


def leftovers(group: int) -> None:
    """SIGTERM whatever a finished workload left running in its process group."""
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return
    print(f"[run_all] process group {group} outlived its bench; stopping it", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)


def shown(path: Path) -> str:
    """``path`` relative to the checkout when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def tail(path: Path, lines: int = 12) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def run_workload(w: Workload, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    line: dict[str, Any] = {"workload": w.name, "bench": w.script.removesuffix(".py") or None,
                            "groups": list(w.groups), "quick": args.quick, "note": w.note}
    python = sys.executable
    if w.name.startswith("flower"):
        why = flower_skip(w)
        if why:
            return {**line, "bench": "flower", "skipped": why}
        python = flower_python() or python
    argv = list(w.quick if args.quick else w.argv)
    cmd = [python, str(BENCH / w.script), *argv]
    line["command"] = " ".join(["python", f"bench/{w.script}", *argv])
    # raw_grpc takes its own median over --repeat rounds: one run of it is enough
    runs = 1 if w.script == "raw_grpc.py" else args.runs
    timeout_s = min(w.timeout_s, 240.0) if args.quick else w.timeout_s
    results, errors, failed_log = [], [], None
    for k in range(runs):
        log_path = logs / f"{w.name}{'-quick' if args.quick else ''}-{k + 1}.log"
        started = time.monotonic()
        status, stdout = Child.run(cmd, log_path, timeout_s)
        seconds = round(time.monotonic() - started, 1)
        print(f"[run_all] {w.name} run {k + 1}/{runs}: exit {status} in {seconds} s "
              f"(log {shown(log_path)})", file=sys.stderr, flush=True)
        result = last_json(stdout)
        if status is None:
            errors.append(f"run {k + 1}: timed out after {timeout_s:.0f} s")
            failed_log = failed_log or log_path
        elif status != 0 or result is None or "error" in result:
            reason = (result or {}).get("error") or (result or {}).get("reason") or ""
            errors.append(f"run {k + 1}: exit {status} {reason}".strip())
            failed_log = failed_log or log_path
        if result is not None and status == 0:
            results.append(result)
    if errors:
        line["error"] = "; ".join(errors)
        line["stderr_tail"] = tail(failed_log)  # the first failed run's
    if w.script == "raw_grpc.py":
        return {**line, **(results[0] if results else {}), "bench": "raw_grpc"}
    if w.script == "flower_sim.py":
        return {**line, "bench": "flower_sim", "runs": len(results), "runs_asked": runs,
                "median_round_s": med([r.get("median_round_s") for r in results]),
                "median_round_s_runs": [r.get("median_round_s") for r in results],
                "loadavg_1m": [x for r in results for x in r.get("loadavg_1m", [])],
                "run_lines": results}
    return {**line, **summarize(results), "runs": len(results), "runs_asked": runs}


def med(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def memory_summary(run: dict[str, Any]) -> dict[str, Any]:
    """Per actor kind: peak VmHWM and peak own memory (VmRSS - RssShmem), MiB; the largest
    combiner; clients: VmHWM of the largest worker process and its clients."""
    combiners = run.get("peak_rss_mb") or {}
    own = run.get("peak_private_rss_mb") or {}
    procs = [p for p in run.get("client_proc_peak_rss_mb") or [] if p is not None]
    return {
        "combiner": {"vmhwm": max(combiners.values(), default=None),
                     "own": max((v for k, v in own.items() if k in combiners), default=None)},
        "controller": {"vmhwm": run.get("controller_peak_rss_mb"),
                       "own": max((v for k, v in own.items() if k not in combiners),
                                  default=None)},
        "client_proc": {"vmhwm": max(procs, default=None),
                        "clients_per_proc": -(-run["clients"] // max(run["procs"], 1))},
    }


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs of what the plots and the table need, then every run."""
    if not results:
        return {}
    first = results[0]
    mems = [memory_summary(r) for r in results]
    memory = {kind: {key: med([m[kind][key] for m in mems]) for key in mems[0][kind]}
              for kind in mems[0]}
    return {
        **{k: first[k] for k in ("clients", "params", "rounds", "combiners", "procs",
                                 "model_bytes")},
        "median_round_s": med([r.get("median_round_s") for r in results]),
        "median_round_s_runs": [r.get("median_round_s") for r in results],
        "startup_s": med([r.get("startup_s") for r in results]),
        "memory_mb": memory,
        "bytes_ok": all(set(r.get("bytes_per_round") or [None])
                        == {r.get("expected_bytes_per_round")} for r in results),
        "updates_failed_or_rejected": sum(r.get("updates_failed_or_rejected", 0)
                                          for r in results),
        "loadavg_1m": [x for r in results for x in r.get("loadavg_1m", [])],
        "run_lines": results,
    }


def git_head() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this workload (repeatable); --list shows the names")
    p.add_argument("--runs", type=int, default=None,
                   help="runs per workload (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="a tiny version of each (smoke test)")
    p.add_argument("--out", default=None,
                   help="append the lines here (default bench/results.jsonl, or "
                        "bench/results-quick.jsonl with --quick)")
    p.add_argument("--list", action="store_true", help="print the workloads and exit")
    args = p.parse_args(argv)
    names = {w.name for w in WORKLOADS}
    for name in args.only or []:
        if name not in names:
            p.error(f"unknown workload {name!r}; one of: {', '.join(sorted(names))}")
    if args.runs is None:
        args.runs = 1 if args.quick else 3  # a smoke test runs every workload once
    if args.runs <= 0:
        p.error("--runs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [w for w in WORKLOADS if not args.only or w.name in args.only]
    if args.list:
        for w in chosen:
            why = flower_skip(w) if w.name.startswith("flower") else ""
            flags = f"(skipped: {why})" if why else " ".join(w.quick if args.quick else w.argv)
            print(f"{w.name:22} {w.script or '-':18} {flags}")
        return 0
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
    out = Path(args.out or BENCH / ("results-quick.jsonl" if args.quick else "results.jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = BENCH / "logs"
    logs.mkdir(exist_ok=True)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # also makes SIGINT reach the children
        signal.signal(sig, on_signal)
    failed = 0
    try:
        for w in chosen:
            line = {**run_workload(w, args, logs), "commit": git_head(),
                    "at": datetime.now(UTC).isoformat(timespec="seconds")}
            failed += "error" in line
            text = json.dumps(line)
            print(text, flush=True)
            with open(out, "a") as fh:
                fh.write(text + "\n")
    except KeyboardInterrupt:
        print("[run_all] interrupted; stopping the running workload", file=sys.stderr)
        Child.stop()
        return 130
    print(f"[run_all] {len(chosen)} workload(s), {failed} failed; lines appended to {out}",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
