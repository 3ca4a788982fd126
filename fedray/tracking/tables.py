"""The CLI's tables of tracking documents (``fedray sessions|rounds|...`` without ``--json``).

``render_table`` prints documents of one collection with the columns that matter for it,
reading fields by their schema names (fedray.tracking.schema). Every string a client may
have chosen goes through ``printable``, so no escape sequence reaches the terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedray.text import printable
from fedray.tracking.schema import (
    CLIENTS,
    COMBINERS,
    CONTRIBUTIONS,
    EVENTS,
    MODELS,
    PACKAGES,
    ROUNDS,
    SESSIONS,
    VALIDATIONS,
)

Doc = Mapping[str, Any]

_STYLES = {
    "created": "cyan",
    "waiting": "cyan",
    "running": "yellow",
    "training": "yellow",
    "validating": "yellow",
    "finished": "green",
    "online": "green",
    "failed": "bold red",
    "offline": "dim",
    "stopped": "dim",
    "debug": "dim",
    "info": "blue",
    "warning": "yellow",
    "error": "bold red",
}


_MESSAGE_STYLES = {"debug": "dim", "warning": "yellow", "error": "red"}


def render_table(
    collection: str, docs: Sequence[Doc], console: Console, total: int | None = None
) -> None:
    """Print ``docs`` as a table with the columns that matter for ``collection``.

    ``total`` (how many matched in all) makes the title say that only the latest are shown.
    """
    title = f"{collection} ({len(docs)})"
    if total is not None and total > len(docs):
        title = f"{collection} (the latest {len(docs)} of {total}; --limit shows more)"
    if collection == "events":
        console.print(_events_table(docs, title))
        return
    columns = _round_columns(docs) if collection == "rounds" else \
        _COLUMNS.get(collection) or _generic_columns(docs)
    table = Table(title=title, title_justify="left")
    for header, _ in columns:
        table.add_column(header, overflow="fold")
    for doc in docs:
        table.add_row(*(_cell(get(doc)) for _, get in columns))
    console.print(table)


def _events_table(docs: Sequence[Doc], title: str) -> Table:
    """A log-like table: fixed narrow columns, and the message wrapped in the rest.

    Times are local; when every event falls on one day, the date goes to the title and
    rows show milliseconds (events of one round are often within the same second). The
    session column appears only when the events come from more than one session.
    """
    times = [d[EVENTS.ts].astimezone() for d in docs if isinstance(d.get(EVENTS.ts), datetime)]
    one_day = len({t.date() for t in times}) == 1
    if one_day:
        title += f" on {times[0]:%Y-%m-%d}"
    several = len({d.get(EVENTS.session_id) for d in docs} - {None}) > 1
    table = Table(title=title, title_justify="left")
    table.add_column("time", no_wrap=True, style="dim")
    table.add_column("level", no_wrap=True)
    table.add_column("source", overflow="fold", max_width=24)
    if several:
        table.add_column("session", no_wrap=True)
    table.add_column("round", no_wrap=True, justify="right")
    table.add_column("message", overflow="fold", ratio=1, min_width=20)
    for doc in docs:
        ts = doc.get(EVENTS.ts)
        when = ""
        if isinstance(ts, datetime):
            local = ts.astimezone()
            when = f"{local:%H:%M:%S}.{local.microsecond // 1000:03d}" if one_day else _time(ts)
        level = str(doc.get(EVENTS.level) or "")
        row = [Text(when), Text(level, style=_STYLES.get(level, "")),
               _cell(doc.get(EVENTS.source))]  # fmt: skip
        if several:
            row.append(Text(_short(doc.get(EVENTS.session_id), 8)))
        row.append(_cell(doc.get(EVENTS.round)))
        row.append(Text(printable(str(doc.get(EVENTS.message) or "")),
                        style=_MESSAGE_STYLES.get(level, "")))
        table.add_row(*row)
    return table


# formatting helpers


def _cell(value: Any) -> Text:
    """A table cell; clients choose some of these strings, so escapes never reach the terminal."""
    if isinstance(value, Text):
        return value
    return Text("" if value is None else printable(str(value)))


def _short(value: Any, n: int = 12) -> str:
    return value[:n] if isinstance(value, str) else ""


def _time(value: Any) -> str:
    if not isinstance(value, datetime):
        return ""
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _styled(value: Any) -> Text:
    text = "" if value is None else str(value)
    return Text(text, style=_STYLES.get(text, ""))


def _size(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""  # unreachable


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes}m{seconds:02d}s"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _metrics(value: Any) -> str:
    if not isinstance(value, Mapping):
        return ""
    return " ".join(f"{k}={_number(v)}" for k, v in value.items())


def _round_duration(doc: Doc) -> str:
    return _seconds(doc.get(ROUNDS.seconds))


def _round_status(doc: Doc) -> Text:
    text = _styled(doc.get(ROUNDS.status))
    attempt = doc.get(ROUNDS.attempt)
    if isinstance(attempt, int) and attempt > 1:
        text.append(f" (attempt {attempt})")
    return text


def _round_updates(doc: Doc) -> str:
    received, rejected = doc.get(ROUNDS.updates), doc.get(ROUNDS.rejected)
    if received is None:
        return ""
    return f"{received} ({rejected} rejected)" if rejected else str(received)


def _is_async(doc: Doc) -> bool:
    return doc.get(ROUNDS.mode) == "async"


def _staleness(doc: Doc) -> str:
    """Mean and maximum staleness of the updates that built an asynchronous version."""
    values = [c.get(CONTRIBUTIONS.staleness) for c in doc.get(ROUNDS.contributions) or []
              if isinstance(c, Mapping)]
    values = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not values:
        return ""
    return f"mean {_number(sum(values) / len(values))}, max {_number(max(values))}"


def _report(doc: Doc) -> str:
    """The strategy's round report: ε and δ first (None is an infinite ε), then the rest."""
    report = doc.get(ROUNDS.report)
    if not isinstance(report, Mapping) or not report:
        return ""
    parts = []
    if "epsilon" in report:
        epsilon = report["epsilon"]
        parts.append(f"ε={'∞' if epsilon is None else _number(epsilon)}")
    if "delta" in report:
        parts.append(f"δ={_number(report['delta'])}")
    parts += [f"{k}={'∞' if v is None else _number(v)}" for k, v in report.items()
              if k not in ("epsilon", "delta")]
    return " ".join(parts)


def _round_metrics(doc: Doc) -> str:
    train = doc.get(ROUNDS.train_metrics) or {}
    if _is_async(doc):  # the staleness column says these, from the contributions
        train = {k: v for k, v in train.items() if k not in ("staleness_mean", "staleness_max")}
    val = doc.get(ROUNDS.validation_metrics) or {}
    return _metrics({**{f"train.{k}": v for k, v in train.items()},
                     **{f"val.{k}": v for k, v in val.items()}})


def _round_columns(docs: Sequence[Doc]) -> list[Column]:
    """Rounds of synchronous sessions; an asynchronous session's are model versions, each
    with the staleness of its updates. Columns nobody fills are left out."""
    modes = {"async" if _is_async(d) else "sync" for d in docs}
    columns: list[Column] = [
        ("session", lambda d: _short(d.get(ROUNDS.session_id))),
        ("version" if modes == {"async"} else "round", lambda d: d.get(ROUNDS.round)),
    ]
    if len(modes) > 1:
        columns.append(("mode", lambda d: "async" if _is_async(d) else "sync"))
    columns += [("status", _round_status), ("updates", _round_updates)]
    if "async" in modes:
        columns.append(("staleness", _staleness))
    columns.append(("duration", _round_duration))
    if any(d.get(ROUNDS.report) for d in docs):
        columns.append(("report", _report))
    return columns + [("metrics", _round_metrics),
                      ("model", lambda d: _short(d.get(ROUNDS.model_id)))]


def _session_rounds(doc: Doc) -> str:
    done, planned = doc.get(SESSIONS.rounds_done), doc.get(SESSIONS.rounds_planned)
    return f"{done if done is not None else '?'}/{planned if planned is not None else '?'}"


def _session_strategy(doc: Doc) -> str:
    strategy = doc.get(SESSIONS.strategy) or ""
    return f"{strategy} (async)" if doc.get(SESSIONS.mode) == "async" else strategy


def _attrs(value: Any) -> str:
    if not isinstance(value, Mapping):
        return ""
    return " ".join(f"{k}={v}" for k, v in sorted(value.items()))


Column = tuple[str, Callable[[Doc], Any]]

_COLUMNS: dict[str, list[Column]] = {
    "sessions": [
        ("session", lambda d: d.get(SESSIONS.session_id)),
        ("federation", lambda d: d.get(SESSIONS.federation)),
        ("strategy", _session_strategy),
        ("status", lambda d: _styled(d.get(SESSIONS.status))),
        ("rounds", _session_rounds),
        ("model", lambda d: _short(d.get(SESSIONS.model_id))),
        ("created", lambda d: _time(d.get(SESSIONS.created_at))),
        ("updated", lambda d: _time(d.get(SESSIONS.updated_at))),
    ],
    "models": [
        ("model", lambda d: _short(d.get(MODELS.model_id))),
        ("parent", lambda d: _short(d.get(MODELS.parent_id))),
        ("session", lambda d: _short(d.get(MODELS.session_id))),
        ("round", lambda d: d.get(MODELS.round)),
        ("size", lambda d: _size(d.get(MODELS.size))),
        ("created", lambda d: _time(d.get(MODELS.created_at))),
    ],
    "clients": [
        ("name", lambda d: d.get(CLIENTS.name) or d.get(CLIENTS.client_id)),
        ("combiner", lambda d: d.get(CLIENTS.combiner)),
        ("status", lambda d: _styled(d.get(CLIENTS.status))),
        ("attrs", lambda d: _attrs(d.get(CLIENTS.attrs))),
        ("last seen", lambda d: _time(d.get(CLIENTS.last_seen))),
        ("version", lambda d: d.get(CLIENTS.version)),
    ],
    "combiners": [
        ("name", lambda d: d.get(COMBINERS.name)),
        ("address", lambda d: d.get(COMBINERS.address)),
        ("status", lambda d: _styled(d.get(COMBINERS.status))),
        ("clients", lambda d: d.get(COMBINERS.clients)),
        ("restarts", lambda d: d.get(COMBINERS.restarts)),
        ("updated", lambda d: _time(d.get(COMBINERS.updated_at))),
    ],
    "validations": [
        ("time", lambda d: _time(d.get(VALIDATIONS.ts))),
        ("session", lambda d: _short(d.get(VALIDATIONS.session_id), 8)),
        ("round", lambda d: d.get(VALIDATIONS.round)),
        ("client", lambda d: d.get(VALIDATIONS.client_id)),
        ("model", lambda d: _short(d.get(VALIDATIONS.model_id))),
        ("metrics", lambda d: _metrics(d.get(VALIDATIONS.metrics))),
    ],
    "packages": [
        ("sha256", lambda d: _short(d.get(PACKAGES.sha256))),
        ("name", lambda d: d.get(PACKAGES.name)),
        ("size", lambda d: _size(d.get(PACKAGES.size))),
        ("created", lambda d: _time(d.get(PACKAGES.created_at))),
    ],
}


def _generic_columns(docs: Sequence[Doc]) -> list[Column]:
    keys: list[str] = []
    for doc in docs[:20]:
        keys.extend(k for k in doc if k not in keys)

    def getter(key: str) -> Callable[[Doc], Any]:
        return lambda d: _time(d[key]) if isinstance(d.get(key), datetime) else d.get(key)

    return [(key, getter(key)) for key in keys]


def follow_line(collection: str, doc: Doc) -> Text:
    """One document as one line, for ``--follow`` (a table cannot grow row by row)."""
    ts = doc.get(EVENTS.ts) if collection == "events" else doc.get("updated_at")
    when = ""
    if isinstance(ts, datetime):
        local = ts.astimezone()
        when = f"{local:%H:%M:%S}.{local.microsecond // 1000:03d} "
    line = Text(when, style="dim")
    if collection == "events":
        level = str(doc.get(EVENTS.level) or "")
        line.append(f"{level:<7} ", style=_STYLES.get(level, ""))
        line.append(printable(str(doc.get(EVENTS.source) or ""), newlines=False) + " ",
                    style="dim")
        line.append(printable(str(doc.get(EVENTS.message) or ""), newlines=False),
                    style=_MESSAGE_STYLES.get(level, ""))
        return line
    status = str(doc.get("status") or "")
    line.append(f"session {_short(doc.get('session_id'), 8)} round {doc.get('round')} ")
    line.append(status, style={"finished": "green", "failed": "red"}.get(status, ""))
    if status == "finished":
        line.append(f" · {doc.get('updates')} updates · {doc.get('seconds', 0):.2f}s")
        metrics = {**{f"train {k}": v for k, v in (doc.get("train_metrics") or {}).items()},
                   **{f"val {k}": v for k, v in (doc.get("validation_metrics") or {}).items()}}
        for name, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, int | float) else str(value)
            line.append(f" · {printable(name, newlines=False)} {shown}")
    elif status == "failed":
        line.append(f": {printable(str(doc.get('reason') or ''), newlines=False)}")
    return line
