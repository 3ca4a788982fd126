"""The benchmark tooling: bench/raw_grpc.py's JSON line, bench/plot_performance.py's PNGs
from a synthetic bench/run_all.py file, and run_all's workload list. Seconds, no Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
sys.path.insert(0, str(BENCH))

import raw_grpc  # noqa: E402 - bench/ is not a package
import run_all  # noqa: E402

from tests.waiting import wait_until  # noqa: E402


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_raw_grpc_prints_one_json_line_with_the_round() -> None:
    # Execute
    done = _run("bench/raw_grpc.py", "--clients", "2", "--mb", "4", "--repeat", "1")

    # Assert
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    out = json.loads(lines[0])
    assert (out["bench"], out["clients"], out["bytes"], out["repeat"]) == \
        ("raw_grpc", 2, 4_000_000, 1)
    for key in ("download_s", "upload_s"):
        assert 0 < out[key]["median"] <= out[key]["max"] < out["round_s"]
    assert out["mb_per_s"]["round"] > 0
    assert "error" not in out


def test_raw_grpc_uses_fedrays_message_limits() -> None:
    from fedray.bridge.server import MAX_MESSAGE_BYTES
    from fedray.edge.client import CHANNEL_OPTIONS
    from fedray.edge.tasks import CHUNK

    assert raw_grpc.MAX_MESSAGE_BYTES == MAX_MESSAGE_BYTES
    assert dict(raw_grpc.CHANNEL_OPTIONS)["grpc.max_receive_message_length"] == \
        dict(CHANNEL_OPTIONS)["grpc.max_receive_message_length"]
    assert raw_grpc.CHUNK == CHUNK


def _fedavg_line(name: str, clients: int, params: int, round_s: float,
                 groups: list[str]) -> dict[str, Any]:
    mb = params * 4 / 2**20
    return {"workload": name, "bench": "round_overhead", "groups": groups, "quick": False,
            "clients": clients, "params": params, "model_bytes": params * 4 + 400,
            "median_round_s": round_s,
            "memory_mb": {"combiner": {"vmhwm": 300 + 8 * mb, "own": 200 + 4 * mb},
                          "controller": {"vmhwm": 200 + 12 * mb, "own": 150 + 6 * mb},
                          "client_proc": {"vmhwm": 100 + 5 * mb, "clients_per_proc": 1}}}


def synthetic_results(path: Path) -> None:
    """A run_all file: the ceiling, four of the clients sweep, the size sweep, one failed
    workload, a skipped one, and an older line that a later one replaces."""
    lines = [
        _fedavg_line("fedavg_100x1M", 100, 1_000_000, 99.0, ["clients"]),  # replaced below
        {"workload": "raw_grpc_4x100MB", "bench": "raw_grpc", "groups": ["ceiling"],
         "clients": 4, "bytes": 100_000_000, "round_s": 1.3, "mb_per_s": {"round": 615.0}},
        _fedavg_line("fedavg_4x25M", 4, 25_000_000, 3.7, ["clients", "size"]),
        _fedavg_line("fedavg_100x1M", 100, 1_000_000, 2.4, ["clients"]),
        _fedavg_line("fedavg_500x100k", 500, 100_000, 5.0, ["clients"]),
        _fedavg_line("fedavg_1000x10k", 1000, 10_000, 4.2, ["clients"]),
        {"workload": "fedavg_3000x10k", "groups": ["clients"], "error": "run 1: timed out"},
        _fedavg_line("fedavg_4x100M", 4, 100_000_000, 14.0, ["size"]),
        _fedavg_line("fedavg_2x250M", 2, 250_000_000, 20.0, ["size"]),
        {"workload": "flower_4x25M", "bench": "flower", "groups": ["compare"],
         "skipped": "Flower is not installed"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_plot_performance_writes_the_pngs_and_the_table(tmp_path: Path) -> None:
    # Prepare
    results = tmp_path / "results.jsonl"
    synthetic_results(results)
    out_dir = tmp_path / "plots"

    # Execute
    done = _run("bench/plot_performance.py", "--in", str(results), "--out-dir", str(out_dir),
                "--table")

    # Assert
    assert done.returncode == 0, done.stderr
    for name in ("clients", "size", "memory"):
        assert (out_dir / f"performance-{name}.png").read_bytes()[:8] == PNG_MAGIC, name
    assert "skipping fedavg_3000x10k: run 1: timed out" in done.stderr
    assert "skipping fedavg_10000x10k: not in the file" in done.stderr
    table = done.stdout.splitlines()
    row = next(r for r in table if r.startswith("| `fedavg_100x1M`"))
    assert "| 2.400 |" in row  # the later line
    assert next(r for r in table if r.startswith("| `fedavg_10000x10k`")).count("—") >= 5


def test_plot_performance_without_the_ceiling_or_a_sweep(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(_fedavg_line("fedavg_100x1M", 100, 1_000_000, 2.4,
                                               ["clients"])) + "\n")

    done = _run("bench/plot_performance.py", "--in", str(results), "--out-dir", str(tmp_path))

    assert done.returncode == 0, done.stderr
    assert "without the transport ceiling" in done.stderr
    assert (tmp_path / "performance-clients.png").is_file()
    assert not (tmp_path / "performance-size.png").exists()


def test_run_all_names_every_figure_and_its_quick_shape() -> None:
    names = [w.name for w in run_all.WORKLOADS]
    assert len(names) == len(set(names))
    for w in run_all.WORKLOADS:
        if w.script:
            assert (BENCH / w.script).is_file()
            assert w.quick and w.timeout_s > 0
    args = run_all.parse_args(["--quick"])
    assert args.runs == 1
    assert run_all.parse_args([]).runs == 3
    with pytest.raises(SystemExit):
        run_all.parse_args(["--only", "no-such-workload"])


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state == "Z"  # a zombie: dead, its new parent has yet to reap it


def test_run_all_stops_a_workload_and_its_children_at_its_timeout(tmp_path: Path) -> None:
    # Prepare: a "bench" that starts a child of its own and then hangs
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "hangs.py"
    script.write_text("import pathlib, subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; "
                      "time.sleep(120)'])\n"
                      f"pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))\n"
                      "time.sleep(120)\n")

    # Execute
    status, out = run_all.Child.run([sys.executable, str(script)], tmp_path / "log", 3.0)

    # Assert
    assert (status, out) == (None, "")
    child = int(pid_file.read_text())
    wait_until(lambda: _gone(child), f"the workload's child {child} to be stopped", timeout=15)


def test_run_all_records_a_failed_workload_as_an_error_line(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a bench whose first run fails and second run finishes
    (tmp_path / "flaky.py").write_text(
        "import json, pathlib, sys\n"
        f"mark = pathlib.Path({str(tmp_path / 'ran')!r})\n"
        "first = not mark.exists(); mark.touch()\n"
        "line = {'clients': 2, 'params': 10, 'rounds': 1, 'combiners': 1, 'procs': 1,\n"
        "        'model_bytes': 40, 'median_round_s': 0.5, 'state': 'finished',\n"
        "        'peak_rss_mb': {'combiner-0': 100.0}, 'controller_peak_rss_mb': 90.0,\n"
        "        'peak_private_rss_mb': {'combiner-0': 80.0, 'controller': 70.0},\n"
        "        'client_proc_peak_rss_mb': [60.0]}\n"
        "if first: print('boom', file=sys.stderr); line.update(state='error', reason='boom')\n"
        "print(json.dumps(line)); sys.exit(2 if first else 0)\n")
    monkeypatch.setattr(run_all, "BENCH", tmp_path)
    w = run_all.Workload("flaky", "flaky.py", (), (), 30, ("clients",))
    args = run_all.parse_args(["--runs", "2"])

    # Execute
    line = run_all.run_workload(w, args, tmp_path)

    # Assert
    assert line["error"] == "run 1: exit 2 boom"
    assert "boom" in line["stderr_tail"]
    assert (line["runs"], line["runs_asked"], line["median_round_s"]) == (1, 2, 0.5)
    assert line["memory_mb"]["combiner"] == {"vmhwm": 100.0, "own": 80.0}
    assert line["memory_mb"]["controller"] == {"vmhwm": 90.0, "own": 70.0}


def test_run_all_runs_flower_only_with_a_flower_python(monkeypatch, tmp_path: Path) -> None:
    flower = next(w for w in run_all.WORKLOADS if w.name == "flower_sim_100x1M")
    assert (BENCH / flower.script).is_file()
    monkeypatch.setenv(run_all.FLOWER_ENV, str(tmp_path / "no-such-python"))
    assert run_all.FLOWER_ENV in run_all.flower_skip(flower)  # says how to set one up
    fake = tmp_path / "python"
    fake.write_text("")
    monkeypatch.setenv(run_all.FLOWER_ENV, str(fake))
    assert run_all.flower_skip(flower) == ""
    engine = next(w for w in run_all.WORKLOADS if w.name == "flower_4x25M")
    assert "deployment engine" in run_all.flower_skip(engine)
