"""Tracking documents in MongoDB (or the embedded nx-27017), through pymongo only.

The controller, combiners and CLI record what happens here; users query the same
collections with any Mongo client. Only the pymongo subset that both a real MongoDB and
nx-27017 serve is used (find/sort/limit/projection, insert_one/insert_many, update_one
with ``$set``/``$setOnInsert``/``$unset``/``$inc`` and upsert, create_index, aggregate
with ``$match``/``$count``), and every pymongo error
is translated into ``TrackingError`` here, once. ``is_transient`` tells a connection
problem (worth retrying) from a refused write.

Every write is checked against ``schema`` first (an insert whole, an update field by
field), so a document never drifts from its class there; docs/tracking.md describes each
collection and field, with example queries. All timestamps are timezone-aware UTC.

``update_*`` and ``upsert_*`` take fields as keyword arguments and ``$set`` them, so a
dotted key reaches into a sub-document: ``update_round(s, 3, **{"combiners.c0":
{...}})``. Tensor names go into a list, never into keys, because they contain dots.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from bson.codec_options import CodecOptions
from bson.errors import BSONError
from pymongo import ASCENDING, MongoClient
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from fedray.config import DEFAULT_DATABASE
from fedray.errors import TrackingError
from fedray.text import redact
from fedray.tracking import checker, schema
from fedray.tracking.documents import clean, make_event, tensor_list, utcnow

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

# Top-level fields that always hold one string or integer. ``find`` and ``count`` write an
# equality on them as ``{"$eq": value}``: the same query for MongoDB, but nx-27017 turns a
# bare ``{"field": value}`` into "equal, or an array containing it", which no index can
# serve (a full scan: 0.2 s per 100k events), while ``$eq`` becomes a plain indexed
# comparison (4 ms).
SCALAR_FIELDS = frozenset(
    {"session_id", "federation", "status", "round", "model_id", "parent_id", "client_id",
     "name", "combiner", "level", "source", "sha256"}
)  # fmt: skip

_NO_SUCH_FIELD = "_fedray_never_set"  # see _setting
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


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a connection problem worth a retry."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ConnectionFailure):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


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
        shown = redact(uri)
        ms = int(timeout_s * 1000)
        try:
            client: MongoClient = MongoClient(
                uri,
                serverSelectionTimeoutMS=ms,
                connectTimeoutMS=ms,
                socketTimeoutMS=60_000,
                tz_aware=True,
                tzinfo=UTC,
                appname="fedray",
            )
            if database is None:
                db = client.get_default_database(default=DEFAULT_DATABASE)
            else:
                db = client[database]
        except (PyMongoError, ValueError, TypeError) as exc:
            raise TrackingError(f"tracking database {shown}: {_short(exc)}") from exc
        except OSError as exc:  # pymongo reads the URI's TLS files (tlsCAFile, ...) now
            raise TrackingError(f"tracking database {shown}: {exc.strerror or exc}; check the "
                                "paths of the URI's tlsCAFile and tlsCertificateKeyFile") from exc
        return cls(db, client=client, where=f"{shown} (database {db.name!r})")

    def __repr__(self) -> str:
        return f"TrackingStore({self.where})"

    def close(self) -> None:
        """Close the connection pool if this store opened it (``from_uri``)."""
        if self._client is not None:
            self._client.close()

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except (PyMongoError, BSONError, OverflowError) as exc:  # OverflowError: BSON ints
            raise TrackingError(f"tracking database {self.where}: {what}: {_short(exc)}") from exc

    def ping(self) -> None:
        with self._translate("ping"):
            self.db.command("ping")

    def ensure_indexes(self, events_ttl_s: int | None = None) -> None:
        """Create the indexes of ``INDEXES`` (idempotent). With ``events_ttl_s`` the one on
        ``events.ts`` is a TTL index, so MongoDB deletes events that old by itself; without,
        a TTL an earlier run set is dropped, so events are kept forever."""
        with self._translate("create indexes"):
            for collection, indexes in INDEXES.items():
                for keys, unique in indexes:
                    if (collection, keys) == ("events", ("ts",)):
                        self._events_ts_index(int(events_ttl_s or 0))
                        continue
                    self.db[collection].create_index(
                        [(key, ASCENDING) for key in keys], unique=unique
                    )

    def _events_ts_index(self, seconds: int) -> None:
        if seconds:
            self._ttl_index(seconds)
            return
        for name, spec in self.db.events.index_information().items():
            if [key for key, _ in spec.get("key", [])] == ["ts"] and "expireAfterSeconds" in spec:
                self.db.events.drop_index(name)  # a plain create_index keeps an old TTL
        self.db.events.create_index([("ts", ASCENDING)])

    def _ttl_index(self, seconds: int) -> None:
        try:
            self.db.events.create_index([("ts", ASCENDING)], expireAfterSeconds=seconds)
        except OperationFailure as exc:
            if exc.code not in (85, 86):  # IndexOptionsConflict / IndexKeySpecsConflict
                raise
            # MongoDB: the index exists with another (or no) TTL; nx-27017 updates in place.
            self.db.command("collMod", "events",
                            index={"keyPattern": {"ts": 1}, "expireAfterSeconds": seconds})

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
        write = _setting(update)
        write["$unset"] = {name: "" for name in ATTEMPT_OUTCOME if name not in update}
        with self._translate(f"start round {round} of session {session_id!r}"):
            self._retry_dup(
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
        update = {"$inc": {"restarts": 1}, **_setting({"updated_at": utcnow()}),
                  "$setOnInsert": dict(NEW_COMBINER)}
        with self._translate(f"count a restart of combiner {name!r}"):
            self._retry_dup(
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
            result = self._retry_dup(
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
            result = self.db[collection].update_one(flt, _setting(update))
        if result.matched_count == 0:
            raise TrackingError(f"tracking database {self.where}: no {what} to update")

    def _upsert(
        self, collection: str, key: dict[str, Any], fields: dict[str, Any], defaults: dict[str, Any]
    ) -> None:
        on_insert = {k: v for k, v in defaults.items() if k not in fields}
        checker.check_fields(collection, {**fields, **on_insert})
        update = _setting(fields)
        if on_insert:
            update["$setOnInsert"] = on_insert
        with self._translate(f"upsert into {collection}"):
            self._retry_dup(lambda: self.db[collection].update_one(key, update, upsert=True))

    @staticmethod
    def _retry_dup(write: Any) -> Any:
        # Two concurrent upserts of a new key can race on a unique index in MongoDB; the
        # loser's retry then finds the winner's document and updates it.
        try:
            return write()
        except DuplicateKeyError:
            return write()


# What an upsert gives a new document for the required fields its write did not name
# (a combiner's client count can land before its address): docs/tracking.md's "required".
NEW_COMBINER = {"address": "", "status": "online"}


def _new_client(client_id: str) -> dict[str, Any]:
    return {"name": client_id, "combiner": "", "status": "offline"}


def _setting(fields: dict[str, Any]) -> dict[str, Any]:
    """The update document ``{"$set": fields}``, safe for datetimes on nx-27017.

    nx-27017 0.8.1 stores a datetime that ``$set`` writes into an existing document as a
    plain string (its SQL update path binds it as text). A ``$pull`` on a field that never
    exists sends the update down its Python path, which keeps the type; on MongoDB that
    ``$pull`` is a no-op. ``test_tracking`` checks the types, so a server that changes
    this shows up there.
    """
    return {"$set": fields, "$pull": {_NO_SUCH_FIELD: None}}


def indexable(filter: Mapping[str, Any] | None) -> dict[str, Any]:
    """``filter`` with equalities on ``SCALAR_FIELDS`` written as ``$eq`` (see there)."""
    query = dict(filter or {})
    for key, value in query.items():
        if key in SCALAR_FIELDS and (isinstance(value, str) or type(value) is int):
            query[key] = {"$eq": value}
    return query


def _short(exc: BaseException) -> str:
    """The first useful part of a pymongo message (they can embed a topology dump)."""
    text = str(exc).split(", Timeout:")[0].split(", full error:")[0].strip()
    return text if len(text) <= 300 else text[:297] + "..."
