"""The tracking indexes: which lookups they serve, and the TTL that bounds the events.

``TrackingStore.ensure_indexes`` creates them (idempotently; the controller's writer does
so before its first write). Kept apart from ``store`` because the list is a decision of
its own, checked against the schema and measured by bench/tracking_queries.py, and the
TTL index on ``events.ts`` needs handling that differs between MongoDB and nx-27017.
"""

from __future__ import annotations

from pymongo import ASCENDING
from pymongo.database import Database
from pymongo.errors import OperationFailure

# (keys, unique) per collection: what the controller, the CLI and ``find`` look up, and
# the sorts of the CLI's listings (``query._ORDER``): newest first, filtered by session or
# event level. bench/tracking_queries.py measures them.
INDEXES: dict[str, list[tuple[tuple[str, ...], bool]]] = {
    "sessions": [
        (("session_id",), True), (("federation", "created_at"), False), (("created_at",), False),
    ],
    "rounds": [(("session_id", "round"), True), (("started_at",), False)],
    "models": [(("model_id",), True), (("session_id", "round"), False), (("created_at",), False)],
    "clients": [(("client_id",), True), (("last_seen",), False)],
    "combiners": [(("name",), True)],
    "validations": [(("session_id", "round"), False), (("session_id", "ts"), False),
                    (("ts",), False)],
    "events": [(("session_id", "ts"), False), (("level", "ts"), False), (("ts",), False)],
    "packages": [(("sha256",), True)],
}  # fmt: skip


def create_indexes(db: Database, events_ttl_s: int | None = None) -> None:
    """Create the indexes of ``INDEXES`` (idempotent); the one on ``events.ts`` is a TTL
    index of ``events_ttl_s``, or a plain one without (an earlier TTL is dropped)."""
    for collection, indexes in INDEXES.items():
        for keys, unique in indexes:
            if (collection, keys) == ("events", ("ts",)):
                _events_ts_index(db, int(events_ttl_s or 0))
                continue
            db[collection].create_index([(key, ASCENDING) for key in keys], unique=unique)


def _events_ts_index(db: Database, seconds: int) -> None:
    if seconds:
        _ttl_index(db, seconds)
        return
    for name, spec in db.events.index_information().items():
        if [key for key, _ in spec.get("key", [])] == ["ts"] and "expireAfterSeconds" in spec:
            db.events.drop_index(name)  # a plain create_index keeps an old TTL
    db.events.create_index([("ts", ASCENDING)])


def _ttl_index(db: Database, seconds: int) -> None:
    try:
        db.events.create_index([("ts", ASCENDING)], expireAfterSeconds=seconds)
    except OperationFailure as exc:
        if exc.code not in (85, 86):  # IndexOptionsConflict / IndexKeySpecsConflict
            raise
        # MongoDB: the index exists with another (or no) TTL; nx-27017 updates in place.
        db.command("collMod", "events",
                   index={"keyPattern": {"ts": 1}, "expireAfterSeconds": seconds})
