"""What the CLI's query commands need: run a filtered query, show it as a table or JSON.

``fedray sessions|rounds|models|clients|events|validations [--filter JSON] [--json]``
call ``query_page`` (or ``run_query``) and then ``to_json`` or ``tables.render_table``. Filters
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import ObjectId, json_util

from fedray.errors import ConfigError
from fedray.tracking.documents import LEVELS
from fedray.tracking.schema import (
    CLIENTS,
    COMBINERS,
    EVENTS,
    MODELS,
    PACKAGES,
    ROUNDS,
    SESSIONS,
    VALIDATIONS,
)
from fedray.tracking.store import COLLECTIONS, TrackingStore
from fedray.tracking.tables import render_table

__all__ = ["Page", "follow_query", "levels_from", "parse_filter", "plain", "query_page",
           "render_table", "resolve_session", "run_query", "to_json", "to_json_line"]

Doc = Mapping[str, Any]

# collection -> (sort for the query, show oldest first)
_ORDER: dict[str, tuple[list[tuple[str, int]], bool]] = {
    "sessions": ([(SESSIONS.created_at, -1)], False),
    "rounds": ([(ROUNDS.started_at, -1)], True),
    "models": ([(MODELS.created_at, -1)], True),
    "clients": ([(CLIENTS.last_seen, -1)], False),
    "combiners": ([(COMBINERS.name, 1)], False),
    "validations": ([(VALIDATIONS.ts, -1)], True),
    "events": ([(EVENTS.ts, -1)], True),
    "packages": ([(PACKAGES.created_at, -1)], False),
}


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
            query = _merged(query, {ROUNDS.session_id: resolve_session(store, session)})
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
    flt = {SESSIONS.session_id: {"$regex": "^" + re.escape(prefix)}}
    ids = [d[SESSIONS.session_id]
           for d in store.find("sessions", flt, [(SESSIONS.created_at, -1)], 6)]
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
    if EVENTS.level in query:
        return store.find(collection, _merged(query, {EVENTS.level: {"$in": list(levels)}}),
                          sort, limit)  # fmt: skip
    # One indexed query per level, each already in order, merged by the sort key.
    docs: list[dict[str, Any]] = []
    for level in levels:
        docs.extend(store.find(collection, {**query, EVENTS.level: level}, sort, limit))
    key, direction = sort[0]
    docs.sort(key=lambda d: (d.get(key) is not None, d.get(key)), reverse=direction < 0)
    return docs[:limit] if limit else docs


def _count(
    store: TrackingStore, collection: str, query: dict[str, Any], levels: tuple[str, ...] | None
) -> int:
    if levels is None:
        return store.count(collection, query)
    if EVENTS.level in query:
        return store.count(collection, _merged(query, {EVENTS.level: {"$in": list(levels)}}))
    return sum(store.count(collection, {**query, EVENTS.level: level}) for level in levels)


def follow_query(uri: str, collection: str, filter_json: str | None = None, *,
                 database: str | None = None, session: str | None = None,
                 level: str | None = None, after: Sequence[Doc] = ()) -> Iterator[Doc]:
    """The documents of ``collection`` (events or rounds) that land from now on, or after
    the last of ``after``, as they land (``fedray.tracking.tail``; endless)."""
    from fedray.tracking.tail import Tail

    field = {"events": EVENTS.ts, "rounds": "updated_at"}.get(collection)
    if field is None:
        raise ConfigError(f"--follow applies to events and rounds, not to {collection}")
    query = parse_filter(filter_json)
    levels = levels_from(level, collection)
    store = TrackingStore.from_uri(uri, database)
    try:
        if session is not None:
            query = _merged(query, {ROUNDS.session_id: resolve_session(store, session)})
        if levels is not None:
            query = _merged(query, {EVENTS.level: {"$in": list(levels)}})
        stamps = [d.get(field) for d in after if isinstance(d.get(field), datetime)]
        tail = Tail(store, collection, query, field, max(stamps) if stamps else None)
        known = {_identity(d) for d in after}
        for doc in tail.follow():
            if _identity(doc) not in known:
                yield doc
    finally:
        store.close()


def _identity(doc: Doc) -> str:
    return json.dumps(_plain({k: v for k, v in doc.items() if k != "_id"}), sort_keys=True)


def to_json_line(doc: Doc) -> str:
    """One document as one line of JSON (for ``--follow --json``)."""
    return json.dumps(_plain(doc), ensure_ascii=False, allow_nan=False)


def to_json(docs: Sequence[Doc]) -> str:
    """One JSON array; datetimes as ISO 8601 strings, non-finite numbers as null."""
    return json.dumps([_plain(doc) for doc in docs], indent=2, ensure_ascii=False,
                      allow_nan=False)


# formatting helpers


def plain(value: Any) -> Any:
    """A document as JSON can hold it: datetimes as ISO 8601, ids as text, no NaN."""
    return _plain(value)


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

