"""The read half of the API: tracking's documents as JSON, one method per endpoint.

Each call opens the tracking store once (``TrackingStore.from_uri`` caches its client)
and returns plain JSON values (``fedray.tracking.query.plain``). Session ids may be given
as a unique prefix, as on the command line. Lists are bounded (``MAX_LIMIT``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Any

from fedray.errors import ConfigError, NotFound
from fedray.tracking.models import resolve_model
from fedray.tracking.query import levels_from, plain, resolve_session
from fedray.tracking.schema import CLIENTS, EVENTS, MODELS, ROUNDS, SESSIONS, VALIDATIONS
from fedray.tracking.store import TrackingStore
from fedray.tracking.tail import Tail

MAX_LIMIT = 5000
Doc = dict[str, Any]


class TrackingReader:
    def __init__(self, uri: str, database: str | None, federation: str) -> None:
        self.uri = uri
        self.database = database
        self.federation = federation

    @contextlib.contextmanager
    def _store(self) -> Iterator[TrackingStore]:
        store = TrackingStore.from_uri(self.uri, self.database)
        try:
            yield store
        finally:
            store.close()

    def _session_id(self, store: TrackingStore, prefix: str) -> str:
        try:
            return resolve_session(store, prefix)
        except ConfigError as exc:
            raise NotFound(str(exc).replace("--session ", "session ")) from None

    @staticmethod
    def _limit(limit: int) -> int:
        return max(1, min(int(limit), MAX_LIMIT))

    def sessions(self, limit: int = 100) -> list[Doc]:
        with self._store() as store:
            query = {SESSIONS.federation: self.federation} if self.federation else {}
            docs = store.find("sessions", query, [(SESSIONS.created_at, -1)], self._limit(limit))
        return [plain(d) for d in docs]

    def session(self, prefix: str) -> Doc:
        with self._store() as store:
            doc = store.get_session(self._session_id(store, prefix))
        if doc is None:
            raise NotFound(f"session {prefix}: not in tracking")
        doc.pop("_id", None)
        return plain(doc)

    def rounds(self, prefix: str, limit: int = MAX_LIMIT) -> list[Doc]:
        with self._store() as store:
            sid = self._session_id(store, prefix)
            docs = store.find("rounds", {ROUNDS.session_id: sid}, [(ROUNDS.round, 1)],
                              self._limit(limit))
        return [plain(d) for d in docs]

    def validations(self, prefix: str, limit: int = MAX_LIMIT) -> list[Doc]:
        with self._store() as store:
            sid = self._session_id(store, prefix)
            docs = store.find("validations", {VALIDATIONS.session_id: sid},
                              [(VALIDATIONS.ts, 1)], self._limit(limit))
        return [plain(d) for d in docs]

    def models(self, session: str | None = None, limit: int = 200) -> list[Doc]:
        with self._store() as store:
            query = {MODELS.session_id: self._session_id(store, session)} if session else {}
            docs = store.find("models", query, [(MODELS.created_at, -1)], self._limit(limit))
        return [plain(d) for d in docs]

    def model(self, ref: str) -> Doc:
        with self._store() as store:
            try:
                found = resolve_model(store, ref, federation=self.federation or None)
            except ConfigError as exc:
                raise NotFound(str(exc)) from None
            docs = store.find("models", {MODELS.model_id: found.model_id}, limit=1)
        if not docs:
            raise NotFound(f"model {ref}: not in tracking")
        return plain(docs[0])

    def clients(self, status: str | None = None, limit: int = 1000) -> list[Doc]:
        with self._store() as store:
            query = {CLIENTS.status: status} if status else {}
            docs = store.find("clients", query, [(CLIENTS.last_seen, -1)], self._limit(limit))
        return [plain(d) for d in docs]

    def combiners(self) -> list[Doc]:
        with self._store() as store:
            docs = store.find("combiners", {}, [("name", 1)], 1000)
        return [plain(d) for d in docs]

    def events(self, session: str | None = None, level: str | None = None,
               limit: int = 200) -> list[Doc]:
        """The latest ``limit`` events (oldest first), at ``level`` and above."""
        levels = self._levels(level)
        with self._store() as store:
            query = self._event_query(store, session)
            docs: list[Doc] = []
            for one in levels or (None,):
                q = {**query, EVENTS.level: one} if one else query
                docs.extend(store.find("events", q, [(EVENTS.ts, -1)], self._limit(limit)))
        docs.sort(key=lambda d: d.get(EVENTS.ts) or dt.datetime.min.replace(tzinfo=dt.UTC))
        return [plain(d) for d in docs[-self._limit(limit):]]

    def _event_query(self, store: TrackingStore, session: str | None) -> dict[str, Any]:
        return {EVENTS.session_id: self._session_id(store, session)} if session else {}

    @staticmethod
    def _levels(level: str | None) -> tuple[str, ...] | None:
        try:
            return levels_from(level) if level else None
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("--level", "level")) from None

    def event_tail(self, session: str | None = None, level: str | None = None,
                   since: dt.datetime | None = None) -> tuple[Tail, TrackingStore]:
        """A ``Tail`` of events from ``since`` (now by default); the caller closes the store."""
        levels = self._levels(level)
        store = TrackingStore.from_uri(self.uri, self.database)
        try:
            query = self._event_query(store, session)
        except Exception:
            store.close()
            raise
        if levels is not None and len(levels) < 4:
            query[EVENTS.level] = {"$in": list(levels)}
        return Tail(store, "events", query, EVENTS.ts, since), store

    def round_tail(self, session: str | None = None,
                   since: dt.datetime | None = None) -> tuple[Tail, TrackingStore]:
        """A ``Tail`` of rounds as they are updated (``updated_at``)."""
        store = TrackingStore.from_uri(self.uri, self.database)
        try:
            query = {ROUNDS.session_id: self._session_id(store, session)} if session else {}
        except Exception:
            store.close()
            raise
        return Tail(store, "rounds", query, "updated_at", since), store
