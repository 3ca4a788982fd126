"""Per-client tokens in the ``tokens`` tracking collection: created, listed, revoked.

A token is shown once, when it is created, and only its sha256 is stored: the token is
32 random bytes, so a hash without a salt or a slow KDF is enough (nobody can guess a
preimage), and servers can look a presented token up by its hash. One document per token:

    tokens   hash (unique, sha256 hex of the token), name, created_at, revoked (bool),
             revoked_at

The gateway and combiners read the collection every few seconds (``fedray.actors.auth``),
so new tokens and revocations take effect without a restart. The collection is kept out
of ``store.COLLECTIONS``: the generic query commands should not list token hashes.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

from pymongo import ASCENDING
from pymongo.errors import PyMongoError

from fedray.errors import ConfigError, TrackingError
from fedray.tracking.documents import utcnow
from fedray.tracking.store import TrackingStore, _setting

COLLECTION = "tokens"
PREFIX = "frt_"  # makes a leaked token easy to recognise (and to grep for)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"--name {name!r}: 1-128 letters, digits, '.', '_', '@' or '-', "
                          "starting with a letter or digit")


def _fail(store: TrackingStore, what: str, exc: PyMongoError) -> TrackingError:
    return TrackingError(f"tracking database {store.where}: {what}: {str(exc)[:300]}")


def create_token(store: TrackingStore, name: str) -> str:
    """Store a new token for client ``name`` and return it (the only time it is seen)."""
    _check_name(name)
    tokens = store.db[COLLECTION]
    try:
        tokens.create_index([("hash", ASCENDING)], unique=True)
        tokens.create_index([("name", ASCENDING)])
        if tokens.find_one({"name": {"$eq": name}, "revoked": {"$eq": False}}) is not None:
            raise ConfigError(f"client {name!r} already has a token; revoke it first "
                              f"(fedray token revoke --name {name})")
        token = PREFIX + secrets.token_urlsafe(32)
        tokens.insert_one({"hash": hash_token(token), "name": name, "created_at": utcnow(),
                           "revoked": False, "revoked_at": None})
    except PyMongoError as exc:
        raise _fail(store, f"create a token for {name!r}", exc) from exc
    return token


def revoke_token(store: TrackingStore, name: str) -> int:
    """Revoke every live token of ``name``; how many were revoked (0: none was live)."""
    tokens = store.db[COLLECTION]
    try:
        live = list(tokens.find({"name": {"$eq": name}, "revoked": {"$eq": False}}, {"hash": 1}))
        for doc in live:
            tokens.update_one({"hash": doc["hash"]},
                              _setting({"revoked": True, "revoked_at": utcnow()}))
    except PyMongoError as exc:
        raise _fail(store, f"revoke the token of {name!r}", exc) from exc
    return len(live)


def list_tokens(store: TrackingStore) -> list[dict[str, Any]]:
    """Every token's name, short id (hash prefix), state and times, oldest first."""
    try:
        docs = list(store.db[COLLECTION].find({}, {"_id": 0}).sort([("created_at", 1)]))
    except PyMongoError as exc:
        raise _fail(store, "list tokens", exc) from exc
    return [{"name": d.get("name"), "id": str(d.get("hash", ""))[:12],
             "created_at": d.get("created_at"), "revoked": bool(d.get("revoked")),
             "revoked_at": d.get("revoked_at")} for d in docs]


def read_token_hashes(store: TrackingStore) -> list[tuple[str, str, bool]]:
    """(hash, name, revoked) of every token: what a server caches to check callers."""
    try:
        docs = store.db[COLLECTION].find({}, {"_id": 0, "hash": 1, "name": 1, "revoked": 1})
        return [(str(d["hash"]), str(d["name"]), bool(d.get("revoked"))) for d in docs
                if d.get("hash") and d.get("name")]
    except PyMongoError as exc:
        raise _fail(store, "read tokens", exc) from exc
