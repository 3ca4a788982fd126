"""Training curves as a PNG, for `fedray plot` and the end of `fedray demo`.

One function draws them, ``plot_rounds``, from round records: the ``rounds`` documents
in tracking and the controller's in-memory ``history`` share the fields it reads
(``round``, ``train_metrics``, ``validation_metrics``), so the CLI (reading tracking) and
the demo (holding the history) make the same picture. A record may also carry
``test_metrics`` (the demo's held-out accuracy), drawn dotted.

Metrics whose name looks like a loss go to the left panel, all others (accuracy, ...) to
the right; a panel with nothing to show is left out. Each metric keeps one colour: the
training curve is solid, validation dashed. Rounds recorded as failed are shaded. matplotlib is driven through its object API
on the Agg canvas (no pyplot, no global backend, no display), and imported only here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedray.errors import ConfigError, FedrayError
from fedray.tracking.schema import ROUNDS, SESSIONS

# (record field, label, line style, marker): the kinds of metrics a round record carries
KINDS = (
    (ROUNDS.train_metrics, "train", "-", "o"),
    (ROUNDS.validation_metrics, "validation", "--", "s"),
    ("test_metrics", "held-out", ":", "^"),  # the demo's own history, never in tracking
)
_LOSS_WORDS = ("loss", "error", "mse", "mae", "rmse", "nll", "perplexity", "entropy")
# "train_loss" in train metrics and "loss" in validation metrics are one metric
_KIND_PREFIX = re.compile(r"^(train|training|val|valid|validation|eval|test)[_./-](?=.)", re.I)
_MARKERS_UP_TO = 40  # rounds; beyond this, markers only clutter the lines


@dataclass(frozen=True)
class Series:
    metric: str
    kind: str
    style: str
    marker: str
    rounds: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def label(self) -> str:
        return f"{self.kind} {self.metric} ({_fmt(self.values[-1])})"


@dataclass(frozen=True)
class PlotInfo:
    """What ``plot_session`` drew, for the CLI's one-line answer."""

    path: Path
    session_id: str
    federation: str
    status: str
    rounds: int
    metrics: tuple[str, ...]


def metric_name(name: str) -> str:
    """``name`` without a train/val/test prefix: ``train_loss`` and ``val_loss`` are ``loss``."""
    return _KIND_PREFIX.sub("", name)


def is_loss_like(metric: str) -> bool:
    """Whether ``metric`` is lower-is-better by its name (loss, error, mse, ...)."""
    name = metric.lower()
    return any(word in name for word in _LOSS_WORDS)


def series_of(records: Sequence[Mapping[str, Any]]) -> list[Series]:
    """Every (metric, kind) curve in ``records``, by round; non-numeric values skipped."""
    points: dict[tuple[str, str, str, str], dict[int, float]] = {}
    for record in records:
        number = record.get(ROUNDS.round)
        if not isinstance(number, int):
            continue
        for field, kind, style, marker in KINDS:
            metrics = record.get(field)
            if not isinstance(metrics, Mapping):
                continue
            for name, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    key = (metric_name(str(name)), kind, style, marker)
                    points.setdefault(key, {})[number] = float(value)
    out = []
    for (name, kind, style, marker), by_round in points.items():
        rounds = tuple(sorted(by_round))
        out.append(Series(name, kind, style, marker, rounds, tuple(by_round[r] for r in rounds)))
    return out


def curve_title(federation: str | None, session_id: str | None, status: str | None) -> str:
    parts = [federation or "?", f"session {session_id or '?'}"]
    if status:
        parts.append(status)
    return " · ".join(parts)


def plot_rounds(
    records: Sequence[Mapping[str, Any]],
    path: Path | str,
    *,
    title: str = "training curves",
    subtitle: str | None = None,
) -> Path:
    """Draw ``records``' per-round metrics into the PNG ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = series_of(records)
    losses = [s for s in series if is_loss_like(s.metric)]
    others = [s for s in series if not is_loss_like(s.metric)]
    panels = [(p, ", ".join(sorted({s.metric for s in p}))) for p in (losses, others) if p] \
        or [([], "no metrics recorded")]
    rounds = sorted({r[ROUNDS.round] for r in records if isinstance(r.get(ROUNDS.round), int)})
    failed = [r[ROUNDS.round] for r in records
              if r.get(ROUNDS.status) == "failed" and r[ROUNDS.round] in rounds]
    names = sorted({s.metric for s in series})
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
               "#17becf", "#7f7f7f", "#bcbd22"]  # fmt: skip
    colors = {name: palette[i % len(palette)] for i, name in enumerate(names)}

    fig = Figure(figsize=(5.2 * len(panels) + 0.8, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    for index, (panel, heading) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
        _round_axis(ax, rounds)
        for i, number in enumerate(failed):
            ax.axvspan(number - 0.35, number + 0.35, color="#d62728", alpha=0.12, linewidth=0,
                       label="failed round" if i == 0 else None)  # fmt: skip
        if not panel:
            note = "the rounds carry no numeric metrics" if records else "no rounds recorded yet"
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes,
                    color="gray")  # fmt: skip
            ax.set_yticks([])
            continue
        for s in sorted(panel, key=lambda s: (s.metric, [k[1] for k in KINDS].index(s.kind))):
            ax.plot(s.rounds, s.values, linestyle=s.style, color=colors[s.metric],
                    marker=s.marker if len(rounds) <= _MARKERS_UP_TO else None, markersize=4.5,
                    linewidth=1.8, label=s.label)  # fmt: skip
        values = [v for s in panel for v in s.values]
        if min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    except OSError as exc:
        raise FedrayError(f"cannot write the plot to {path}: {exc.strerror or exc}") from exc
    return path


def _round_axis(ax: Any, rounds: Sequence[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    if not rounds:
        ax.set_xticks([])
        return
    if len(rounds) <= 15:
        ax.set_xticks(list(rounds))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    low, high = min(rounds), max(rounds)
    pad = 0.5 if high - low < 10 else (high - low) * 0.03
    ax.set_xlim(low - pad, high + pad)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def plot_session(
    uri: str, path: Path | str, *, session: str | None = None, database: str | None = None
) -> PlotInfo:
    """Plot one session from the tracking database at ``uri`` (default: the latest).

    ``session`` is a session id or a unique prefix of one.
    """
    from fedray.tracking.query import resolve_session
    from fedray.tracking.store import TrackingStore

    store = TrackingStore.from_uri(uri, database)
    try:
        if session is None:
            doc = store.latest_session()
            if doc is None:
                raise ConfigError(f"no session in tracking at {store.where} yet")
        else:
            found = resolve_session(store, session)
            doc = store.get_session(found) or {SESSIONS.session_id: found}
        session_id = doc[SESSIONS.session_id]
        records = store.find("rounds", {ROUNDS.session_id: session_id}, [(ROUNDS.round, 1)])
    finally:
        store.close()
    federation = doc.get(SESSIONS.federation) or "?"
    status = doc.get(SESSIONS.status) or "?"
    done, planned = doc.get(SESSIONS.rounds_done), doc.get(SESSIONS.rounds_planned)
    subtitle = (f"{done} of {planned} rounds done" if done is not None and planned
                else f"{len(records)} rounds recorded")  # fmt: skip
    plot_rounds(records, path, title=curve_title(federation, session_id, status),
                subtitle=subtitle)  # fmt: skip
    metrics = tuple(sorted({f"{s.kind} {s.metric}" for s in series_of(records)}))
    return PlotInfo(Path(path), session_id, federation, status, len(records), metrics)
