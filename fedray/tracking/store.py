"""Tracking documents in MongoDB (or the embedded nx-27017), through pymongo only.

The controller, combiners and CLI record what happens here; users query the same
collections with any Mongo client. How the store talks to the server is in ``mongo``:
only the pymongo subset that both a real MongoDB and nx-27017 serve, and every pymongo
error translated into ``TrackingError`` once. ``indexes`` is what the collections are
indexed by.

Every write is checked against ``schema`` first (by ``checker``: an insert whole, an
update field by field), so a document never drifts from its class there; docs/tracking.md
describes each collection and field, with example queries. All timestamps are
timezone-aware UTC.

``update_*`` and ``upsert_*`` take fields as keyword arguments and ``$set`` them, so a
dotted key reaches into a sub-document: ``update_round(s, 3, **{"combiners.c0":
{...}})``. Tensor names go into a list, never into keys, because they contain dots.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from bson.codec_options import CodecOptions
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from fedray.errors import TrackingError
from fedray.text import redact
from fedray.tracking import checker, schema
from fedray.tracking.documents import clean, make_event, tensor_list, utcnow
from fedray.tracking.indexes import create_indexes
from fedray.tracking.mongo import connect, indexable, retry_duplicate, setting, translated

COLLECTIONS = (
    "sessions",
    "rounds",
    "models",
    "clients",
    "combiners",
    "validations",
    "events",
    "packages",
)

ATTEMPT_OUTCOME = ("reason", "failures", "combiners")  # what a failed attempt writes

# The methods a TrackingWriter may queue: writes only, never reads.
WRITE_METHODS = frozenset(
    {
        "ensure_indexes",
        "create_session",
        "update_session",
        "start_round",
        "update_round",
        "add_model",
        "upsert_client",
        "upsert_combiner",
        "increment_combiner_restarts",
        "add_validation",
        "add_package",
        "event",
        "insert_events",
    }
)


class TrackingStore:
    """The tracking collections of one database, behind a few intention-named methods."""

    def __init__(
        self, db: Database, *, client: MongoClient | None = None, where: str | None = None
    ) -> None:
        options = CodecOptions(tz_aware=True, tzinfo=UTC)
        self.db: Database = db.with_options(codec_options=options)
        self.where = where or f"database {db.name!r}"
        self._client = client

    @classmethod
    def from_uri(
        cls, uri: str, database: str | None = None, *, timeout_s: float = 5.0
    ) -> TrackingStore:
        """Open ``database`` (else the URI's own, else "fedray") at ``uri``.

        Connecting is lazy: an unreachable server shows up as a TrackingError on the
        first call, naming the URI.
        """
        client, db = connect(uri, database, timeout_s)
        return cls(db, client=client, where=f"{redact(uri)} (database {db.name!r})")

    def __repr__(self) -> str:
        return f"TrackingStore({self.where})"

    def close(self) -> None:
        """Close the connection pool if this store opened it (``from_uri``)."""
        if self._client is not None:
            self._client.close()

    def _translate(self, what: str) -> contextlib.AbstractContextManager[None]:
        return translated(self.where, what)

    def ping(self) -> None:
        with self._translate("ping"):
            self.db.command("ping")

    def ensure_indexes(self, events_ttl_s: int | None = None) -> None:
        """Create the indexes of ``indexes.INDEXES`` (idempotent). With ``events_ttl_s`` the
        one on ``events.ts`` is a TTL index, so MongoDB deletes events that old by itself;
        without, a TTL an earlier run set is dropped, so events are kept forever."""
        with self._translate("create indexes"):
            create_indexes(self.db, events_ttl_s)

    def prune_events(self, before: datetime) -> int:
        """Delete events stamped before ``before``; how many went (retention)."""
        with self._translate("delete expired events"):
            return int(self.db.events.delete_many({"ts": {"$lt": before}}).deleted_count)

    # sessions

    def create_session(
        self,
        session_id: str,
        federation: str,
        config: Mapping[str, Any],
        rounds_planned: int,
        model_id: str,
    ) -> bool:
        """Record a new session (status "created"); True if new, False if it existed."""
        now = utcnow()
        doc = schema.Session(
            session_id=session_id,
            federation=federation,
            status="created",
            config=clean(dict(config)),
            rounds_planned=int(rounds_planned),
            rounds_done=0,
            model_id=model_id,
            created_at=now,
            updated_at=now,
        )
        return self._insert_once("sessions", "session_id", doc)

    def update_session(self, session_id: str, **fields: Any) -> None:
        self._update("sessions", {"session_id": session_id}, fields, f"session {session_id!r}")

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        return self._find_one("sessions", {"session_id": session_id})

    def latest_session(self, federation: str | None = None) -> dict[str, Any] | None:
        """The most recently created session (of ``federation`` when given)."""
        flt = {} if federation is None else {"federation": federation}
        return self._find_one("sessions", flt, sort=[("created_at", -1), ("_id", -1)])

    # rounds

    def start_round(self, session_id: str, round: int, **fields: Any) -> None:
        """Create or restart a round: status "running", ``started_at`` now, plus fields.

        A restart drops what the failed attempt before it recorded (``ATTEMPT_OUTCOME``),
        so a round that then commits carries no reason or failures of an earlier attempt
        (the events keep those).
        """
        now = utcnow()
        update = {"status": "running", "started_at": now, "updated_at": now, **clean(fields)}
        checker.check_fields("rounds", update)
        write = setting(update)
        write["$unset"] = {name: "" for name in ATTEMPT_OUTCOME if name not in update}
        with self._translate(f"start round {round} of session {session_id!r}"):
            retry_duplicate(
                lambda: self.db.rounds.update_one(
                    {"session_id": session_id, "round": int(round)}, write, upsert=True
                )
            )

    def update_round(self, session_id: str, round: int, **fields: Any) -> None:
        flt = {"session_id": session_id, "round": int(round)}
        self._update("rounds", flt, fields, f"round {round} of session {session_id!r}")

    def get_round(self, session_id: str, round: int) -> dict[str, Any] | None:
        return self._find_one("rounds", {"session_id": session_id, "round": int(round)})

    # models, packages

    def add_model(
        self,
        model_id: str,
        parent_id: str | None,
        session_id: str | None,
        round: int | None,
        size: int,
        storage_uri: str,
        tensors: Mapping[str, Any],
    ) -> bool:
        """Add a model to the trail; True if new, False if the id was already there."""
        doc = schema.Model(
            model_id=model_id,
            parent_id=parent_id,
            session_id=session_id,
            round=None if round is None else int(round),
            size=int(size),
            storage_uri=storage_uri,
            tensors=tensor_list(tensors),  # type: ignore[typeddict-item]
            created_at=utcnow(),
        )
        return self._insert_once("models", "model_id", doc)

    def get_model(self, model_id: str) -> dict[str, Any] | None:
        return self._find_one("models", {"model_id": model_id})

    def add_package(self, sha256: str, **fields: Any) -> bool:
        """Record a compute package by checksum; True if new."""
        doc = {"sha256": sha256, **clean(fields), "created_at": utcnow()}
        return self._insert_once("packages", "sha256", doc)

    # clients, combiners

    def upsert_client(self, client_id: str, **fields: Any) -> None:
        """Create or update an edge client; ``last_seen`` is now unless given. A document
        this creates has every required field (defaults for those not given)."""
        now = utcnow()
        fields = {"last_seen": now, **clean(fields)}
        self._upsert("clients", {"client_id": client_id}, fields,
                     {"first_seen": now, **_new_client(client_id)})

    def upsert_combiner(self, name: str, **fields: Any) -> None:
        fields = {"updated_at": utcnow(), **clean(fields)}
        self._upsert("combiners", {"name": name}, fields, {"restarts": 0, **NEW_COMBINER})

    def increment_combiner_restarts(self, name: str) -> None:
        """Count one more restart of combiner ``name`` (not idempotent: a counter)."""
        update = {"$inc": {"restarts": 1}, **setting({"updated_at": utcnow()}),
                  "$setOnInsert": dict(NEW_COMBINER)}
        with self._translate(f"count a restart of combiner {name!r}"):
            retry_duplicate(
                lambda: self.db.combiners.update_one({"name": name}, update, upsert=True)
            )

    # validations, events

    def add_validation(self, doc: dict[str, Any]) -> None:
        """Insert one client's metrics for one model; ``ts`` defaults to now.

        Like pymongo's ``insert_one``, this sets ``_id`` on ``doc`` itself, so calling it
        again with the same dict (a retry) never stores it twice.
        """
        if not isinstance(doc, dict):
            raise TypeError(f"a validation is a dict, got {type(doc).__name__}")
        doc.setdefault("_id", ObjectId())
        doc.setdefault("ts", utcnow())
        stored = clean(doc)
        checker.validate("validations", stored)
        with self._translate("add a validation"), contextlib.suppress(DuplicateKeyError):
            self.db.validations.insert_one(stored)

    def event(
        self,
        level: str,
        source: str,
        message: str,
        *,
        session_id: str | None = None,
        round: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an event (level is one of debug, info, warning, error)."""
        doc = make_event(level, source, message, session_id=session_id, round=round, data=data)
        self.insert_events([doc])

    def insert_events(self, docs: Sequence[dict[str, Any]]) -> None:
        """Insert event documents made by ``make_event``; ones already stored are skipped."""
        if not docs:
            return
        for doc in docs:
            checker.validate("events", doc)
        with self._translate(f"insert {len(docs)} event(s)"):
            try:
                self.db.events.insert_many(list(docs), ordered=False)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if not errors or any(e.get("code") != 11000 for e in errors):
                    raise

    # queries

    def find(
        self,
        collection: str,
        filter: Mapping[str, Any] | None = None,
        sort: Sequence[tuple[str, int]] | None = None,
        limit: int = 0,
    ) -> list[dict[str, Any]]:
        """Documents of ``collection`` matching ``filter``, without ``_id``."""
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown tracking collection {collection!r}")
        with self._translate(f"query {collection}"):
            cursor = self.db[collection].find(indexable(filter), {"_id": 0})
            if sort:
                cursor = cursor.sort(list(sort))
            if limit:
                cursor = cursor.limit(int(limit))
            return list(cursor)

    def find_with_ids(self, collection: str, filter: Mapping[str, Any] | None = None,
                      sort: Sequence[tuple[str, int]] | None = None,
                      limit: int = 0) -> list[dict[str, Any]]:
        """Like ``find``, with each document's ``_id`` (a tail tells documents apart by it)."""
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown tracking collection {collection!r}")
        with self._translate(f"query {collection}"):
            cursor = self.db[collection].find(indexable(filter))
            if sort:
                cursor = cursor.sort(list(sort))
            if limit:
                cursor = cursor.limit(int(limit))
            return list(cursor)

    def count(self, collection: str, filter: Mapping[str, Any] | None = None) -> int:
        """How many documents of ``collection`` match ``filter``.

        Not ``count_documents``: pymongo sends it as ``$match`` + ``$group``, which
        nx-27017 evaluates in Python (5 s over 100k events), while ``$match`` + ``$count``
        runs as SQL (10-200 ms) and means the same on MongoDB.
        """
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown tracking collection {collection!r}")
        pipeline = [{"$match": indexable(filter)}, {"$count": "n"}]
        with self._translate(f"count {collection}"):
            result = list(self.db[collection].aggregate(pipeline))
        return int(result[0]["n"]) if result else 0

    # helpers

    def _find_one(
        self, collection: str, flt: dict[str, Any], sort: list[tuple[str, int]] | None = None
    ) -> dict[str, Any] | None:
        with self._translate(f"read {collection}"):
            return self.db[collection].find_one(indexable(flt), {"_id": 0}, sort=sort)

    def _insert_once(self, collection: str, key: str, doc: Mapping[str, Any]) -> bool:
        """Insert ``doc`` unless a document with its ``key`` exists; True if inserted."""
        checker.validate(collection, doc)
        rest = {k: v for k, v in doc.items() if k != key}
        with self._translate(f"insert into {collection}"):
            result = retry_duplicate(
                lambda: self.db[collection].update_one(
                    {key: doc[key]}, {"$setOnInsert": rest}, upsert=True
                )
            )
        return result.upserted_id is not None

    def _update(
        self, collection: str, flt: dict[str, Any], fields: dict[str, Any], what: str
    ) -> None:
        update = {**clean(fields), "updated_at": utcnow()}
        checker.check_fields(collection, update)
        with self._translate(f"update {what}"):
            result = self.db[collection].update_one(flt, setting(update))
        if result.matched_count == 0:
            raise TrackingError(f"tracking database {self.where}: no {what} to update")

    def _upsert(
        self, collection: str, key: dict[str, Any], fields: dict[str, Any], defaults: dict[str, Any]
    ) -> None:
        on_insert = {k: v for k, v in defaults.items() if k not in fields}
        checker.check_fields(collection, {**fields, **on_insert})
        update = setting(fields)
        if on_insert:
            update["$setOnInsert"] = on_insert
        with self._translate(f"upsert into {collection}"):
            retry_duplicate(lambda: self.db[collection].update_one(key, update, upsert=True))


# What an upsert gives a new document for the required fields its write did not name
# (a combiner's client count can land before its address): docs/tracking.md's "required".
NEW_COMBINER = {"address": "", "status": "online"}


def _new_client(client_id: str) -> dict[str, Any]:
    return {"name": client_id, "combiner": "", "status": "offline"}
