#!/usr/bin/env python
"""Draw bench/run_all.py's lines as the plots of docs/performance.md.

    python bench/plot_performance.py [--in bench/results.jsonl] [--out-dir docs] [--table]

For each workload the last line in the file counts. Three PNGs:

- ``performance-clients.png``: median round seconds against clients (log x), the FedAvg
  workloads of the clients sweep;
- ``performance-size.png``: median round seconds against model size (log x), the
  model-size sweep;
- ``performance-memory.png``: peak memory per actor (combiner, controller, client
  process; VmHWM and own memory, VmRSS - RssShmem) against model size.

The first two draw the raw-gRPC ceiling: the round's bytes (2 x clients x model bytes)
at the aggregate rate ``bench/raw_grpc.py`` measured. A workload that is missing or
failed is left out with a message on stderr; a plot with nothing to draw is not written.
``--table`` prints the markdown table of docs/performance.md with the figures filled in.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from run_all import WORKLOADS  # noqa: E402 - bench/ is not a package

MB = 1e6


def say(msg: str) -> None:
    print(f"[plot_performance] {msg}", file=sys.stderr)


def latest(path: Path) -> dict[str, dict[str, Any]]:
    """The last line of each workload, by name."""
    lines: dict[str, dict[str, Any]] = {}
    for k, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            say(f"{path}:{k}: not JSON, ignored")
            continue
        if "workload" in line:
            lines[line["workload"]] = line
    return lines


def usable(lines: dict[str, dict[str, Any]], group: str) -> list[dict[str, Any]]:
    """The group's FedAvg lines that have a round time, each one's absence said."""
    out = []
    for w in WORKLOADS:
        if group in w.groups and w.name not in lines:
            say(f"{group}: skipping {w.name}: not in the file")
    for name, line in lines.items():
        if group not in line.get("groups", []):
            continue
        if line.get("skipped"):
            say(f"{group}: skipping {name}: skipped ({line['skipped']})")
        elif "error" in line or line.get("median_round_s") is None:
            say(f"{group}: skipping {name}: {line.get('error') or 'no round time'}")
        else:
            out.append(line)
    return out


def ceiling_rate(lines: dict[str, dict[str, Any]]) -> float | None:
    """The raw-gRPC aggregate rate in bytes/s, or None when it was not measured."""
    for line in lines.values():
        if line.get("bench") == "raw_grpc" and "error" not in line and line.get("round_s"):
            return line["mb_per_s"]["round"] * MB
    say("no raw_grpc line: the plots are drawn without the transport ceiling")
    return None


def _axes(title: str, xlabel: str, ylabel: str, quick: bool):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.set_title(title + ("  (--quick smoke figures)" if quick else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    say(f"wrote {path}")


def plain_numbers(axis) -> None:
    """Tick labels as 0.2, 3, 40 on a log axis, not as 2x10^-1."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))


def round_plot(points: list[dict[str, Any]], rate: float | None, x_of, xlabel: str,
               label_of, title: str, path: Path) -> bool:
    """Median round seconds against ``x_of(line)`` (log x), and the ceiling at ``rate``."""
    if not points:
        say(f"nothing to draw for {path.name}: not written")
        return False
    points = sorted(points, key=x_of)
    xs = [x_of(p) for p in points]
    fig, ax = _axes(title, xlabel, "median round (s)", any(p.get("quick") for p in points))
    ax.plot(xs, [p["median_round_s"] for p in points], "o-", label="fedray FedAvg round")
    for x, p in zip(xs, points, strict=True):
        ax.annotate(label_of(p), (x, p["median_round_s"]), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    if rate:
        ceiling = [2 * p["clients"] * p["model_bytes"] / rate for p in points]
        ax.plot(xs, ceiling, "s--", color="grey",
                label=f"raw gRPC ceiling ({rate / MB:.0f} MB/s, 2·N·model bytes)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_numbers(ax.yaxis)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def memory_plot(points: list[dict[str, Any]], path: Path) -> bool:
    if not points:
        say(f"nothing to draw for {path.name}: not written")
        return False
    points = sorted(points, key=lambda p: p["model_bytes"])
    xs = [p["model_bytes"] / MB for p in points]
    fig, ax = _axes("Peak memory per actor against model size", "model size (MB)",
                    "peak memory (MiB)", any(p.get("quick") for p in points))
    series = [("combiner", "vmhwm", "combiner VmHWM", "C0", "-"),
              ("combiner", "own", "combiner own", "C0", "--"),
              ("controller", "vmhwm", "controller VmHWM", "C1", "-"),
              ("controller", "own", "controller own", "C1", "--"),
              ("client_proc", "vmhwm", "client process VmHWM", "C2", "-")]
    for kind, key, label, color, style in series:
        ys = [(p.get("memory_mb") or {}).get(kind, {}).get(key) for p in points]
        have = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if have:
            ax.plot(*zip(*have, strict=True), marker="o", color=color, linestyle=style,
                    label=label)
    ax.plot(xs, [x * MB / 2**20 for x in xs], ":", color="grey", label="the model itself")
    for x, p in zip(xs, points, strict=True):
        ax.annotate(f"N={p['clients']}", (x, 0), xycoords=("data", "axes fraction"),
                    textcoords="offset points", xytext=(2, 4), fontsize=8)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _size(p: dict[str, Any]) -> str:
    return f"{p['model_bytes'] / MB:.3g} MB"


def table(lines: dict[str, dict[str, Any]], rate: float | None) -> str:
    """docs/performance.md's table, "—" where a figure is missing."""

    def cell(value: Any, fmt: str = "{}") -> str:
        return "—" if value is None else fmt.format(value)

    rows = ["| workload | clients | model | median round (s) | raw-gRPC ceiling (s) | "
            "combiner VmHWM / own (MiB) | controller VmHWM / own (MiB) | "
            "client proc VmHWM (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for w in WORKLOADS:
        line = lines.get(w.name, {})
        if w.script == "raw_grpc.py":
            round_s = line.get("round_s") if "error" not in line else None
            rows.append(f"| `{w.name}` | {line.get('clients', 4)} | "
                        f"{cell(line.get('bytes', 100 * MB) / MB, '{:g} MB')} | {cell(round_s, '{:.3f}')} | "
                        f"(this is it: {cell(line.get('mb_per_s', {}).get('round'))} MB/s) "
                        "| — | — | — |")
            continue
        ok = "error" not in line and not line.get("skipped")
        mem = line.get("memory_mb", {}) if ok else {}

        def pair(kind: str, mem: dict = mem) -> str:
            m = mem.get(kind, {})
            return f"{cell(m.get('vmhwm'), '{:.0f}')} / {cell(m.get('own'), '{:.0f}')}"

        ceiling = (2 * line["clients"] * line["model_bytes"] / rate
                   if ok and rate and line.get("model_bytes") else None)
        flags = dict(zip(w.argv[::2], w.argv[1::2], strict=False))  # the full shape, unless
        clients = line.get("clients", flags.get("--clients", "—"))  # the line says (--quick)
        params = line.get("params", flags.get("--params"))
        model = f"P={int(params):,}" if params else w.note or "—"
        round_s = line.get("median_round_s") if ok else None
        shown = "skipped" if line.get("skipped") else cell(round_s, "{:.3f}")
        rows.append(f"| `{w.name}` | {clients} | {model} | {shown} | "
                    f"{cell(ceiling, '{:.3g}')} | {pair('combiner')} | {pair('controller')} | "
                    f"{cell(mem.get('client_proc', {}).get('vmhwm'), '{:.0f}')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--in", dest="path", default=str(BENCH / "results.jsonl"),
                   help="bench/run_all.py's lines (default bench/results.jsonl)")
    p.add_argument("--out-dir", default=str(BENCH.parent / "docs"),
                   help="where the PNGs go (default docs/)")
    p.add_argument("--table", action="store_true", help="print the markdown table too")
    args = p.parse_args(argv)
    path = Path(args.path)
    if not path.is_file():
        say(f"{path} does not exist: run bench/run_all.py first")
        return 1
    lines = latest(path)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = ceiling_rate(lines)
    round_plot(usable(lines, "clients"), rate, lambda p: p["clients"], "clients (log)",
               _size, "Round time against clients", out_dir / "performance-clients.png")
    sizes = usable(lines, "size")
    round_plot(sizes, rate, lambda p: p["model_bytes"] / MB, "model size (MB, log)",
               lambda p: f"N={p['clients']}", "Round time against model size",
               out_dir / "performance-size.png")
    memory_plot(sizes, out_dir / "performance-memory.png")
    if args.table:
        print(table(lines, rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
