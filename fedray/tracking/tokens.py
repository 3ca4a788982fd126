"""Per-client tokens in the ``tokens`` tracking collection: created, listed, revoked.

A token is shown once, when it is created. Tracking stores only a keyed hash of it,
HMAC-SHA256 under the federation's token secret (``fedray.bridge.keys``: a 0600 file under the
data directory, never in tracking), and a MAC binding that hash to the client's name.
Servers look a presented token up by its keyed hash and trust a row only when its MAC
checks out, so tracking's integrity is not needed: a row written by someone without the
secret (the embedded server has no authentication) verifies nothing, and a renamed row
verifies as nobody. One document per token (``schema.Token``, docs/tracking.md): the
keyed hash, the name, the MAC, created/revoked times, and ``live_name`` (= name, only
while the token is live: a unique index on it means one live token per name, however
many ``fedray token create`` run at once).

The gateway and combiners read the collection every few seconds (``fedray.bridge.auth``),
so new tokens and revocations take effect without a restart. The collection is kept out
of ``store.COLLECTIONS``: the generic query commands should not list token hashes.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from fedray.bridge.keys import hash_token, row_mac
from fedray.errors import ConfigError, TrackingError
from fedray.tracking import checker, schema
from fedray.tracking.documents import utcnow
from fedray.tracking.mongo import setting
from fedray.tracking.schema import TOKENS
from fedray.tracking.store import TrackingStore

COLLECTION = "tokens"
PREFIX = "frt_"  # makes a leaked token easy to recognise (and to grep for)
MAX_ROWS = 100_000  # token rows a server reads (a flood of forged rows is bounded too)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"--name {name!r}: 1-128 letters, digits, '.', '_', '@' or '-', "
                          "starting with a letter or digit")


def _fail(store: TrackingStore, what: str, exc: PyMongoError) -> TrackingError:
    return TrackingError(f"tracking database {store.where}: {what}: {str(exc)[:300]}")


def create_token(store: TrackingStore, name: str, secret: bytes) -> str:
    """Store a new token for client ``name`` and return it (the only time it is seen)."""
    _check_name(name)
    tokens = store.db[COLLECTION]
    token = PREFIX + secrets.token_urlsafe(32)
    digest = hash_token(token, secret)
    doc = schema.Token(hash=digest, name=name, mac=row_mac(secret, digest, name),
                       live_name=name, created_at=utcnow(), revoked=False, revoked_at=None)
    checker.validate(COLLECTION, doc)
    try:
        tokens.create_index([(TOKENS.hash, ASCENDING)], unique=True)
        tokens.create_index([(TOKENS.name, ASCENDING)])
        tokens.create_index([(TOKENS.live_name, ASCENDING)], unique=True, sparse=True)
        tokens.insert_one(doc)
    except DuplicateKeyError:
        raise ConfigError(f"client {name!r} already has a token; revoke it first "
                          f"(fedray token revoke --name {name})") from None
    except PyMongoError as exc:
        raise _fail(store, f"create a token for {name!r}", exc) from exc
    return token


def revoke_token(store: TrackingStore, name: str) -> int:
    """Revoke every live token of ``name``; how many were revoked (0: none was live)."""
    tokens = store.db[COLLECTION]
    try:
        live = list(tokens.find({TOKENS.name: {"$eq": name}, TOKENS.revoked: {"$eq": False}},
                                {TOKENS.hash: 1}))
        for doc in live:
            revoked = {"revoked": True, "revoked_at": utcnow()}
            checker.check_fields(COLLECTION, revoked)
            update = setting(revoked)
            update["$unset"] = {TOKENS.live_name: ""}
            tokens.update_one({TOKENS.hash: doc[TOKENS.hash]}, update)
    except PyMongoError as exc:
        raise _fail(store, f"revoke the token of {name!r}", exc) from exc
    return len(live)


def list_tokens(store: TrackingStore) -> list[dict[str, Any]]:
    """Every token's name, short id (hash prefix), state and times, oldest first."""
    try:
        docs = list(store.db[COLLECTION].find({}, {"_id": 0}).sort([(TOKENS.created_at, 1)]))
    except PyMongoError as exc:
        raise _fail(store, "list tokens", exc) from exc
    return [{"name": d.get(TOKENS.name), "id": str(d.get(TOKENS.hash, ""))[:12],
             "created_at": d.get(TOKENS.created_at), "revoked": bool(d.get(TOKENS.revoked)),
             "revoked_at": d.get(TOKENS.revoked_at)} for d in docs]


def read_token_hashes(store: TrackingStore) -> list[tuple[str, str, bool, str]]:
    """(hash, name, revoked, mac) of every token (at most ``MAX_ROWS``): what a server
    caches to check callers, once it has verified each row's MAC."""
    try:
        wanted = (TOKENS.hash, TOKENS.name, TOKENS.revoked, TOKENS.mac)
        docs = store.db[COLLECTION].find({}, {"_id": 0, **dict.fromkeys(wanted, 1)})
        return [(str(d[TOKENS.hash]), str(d[TOKENS.name]), bool(d.get(TOKENS.revoked)),
                 str(d.get(TOKENS.mac, ""))) for d in docs.limit(MAX_ROWS)
                if d.get(TOKENS.hash) and d.get(TOKENS.name)]
    except PyMongoError as exc:
        raise _fail(store, "read tokens", exc) from exc


def tracking_token_loader(uri: str | None, database: str,
                          ) -> tuple[Callable[[], list[tuple[str, str, bool, str]]] | None,
                                     Callable[[], None] | None]:
    """A loader reading the ``tokens`` collection (None without tracking), and its close:
    what ``fedray.bridge.client_tokens.ClientTokens`` refreshes from."""
    if not uri:
        return None, None
    opened: list[TrackingStore] = []

    def load() -> list[tuple[str, str, bool]]:
        if not opened:
            opened.append(TrackingStore.from_uri(uri, database, timeout_s=2.0))
        return read_token_hashes(opened[0])

    def close() -> None:
        for store in opened:
            store.close()

    return load, close
