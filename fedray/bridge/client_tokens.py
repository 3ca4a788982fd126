"""Credentials as a bridge server sees them: a cache of tracking's token rows.

The cache (keyed hash or key fingerprint -> ``Credential``) is re-read from tracking every few seconds, and (at most
once a second, in the background) when an unknown token shows up, so new tokens and
revocations take effect without a restart; looking a token up never waits. Database reads and MAC checks run in a worker thread: the
event loop that serves every client never waits on tracking. Tracking is not trusted: a
row counts only when its MAC under the federation's token secret checks out, a token once
seen revoked stays revoked, and once tokens were issued (or a valid row was seen) the
bridge never opens again, whatever is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedray.bridge.keys import TokenRow, hash_token

log = logging.getLogger(__name__)

REFRESH_S = 3.0  # how stale the token cache may get (bounds the delay of a revocation)
MISS_REFRESH_S = 1.0  # an unknown token re-reads the tokens at most this often

TokenLoader = Callable[[], list[TokenRow]]  # every row of tracking's tokens, unverified


@dataclass(frozen=True)
class Credential:
    """A verified row: whose it is, what kind (``fedray.bridge.keys.KINDS``), whether it
    still counts."""

    name: str
    revoked: bool = False
    kind: str = "token"
    public: bytes = b""  # kind "key": the Ed25519 public key
    expires_at: float | None = None  # Unix time

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at


class ClientTokens:
    """A cache of per-client token hashes, refreshed from tracking off the event loop.

    Only rows whose MAC verifies under ``secret`` count (without a secret, none do). The
    token list is *required* (callers need a token) until it was first read, when tokens
    were ``issued`` before this server started, and from the moment a valid row is seen:
    deleting rows never reopens the bridge. A token seen revoked stays revoked here even
    if its row says otherwise later."""

    def __init__(self, load: TokenLoader | None, refresh_s: float = REFRESH_S,
                 miss_refresh_s: float = MISS_REFRESH_S,
                 on_revoked: Callable[[set[str]], None] | None = None,
                 release: Callable[[], None] | None = None, secret: bytes | None = None,
                 issued: bool = False) -> None:
        self._load = load
        self._release = release  # closes what ``load`` opened
        self.refresh_s, self.miss_refresh_s = refresh_s, miss_refresh_s
        self.on_revoked = on_revoked
        self.on_untrusted: Callable[[int], None] | None = None  # rows that did not verify
        self.secret = secret
        self.entries: dict[str, Credential] = {}  # hash or key fingerprint -> credential
        self.names: frozenset[str] = frozenset()  # every client name with a credential
        self.loaded = load is None  # until the first read, unknown: refuse tokenless callers
        self.issued = issued
        self._revoked: set[str] = set()  # hashes seen revoked: sticky
        self._untrusted = 0
        self._read_at = float("-inf")
        self._inflight: asyncio.Future[None] | None = None
        self._missed: asyncio.Future[None] | None = None  # the last re-read a miss started
        self._task: asyncio.Task[None] | None = None

    @property
    def required(self) -> bool:
        """Whether callers need a token because of per-client tokens (see the class)."""
        return not self.loaded or self.issued

    def digest(self, token: str) -> str | None:
        """The keyed hash to look ``token`` up by (None: this server has no secret)."""
        return hash_token(token, self.secret) if self.secret is not None else None

    async def start(self) -> None:
        await self.refresh()
        if self._load is not None:
            self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        """Re-read the tokens (one read at a time; concurrent callers share it)."""
        if self._load is None:
            return
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._read())
        await asyncio.shield(self._inflight)

    async def _read(self) -> None:
        self._read_at = time.monotonic()
        try:  # reading and checking up to 100k MACs both stay off the event loop
            rows, untrusted = await asyncio.to_thread(self._verified_rows)
        except Exception as exc:  # noqa: BLE001 - keep the last known tokens, retry later
            log.warning("cannot read client tokens (keeping the last known ones): %s", exc)
            return
        finally:
            self._inflight = None
        revoked_before = {digest for digest, c in self.entries.items() if c.revoked}
        entries = {}
        for row in rows:
            if row.revoked:
                self._revoked.add(row.hash)
            public = b""
            if row.kind == "key":
                try:
                    public = bytes.fromhex(row.public_key)
                except ValueError:
                    continue
            entries[row.hash] = Credential(row.name, row.revoked or row.hash in self._revoked,
                                           row.kind, public, row.expires_at)
        self.entries = entries
        self.names = frozenset(c.name for c in entries.values() if c.kind != "shared")
        self.loaded = True
        self.issued = self.issued or bool(entries)
        if untrusted != self._untrusted:
            self._untrusted = untrusted
            if untrusted and self.on_untrusted is not None:
                self.on_untrusted(untrusted)
        # By token, not by name: a name revoked and given a new token within one refresh
        # still has its old holder's stream closed.
        newly = {c.name for digest, c in entries.items()
                 if c.revoked and digest not in revoked_before and c.kind != "shared"}
        if newly and self.on_revoked is not None:
            self.on_revoked(newly)

    def _verified_rows(self) -> tuple[list[TokenRow], int]:
        """Runs in a worker thread: the rows whose MAC verifies, and how many did not."""
        assert self._load is not None
        rows, untrusted = [], 0
        for row in self._load():
            if row.verifies(self.secret):
                rows.append(row)
            else:
                untrusted += 1
        return rows, untrusted

    def find(self, digest: str) -> Credential | None:
        """The credential with this hash (or key fingerprint): a dictionary lookup, never a
        wait.

        A miss makes sure a re-read starts within ``miss_refresh_s`` (in the background,
        one at a time), so a token created a moment ago works on the client's next try,
        while a flood of wrong tokens neither waits nor holds a server slot, and causes
        about one read per interval."""
        hit = self.entries.get(digest)
        if hit is None and self._load is not None and (self._missed is None
                                                       or self._missed.done()):
            self._missed = asyncio.ensure_future(self._reread_soon())
        return hit

    async def _reread_soon(self) -> None:
        due = self._read_at + self.miss_refresh_s - time.monotonic()
        if due > 0:
            await asyncio.sleep(due)
        await self.refresh()

    async def settled(self) -> None:
        """Until a re-read a miss started (if any) is done."""
        if self._missed is not None:
            await asyncio.shield(self._missed)

    async def close(self) -> None:
        for task in (self._task, self._missed):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._release is not None:
            await asyncio.to_thread(self._release)
