"""Credentials in the ``tokens`` tracking collection: created, listed, revoked.

Three kinds of row (``fedray.bridge.keys.TokenRow``): a client's public key (``fedray
client add``: the federation never sees the private key), a client's bearer token
(``fedray token create --name``) and a shared token (``fedray token create --shared``:
any name, like ``$FEDRAY_TOKEN``, but with an expiry and revocable by its id). A token
is shown once, when it is created. Tracking stores only a keyed hash of it,
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
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from fedray.bridge.identity import fingerprint
from fedray.bridge.keys import KINDS, TokenRow, hash_token
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


def _insert(store: TrackingStore, row: TokenRow, secret: bytes, live: bool,
            attrs: dict[str, str] | None = None) -> None:
    """Store ``row`` signed under ``secret``; ``live`` rows hold their name (one live
    credential per client)."""
    row = row.signed(secret)
    doc = schema.Token(hash=row.hash, name=row.name, mac=row.mac, kind=row.kind,
                       created_at=utcnow(), revoked=False, revoked_at=None,
                       expires_at=_when(row.expires_at))
    if live:
        doc["live_name"] = row.name
    if row.public_key:
        doc["public_key"] = row.public_key
    if attrs:
        doc["attrs"] = dict(attrs)
    checker.validate(COLLECTION, doc)
    tokens = store.db[COLLECTION]
    try:
        tokens.create_index([(TOKENS.hash, ASCENDING)], unique=True)
        tokens.create_index([(TOKENS.name, ASCENDING)])
        tokens.create_index([(TOKENS.live_name, ASCENDING)], unique=True, sparse=True)
        tokens.insert_one(doc)
    except DuplicateKeyError:
        raise ConfigError(f"client {row.name!r} already has a credential; revoke it first "
                          f"(fedray client revoke {row.name})") from None
    except PyMongoError as exc:
        raise _fail(store, f"store a credential for {row.name!r}", exc) from exc


def _when(expires_at: float | None) -> datetime | None:
    return None if expires_at is None else datetime.fromtimestamp(expires_at, UTC)


def create_token(store: TrackingStore, name: str, secret: bytes,
                 expires_at: float | None = None) -> str:
    """Store a new token for client ``name`` and return it (the only time it is seen)."""
    _check_name(name)
    token = PREFIX + secrets.token_urlsafe(32)
    _insert(store, TokenRow(hash_token(token, secret), name, expires_at=expires_at), secret,
            live=True)
    return token


def create_shared_token(store: TrackingStore, secret: bytes,
                        expires_at: float | None = None) -> tuple[str, str]:
    """A new shared token and its id (what ``fedray token revoke --id`` takes): callers
    presenting it name themselves, as with ``$FEDRAY_TOKEN``, until it expires or is
    revoked. Many may be live at once, which is how a shared token is rotated."""
    token = PREFIX + secrets.token_urlsafe(32)
    digest = hash_token(token, secret)
    _insert(store, TokenRow(digest, "shared", kind="shared", expires_at=expires_at), secret,
            live=False)
    return token, digest[:12]


def revoke_shared_value(store: TrackingStore, token: str, secret: bytes) -> int:
    """Revoke the shared token ``token`` (e.g. ``$FEDRAY_TOKEN``, which a federation
    accepts without a row): a revoked row under its hash tells the servers to refuse it."""
    digest = hash_token(token, secret)
    row = TokenRow(digest, "shared", revoked=True, kind="shared").signed(secret)
    doc = schema.Token(hash=digest, name=row.name, mac=row.mac, kind="shared",
                       created_at=utcnow(), revoked=True, revoked_at=utcnow(), expires_at=None)
    checker.validate(COLLECTION, doc)
    try:
        store.db[COLLECTION].update_one({TOKENS.hash: digest}, {"$set": doc}, upsert=True)
    except PyMongoError as exc:
        raise _fail(store, "revoke the shared token", exc) from exc
    return 1


def add_client_key(store: TrackingStore, name: str, public: bytes, secret: bytes,
                   attrs: dict[str, str] | None = None,
                   expires_at: float | None = None) -> str:
    """Register client ``name``'s public key; its fingerprint (the row's hash)."""
    _check_name(name)
    digest = fingerprint(public)
    _insert(store, TokenRow(digest, name, kind="key", public_key=public.hex(),
                            expires_at=expires_at), secret, live=True, attrs=attrs)
    return digest


def revoke_token(store: TrackingStore, name: str | None = None, id_prefix: str | None = None,
                 kinds: tuple[str, ...] = KINDS) -> int:
    """Revoke every live credential of ``name`` (or the one whose id starts with
    ``id_prefix``, at least 8 characters) among ``kinds``; how many were revoked."""
    query: dict[str, Any] = {TOKENS.revoked: {"$eq": False}}
    if name is not None:
        query[TOKENS.name] = {"$eq": name}
    if id_prefix is not None:
        if not re.fullmatch(r"[0-9a-f]{8,64}", id_prefix):
            raise ConfigError(f"--id {id_prefix!r}: a credential id is 8 or more hex "
                              "characters (see fedray client list)")
        query[TOKENS.hash] = {"$regex": f"^{id_prefix}"}
    tokens = store.db[COLLECTION]
    try:
        live = [doc for doc in tokens.find(query, {TOKENS.hash: 1, TOKENS.kind: 1})
                if doc.get(TOKENS.kind, "token") in kinds]
        for doc in live:
            revoked = {"revoked": True, "revoked_at": utcnow()}
            checker.check_fields(COLLECTION, revoked)
            update = setting(revoked)
            update["$unset"] = {TOKENS.live_name: ""}
            tokens.update_one({TOKENS.hash: doc[TOKENS.hash]}, update)
    except PyMongoError as exc:
        raise _fail(store, f"revoke the credential of {name or id_prefix!r}", exc) from exc
    return len(live)


def list_tokens(store: TrackingStore) -> list[dict[str, Any]]:
    """Every credential's name, kind, short id (hash prefix), state and times, oldest
    first."""
    try:
        docs = list(store.db[COLLECTION].find({}, {"_id": 0}).sort([(TOKENS.created_at, 1)]))
    except PyMongoError as exc:
        raise _fail(store, "list tokens", exc) from exc
    return [{"name": d.get(TOKENS.name), "kind": d.get(TOKENS.kind, "token"),
             "id": str(d.get(TOKENS.hash, ""))[:12], "attrs": d.get(TOKENS.attrs) or {},
             "created_at": d.get(TOKENS.created_at), "expires_at": d.get(TOKENS.expires_at),
             "revoked": bool(d.get(TOKENS.revoked)), "revoked_at": d.get(TOKENS.revoked_at)}
            for d in docs]


def read_token_rows(store: TrackingStore) -> list[TokenRow]:
    """Every credential row (at most ``MAX_ROWS``), unverified: what a server caches to
    check callers, once it has verified each row's MAC (``TokenRow.verifies``)."""
    wanted = (TOKENS.hash, TOKENS.name, TOKENS.revoked, TOKENS.mac, TOKENS.kind,
              TOKENS.public_key, TOKENS.expires_at)
    try:
        docs = store.db[COLLECTION].find({}, {"_id": 0, **dict.fromkeys(wanted, 1)})
        return [row for row in map(_row, docs.limit(MAX_ROWS)) if row is not None]
    except PyMongoError as exc:
        raise _fail(store, "read tokens", exc) from exc


def _row(doc: dict[str, Any]) -> TokenRow | None:
    """A document as a row, or None when it is not one (its MAC is checked later)."""
    if not doc.get(TOKENS.hash) or not doc.get(TOKENS.name):
        return None
    expires = doc.get(TOKENS.expires_at)
    if isinstance(expires, datetime):
        expires = (expires if expires.tzinfo else expires.replace(tzinfo=UTC)).timestamp()
    elif expires is not None:
        return None
    return TokenRow(hash=str(doc[TOKENS.hash]), name=str(doc[TOKENS.name]),
                    revoked=bool(doc.get(TOKENS.revoked)), mac=str(doc.get(TOKENS.mac, "")),
                    kind=str(doc.get(TOKENS.kind, "token")),
                    public_key=str(doc.get(TOKENS.public_key, "")), expires_at=expires)


def tracking_token_loader(uri: str | None, database: str,
                          ) -> tuple[Callable[[], list[TokenRow]] | None,
                                     Callable[[], None] | None]:
    """A loader reading the ``tokens`` collection (None without tracking), and its close:
    what ``fedray.bridge.client_tokens.ClientTokens`` refreshes from."""
    if not uri:
        return None, None
    opened: list[TrackingStore] = []

    def load() -> list[TokenRow]:
        if not opened:
            opened.append(TrackingStore.from_uri(uri, database, timeout_s=2.0))
        return read_token_rows(opened[0])

    def close() -> None:
        for store in opened:
            store.close()

    return load, close
