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

Doc = Mapping[str, Any]

_STYLES = {
    "created": "cyan",
    "running": "yellow",
    "training": "yellow",
    "validating": "yellow",
    "finished": "green",
    "committed": "green",
    "online": "green",
    "failed": "bold red",
    "offline": "dim",
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
    columns = _COLUMNS.get(collection) or _generic_columns(docs)
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
    times = [d["ts"].astimezone() for d in docs if isinstance(d.get("ts"), datetime)]
    one_day = len({t.date() for t in times}) == 1
    if one_day:
        title += f" on {times[0]:%Y-%m-%d}"
    several = len({d.get("session_id") for d in docs} - {None}) > 1
    table = Table(title=title, title_justify="left")
    table.add_column("time", no_wrap=True, style="dim")
    table.add_column("level", no_wrap=True)
    table.add_column("source", overflow="fold", max_width=24)
    if several:
        table.add_column("session", no_wrap=True)
    table.add_column("round", no_wrap=True, justify="right")
    table.add_column("message", overflow="fold", ratio=1, min_width=20)
    for doc in docs:
        ts = doc.get("ts")
        when = ""
        if isinstance(ts, datetime):
            local = ts.astimezone()
            when = f"{local:%H:%M:%S}.{local.microsecond // 1000:03d}" if one_day else _time(ts)
        level = str(doc.get("level") or "")
        row = [Text(when), Text(level, style=_STYLES.get(level, "")),
               _cell(doc.get("source"))]  # fmt: skip
        if several:
            row.append(Text(_short(doc.get("session_id"), 8)))
        row.append(_cell(doc.get("round")))
        row.append(Text(printable(str(doc.get("message") or "")),
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
    if isinstance(doc.get("seconds"), int | float):
        return _seconds(doc["seconds"])
    start, end = doc.get("started_at"), doc.get("finished_at")
    if isinstance(start, datetime) and isinstance(end, datetime):
        return _seconds((end - start).total_seconds())
    return ""


def _round_updates(doc: Doc) -> str:
    received, rejected = doc.get("updates"), doc.get("rejected")
    if received is None:
        return ""
    return f"{received} ({rejected} rejected)" if rejected else str(received)


def _round_metrics(doc: Doc) -> str:
    train = {f"train.{k}": v for k, v in (doc.get("train_metrics") or {}).items()}
    val = {f"val.{k}": v for k, v in (doc.get("validation_metrics") or {}).items()}
    return _metrics({**train, **val})


def _session_rounds(doc: Doc) -> str:
    done, planned = doc.get("rounds_done"), doc.get("rounds_planned")
    return f"{done if done is not None else '?'}/{planned if planned is not None else '?'}"


Column = tuple[str, Callable[[Doc], Any]]

_COLUMNS: dict[str, list[Column]] = {
    "sessions": [
        ("session", lambda d: d.get("session_id")),
        ("federation", lambda d: d.get("federation")),
        ("status", lambda d: _styled(d.get("status"))),
        ("rounds", _session_rounds),
        ("model", lambda d: _short(d.get("model_id"))),
        ("created", lambda d: _time(d.get("created_at"))),
        ("updated", lambda d: _time(d.get("updated_at"))),
    ],
    "rounds": [
        ("session", lambda d: _short(d.get("session_id"))),
        ("round", lambda d: d.get("round")),
        ("status", lambda d: _styled(d.get("status"))),
        ("updates", _round_updates),
        ("duration", _round_duration),
        ("metrics", _round_metrics),
        ("model", lambda d: _short(d.get("model_id"))),
    ],
    "models": [
        ("model", lambda d: _short(d.get("model_id"))),
        ("parent", lambda d: _short(d.get("parent_id"))),
        ("session", lambda d: _short(d.get("session_id"))),
        ("round", lambda d: d.get("round")),
        ("size", lambda d: _size(d.get("size"))),
        ("created", lambda d: _time(d.get("created_at"))),
    ],
    "clients": [
        ("name", lambda d: d.get("name") or d.get("client_id")),
        ("combiner", lambda d: d.get("combiner")),
        ("status", lambda d: _styled(d.get("status"))),
        ("last seen", lambda d: _time(d.get("last_seen"))),
        ("version", lambda d: d.get("version")),
    ],
    "combiners": [
        ("name", lambda d: d.get("name")),
        ("address", lambda d: d.get("address")),
        ("status", lambda d: _styled(d.get("status"))),
        ("clients", lambda d: d.get("clients")),
        ("restarts", lambda d: d.get("restarts")),
        ("updated", lambda d: _time(d.get("updated_at"))),
    ],
    "validations": [
        ("time", lambda d: _time(d.get("ts"))),
        ("session", lambda d: _short(d.get("session_id"), 8)),
        ("round", lambda d: d.get("round")),
        ("client", lambda d: d.get("client_id")),
        ("model", lambda d: _short(d.get("model_id"))),
        ("metrics", lambda d: _metrics(d.get("metrics"))),
    ],
    "packages": [
        ("sha256", lambda d: _short(d.get("sha256"))),
        ("name", lambda d: d.get("name")),
        ("size", lambda d: _size(d.get("size"))),
        ("created", lambda d: _time(d.get("created_at"))),
    ],
}


def _generic_columns(docs: Sequence[Doc]) -> list[Column]:
    keys: list[str] = []
    for doc in docs[:20]:
        keys.extend(k for k in doc if k not in keys)

    def getter(key: str) -> Callable[[Doc], Any]:
        return lambda d: _time(d[key]) if isinstance(d.get(key), datetime) else d.get(key)

    return [(key, getter(key)) for key in keys]
