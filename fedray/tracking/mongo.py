"""How tracking talks to its server: connecting, pymongo errors, and nx-27017's quirks.

Only the pymongo subset that both a real MongoDB and nx-27017 serve is used
(find/sort/limit/projection, insert_one/insert_many, update_one with
``$set``/``$setOnInsert``/``$unset``/``$inc`` and upsert, create_index, aggregate with
``$match``/``$count``). Where nx-27017 reads a query or update differently, the form both
read the same is built here (``setting``, ``indexable``). Every pymongo error is
translated into ``TrackingError`` once (``translated``), and ``is_transient`` tells a
connection problem (worth retrying) from a refused write.

Kept apart from ``store`` so that ``TrackingStore`` is only the collections' methods, and
``tokens`` and the writer use the same idioms without reaching into the store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC
from typing import Any, TypeVar

from bson.errors import BSONError
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, DuplicateKeyError, PyMongoError

from fedray.config import DEFAULT_DATABASE
from fedray.errors import TrackingError
from fedray.text import redact

T = TypeVar("T")

# Top-level fields that always hold one string or integer. ``find`` and ``count`` write an
# equality on them as ``{"$eq": value}``: the same query for MongoDB, but nx-27017 turns a
# bare ``{"field": value}`` into "equal, or an array containing it", which no index can
# serve (a full scan: 0.2 s per 100k events), while ``$eq`` becomes a plain indexed
# comparison (4 ms).
SCALAR_FIELDS = frozenset(
    {"session_id", "federation", "status", "round", "model_id", "parent_id", "client_id",
     "name", "combiner", "level", "source", "sha256"}
)  # fmt: skip

_NO_SUCH_FIELD = "_fedray_never_set"  # see setting


def connect(uri: str, database: str | None, timeout_s: float) -> tuple[MongoClient, Database]:
    """A client for ``uri`` and its ``database`` (else the URI's own, else "fedray").

    Connecting is lazy: an unreachable server shows up on the first call. A URI pymongo
    refuses, or TLS files it cannot read, are a TrackingError naming the URI (redacted).
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
        raise TrackingError(f"tracking database {shown}: {short(exc)}") from exc
    except OSError as exc:  # pymongo reads the URI's TLS files (tlsCAFile, ...) now
        raise TrackingError(f"tracking database {shown}: {exc.strerror or exc}; check the "
                            "paths of the URI's tlsCAFile and tlsCertificateKeyFile") from exc
    return client, db


@contextlib.contextmanager
def translated(where: str, what: str) -> Iterator[None]:
    """Raise what fails inside as a TrackingError: "tracking database <where>: <what>: ..."."""
    try:
        yield
    except (PyMongoError, BSONError, OverflowError) as exc:  # OverflowError: BSON ints
        raise TrackingError(f"tracking database {where}: {what}: {short(exc)}") from exc


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


def retry_duplicate(write: Callable[[], T]) -> T:
    """Run ``write`` (an upsert), once more if it lost a race on a unique index."""
    # Two concurrent upserts of a new key can race on a unique index in MongoDB; the
    # loser's retry then finds the winner's document and updates it.
    try:
        return write()
    except DuplicateKeyError:
        return write()


def setting(fields: dict[str, Any]) -> dict[str, Any]:
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


def short(exc: BaseException) -> str:
    """The first useful part of a pymongo message (they can embed a topology dump)."""
    text = str(exc).split(", Timeout:")[0].split(", full error:")[0].strip()
    return text if len(text) <= 300 else text[:297] + "..."
