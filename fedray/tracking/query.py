"""What the CLI's query commands need: run a filtered query, show it as a table or JSON.

``fedray sessions|rounds|models|clients|events|validations [--filter JSON] [--json]``
call ``query_page`` (or ``run_query``) and then ``render_table`` or ``to_json``. Filters
are MongoDB Extended JSON (``{"ts": {"$gte": {"$date": "2025-01-01T00:00:00Z"}}}``
works). ``--session`` (a session id or a unique prefix of one) and, for events,
``--level`` (that level and above) add to the filter. Each collection has a default
order: the latest ``limit`` documents are fetched, and rounds, events, models and
validations are then shown oldest first, like a log.

Queries are shaped for nx-27017 as well as MongoDB (see bench/tracking_queries.py): a
``$and`` or ``$or`` is evaluated in Python there (about 2 s over 100k events), so options
are merged into the filter as plain fields; and "warning and above" is one indexed query
per level, merged here, because a ``$in`` cannot use an index there and scans until it
has ``limit`` matches (slow exactly when they are rare).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import ObjectId, json_util
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedray.errors import ConfigError
from fedray.text import printable
from fedray.tracking.documents import LEVELS
from fedray.tracking.store import COLLECTIONS, TrackingStore

Doc = Mapping[str, Any]

# collection -> (sort for the query, show oldest first)
_ORDER: dict[str, tuple[list[tuple[str, int]], bool]] = {
    "sessions": ([("created_at", -1)], False),
    "rounds": ([("started_at", -1)], True),
    "models": ([("created_at", -1)], True),
    "clients": ([("last_seen", -1)], False),
    "combiners": ([("name", 1)], False),
    "validations": ([("ts", -1)], True),
    "events": ([("ts", -1)], True),
    "packages": ([("created_at", -1)], False),
}

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


def parse_filter(filter_json: str | None) -> dict[str, Any]:
    """The ``--filter`` option as a query document (empty when not given)."""
    if filter_json is None or not filter_json.strip():
        return {}
    try:
        value = json_util.loads(filter_json)
    except Exception as exc:  # json, bson and extended-JSON errors alike
        raise ConfigError(f"--filter: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError('--filter: expected a JSON object, such as \'{"status": "failed"}\'')
    return value


@dataclass(frozen=True)
class Page:
    """What a query command shows: documents in display order, and how many matched in
    all when that is more than were fetched (else None)."""

    docs: list[dict[str, Any]]
    total: int | None = None


def run_query(
    uri: str,
    collection: str,
    filter_json: str | None = None,
    limit: int = 50,
    *,
    database: str | None = None,
    session: str | None = None,
    level: str | None = None,
) -> list[dict[str, Any]]:
    """The latest ``limit`` documents of ``collection`` matching ``--filter`` (0: all)."""
    return query_page(uri, collection, filter_json, limit, database=database, session=session,
                      level=level).docs  # fmt: skip


def query_page(
    uri: str,
    collection: str,
    filter_json: str | None = None,
    limit: int = 50,
    *,
    database: str | None = None,
    session: str | None = None,
    level: str | None = None,
    count: bool = False,
) -> Page:
    """Like ``run_query``; with ``count``, also how many match when ``limit`` cut them off.

    ``session`` is a session id or a unique prefix of one; ``level`` keeps events of that
    level and above.
    """
    if collection not in COLLECTIONS:
        raise ConfigError(
            f"unknown tracking collection {collection!r}; one of {', '.join(COLLECTIONS)}"
        )
    query = parse_filter(filter_json)
    levels = levels_from(level, collection)
    sort, oldest_first = _ORDER[collection]
    store = TrackingStore.from_uri(uri, database)
    try:
        if session is not None:
            query = _merged(query, {"session_id": resolve_session(store, session)})
        docs = _find(store, collection, query, levels, sort, limit)
        total = None
        if count and limit and len(docs) >= limit:
            total = _count(store, collection, query, levels)
    finally:
        store.close()
    if oldest_first:
        docs.reverse()
    return Page(docs, total)


def levels_from(level: str | None, collection: str = "events") -> tuple[str, ...] | None:
    """The event levels at or above ``level`` (None: no level filter)."""
    if level is None:
        return None
    if collection != "events":
        raise ConfigError(f"--level applies to events, not to {collection}")
    if level not in LEVELS:
        raise ConfigError(f"--level must be one of {', '.join(LEVELS)}, got {level!r}")
    return LEVELS[LEVELS.index(level) :]


def resolve_session(store: TrackingStore, prefix: str) -> str:
    """The one session id equal to, or else starting with, ``prefix``."""
    prefix = prefix.strip()
    if re.fullmatch(r"[0-9A-Fa-f]+", prefix):
        prefix = prefix.lower()  # session ids are lowercase hex
    if not prefix:
        raise ConfigError("--session: give a session id or the first characters of one")
    if store.get_session(prefix) is not None:
        return prefix
    flt = {"session_id": {"$regex": "^" + re.escape(prefix)}}
    ids = [d["session_id"] for d in store.find("sessions", flt, [("created_at", -1)], 6)]
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise ConfigError(f"--session {prefix}: no session id starts with it "
                          "(`fedray sessions` lists them)")  # fmt: skip
    shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
    raise ConfigError(f"--session {prefix}: matches several sessions ({shown}); "
                      "give more characters")  # fmt: skip


def _merged(query: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Both conditions; as one flat document unless they share a field (see the top)."""
    return {"$and": [query, extra]} if query.keys() & extra.keys() else {**query, **extra}


def _find(
    store: TrackingStore,
    collection: str,
    query: dict[str, Any],
    levels: tuple[str, ...] | None,
    sort: list[tuple[str, int]],
    limit: int,
) -> list[dict[str, Any]]:
    if levels is None:
        return store.find(collection, query, sort, limit)
    if "level" in query:
        return store.find(collection, _merged(query, {"level": {"$in": list(levels)}}), sort,
                          limit)  # fmt: skip
    # One indexed query per level, each already in order, merged by the sort key.
    docs: list[dict[str, Any]] = []
    for level in levels:
        docs.extend(store.find(collection, {**query, "level": level}, sort, limit))
    key, direction = sort[0]
    docs.sort(key=lambda d: (d.get(key) is not None, d.get(key)), reverse=direction < 0)
    return docs[:limit] if limit else docs


def _count(
    store: TrackingStore, collection: str, query: dict[str, Any], levels: tuple[str, ...] | None
) -> int:
    if levels is None:
        return store.count(collection, query)
    if "level" in query:
        return store.count(collection, _merged(query, {"level": {"$in": list(levels)}}))
    return sum(store.count(collection, {**query, "level": level}) for level in levels)


def to_json(docs: Sequence[Doc]) -> str:
    """One JSON array; datetimes as ISO 8601 strings, non-finite numbers as null."""
    return json.dumps([_plain(doc) for doc in docs], indent=2, ensure_ascii=False)


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


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
