#!/usr/bin/env python
"""How fast the CLI's tracking queries are on a big events collection in nx-27017.

    python bench/tracking_queries.py [--events 100000] [--sessions 20] [--repeat 3]

It starts the embedded tracking server (nx-27017, as ``fedray run`` does) in a fresh data
directory, records ``--sessions`` sessions and inserts ``--events`` events spread over
them (30% debug, 65% info, 4% warning, 1% error) with ``insert_many`` in batches, then
times what ``fedray events`` does: ``query_page`` (connect, resolve ``--session``, find,
count when the limit cuts the list off) with no option, ``--session`` (a 12-character
prefix of a session in the middle of the history), ``--level warning``, both together,
and a ``--filter`` combined with ``--level``; ``TrackingStore.count``; and the whole
command as a subprocess (Python start-up and table rendering included). For comparison it
also times the query shapes fedray avoids, because nx-27017 cannot use an index for them:
a bare equality (``{"session_id": id}``), ``$and``, a ``$in`` of levels, and pymongo's
``count_documents``.

Figures are the median of ``--repeat`` runs, in seconds. Exactly one JSON line goes to
stdout; progress goes to stderr. A check that a query returned the wrong documents makes
the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bson import ObjectId

from fedray.tracking.embedded import EmbeddedMongo
from fedray.tracking.query import query_page
from fedray.tracking.store import TrackingStore

LEVEL_WEIGHTS = (("debug", 30), ("info", 65), ("warning", 4), ("error", 1))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """The median wall time of ``repeat`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4), result


def fill(store: TrackingStore, events: int, sessions: int, batch: int) -> tuple[list[str], float]:
    """Record the sessions and insert the events; returns session ids and events/s."""
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    ids = [f"{i:04x}{ObjectId()!s:.12}" for i in range(sessions)]
    for i, sid in enumerate(ids):
        store.create_session(sid, "bench", {}, 10, "0" * 64)
        store.db.sessions.update_one({"session_id": sid},
                                     {"$set": {"created_at": t0 + timedelta(hours=i)}})
    pattern = [level for level, weight in LEVEL_WEIGHTS for _ in range(weight)]
    started = time.perf_counter()
    docs: list[dict[str, Any]] = []
    for i in range(events):
        level = pattern[(i * 37) % len(pattern)]  # spread evenly, deterministic
        docs.append({"_id": ObjectId(), "ts": t0 + timedelta(milliseconds=10 * i),
                     "level": level, "source": f"combiner-{i % 3}",
                     "session_id": ids[i * sessions // events], "round": (i // 200) % 10 + 1,
                     "message": f"event {i}: update from client-{i % 97} accepted"})
        if len(docs) == batch or i == events - 1:
            store.insert_events(docs)
            docs = []
            if (i + 1) % (batch * 4) == 0:
                log(f"  {i + 1} events inserted")
    return ids, round(events / (time.perf_counter() - started), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the data here (default: a temporary folder, removed)")
    args = parser.parse_args()

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="fr-bench-tracking-"))
    server = EmbeddedMongo(data_dir).start()
    out: dict[str, Any] = {"events": args.events, "sessions": args.sessions,
                           "loadavg_1m": [round(os.getloadavg()[0], 2)]}
    problems: list[str] = []
    try:
        uri = server.uri
        store = TrackingStore.from_uri(uri)
        store.ensure_indexes()
        log(f"inserting {args.events} events into {uri} ({data_dir}) ...")
        ids, out["insert_events_per_s"] = fill(store, args.events, args.sessions, args.batch)
        middle = ids[len(ids) // 2]
        prefix = middle[:12]
        expected_session = args.events // args.sessions  # events of one session, about
        r = args.repeat

        def page(**kw: Any) -> Any:
            return query_page(uri, "events", kw.pop("filter_json", None), 200, count=True, **kw)

        q: dict[str, float] = {}
        q["latest_200"], p = timed(lambda: page(), r)
        check(p.docs, problems, "latest", total=(p.total, args.events))
        if p.docs and p.docs[-1]["message"] != f"event {args.events - 1}: " + \
                p.docs[-1]["message"].split(": ", 1)[1]:
            problems.append("latest: the newest event is missing")
        q["session_200"], p = timed(lambda: page(session=prefix), r)
        check(p.docs, problems, "session", session=middle)
        if not p.total or abs(p.total - expected_session) > 1:
            problems.append(f"session: total {p.total}, expected about {expected_session}")
        q["level_warning_200"], p = timed(lambda: page(level="warning"), r)
        check(p.docs, problems, "level", levels=("warning", "error"))
        by_level = [d["message"] for d in p.docs]
        q["session_level_warning"], p = timed(lambda: page(session=prefix, level="warning"), r)
        warn = {"level": {"$in": ["warning", "error"]}}
        check(p.docs, problems, "session+level", session=middle, levels=("warning", "error"),
              expected=min(200, store.count("events", {"session_id": middle, **warn})))
        q["filter_source_level_warning"], p = timed(
            lambda: page(filter_json='{"source": "combiner-1"}', level="warning"), r)
        check(p.docs, problems, "filter+level", levels=("warning", "error"),
              expected=min(200, store.count("events", {"source": "combiner-1", **warn})))
        if any(d["source"] != "combiner-1" for d in p.docs):
            problems.append("filter+level: a document from another source")
        q["count_all"], _ = timed(lambda: store.count("events"), r)
        q["count_session"], n = timed(lambda: store.count("events", {"session_id": middle}), r)
        q["count_level_error"], _ = timed(lambda: store.count("events", {"level": "error"}), r)
        out["queries_s"] = q

        log("the shapes fedray avoids (for comparison) ...")
        events = store.db.events
        newest = [("ts", -1)]
        avoided: dict[str, float] = {}
        avoided["bare_equality_session_200"], _ = timed(
            lambda: list(events.find({"session_id": middle}).sort(newest).limit(200)), r)
        avoided["in_levels_200"], docs = timed(lambda: list(
            events.find({"level": {"$in": ["warning", "error"]}}).sort(newest).limit(200)), r)
        if [d["message"] for d in reversed(docs)] != by_level:
            problems.append("level: not the documents a $in query finds")
        avoided["and_session_level_200"], _ = timed(lambda: list(events.find(
            {"$and": [{"session_id": middle}, {"level": "warning"}]}).sort(newest).limit(200)), 1)
        avoided["count_documents_session"], m = timed(
            lambda: events.count_documents({"session_id": middle}), 1)
        if m != n:
            problems.append(f"count: {n} with $count, {m} with count_documents")
        out["avoided_shapes_s"] = avoided

        log("the CLI as a subprocess ...")
        cli: dict[str, float] = {}
        for name, extra in (("events", []), ("events_session", ["--session", prefix]),
                            ("events_level_warning", ["--level", "warning"])):
            cmd = [sys.executable, "-m", "fedray", "events", "--data-dir", str(data_dir), *extra]
            cli[name], _ = timed(lambda cmd=cmd: subprocess.run(
                cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "120"}), r)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import fedray.cli.main"], check=True)
        cli["python_and_imports_only"] = round(time.perf_counter() - started, 4)
        out["cli_s"] = cli
        store.close()
    finally:
        server.stop()
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    out["loadavg_1m"].append(round(os.getloadavg()[0], 2))
    out["problems"] = problems
    print(json.dumps(out))
    return 1 if problems else 0


def check(docs: list[dict[str, Any]], problems: list[str], name: str, *,
          session: str | None = None, levels: tuple[str, ...] | None = None,
          total: tuple[int | None, int] | None = None, expected: int = 200) -> None:
    """The page holds the newest ``expected`` matching documents, oldest first."""
    if len(docs) != expected:
        problems.append(f"{name}: {len(docs)} documents, expected {expected}")
    if any(a["ts"] > b["ts"] for a, b in zip(docs, docs[1:], strict=False)):
        problems.append(f"{name}: not in time order")
    if session and any(d["session_id"] != session for d in docs):
        problems.append(f"{name}: a document of another session")
    if levels and any(d["level"] not in levels for d in docs):
        problems.append(f"{name}: a document of another level")
    if total and total[0] != total[1]:
        problems.append(f"{name}: total {total[0]}, expected {total[1]}")


if __name__ == "__main__":
    sys.exit(main())
