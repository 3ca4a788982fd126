"""Which committed model a reference names: an id, a unique prefix of one, or ``latest``.

``fedray models get REF`` and ``seed_model: model:REF`` resolve through here. ``latest`` is
the newest committed model of the latest session (of one federation, or the session
given): the model of that session's last finished round, as a resumed session would
continue from it (``fedray.tracking.resume``). A session that committed no round has
no latest model; its seed is reachable by id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedray.errors import ConfigError
from fedray.storage.base import LATEST, MIN_PREFIX, is_model_ref
from fedray.tracking.query import resolve_session
from fedray.tracking.resume import resume_point
from fedray.tracking.store import TrackingStore


@dataclass(frozen=True)
class CommittedModel:
    """A model as tracking knows it (``storage_uri`` empty when tracking has no record)."""

    model_id: str
    session_id: str = ""
    round: int | None = None
    storage_uri: str = ""

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> CommittedModel:
        return cls(doc["model_id"], doc.get("session_id") or "", doc.get("round"),
                   doc.get("storage_uri") or "")

    def describe(self) -> str:
        where = f"session {self.session_id} round {self.round}" if self.session_id else \
            "not in tracking"
        return f"model {self.model_id} ({where})"


def resolve_model(store: TrackingStore, ref: str, *, session: str | None = None,
                  federation: str | None = None, what: str = "model") -> CommittedModel:
    """The model ``ref`` names; ``what`` (the option or field) starts every error."""
    ref = ref.strip().lower()
    if ref == LATEST:
        return _latest(store, session, federation, what)
    if session is not None:
        raise ConfigError(f"{what}: --session goes with 'latest', not with a model id")
    if not is_model_ref(ref):
        raise ConfigError(f"{what}: {ref!r} is not a model id, a prefix of one "
                          f"({MIN_PREFIX}+ hex characters) or 'latest'")
    if len(ref) == 64:
        doc = store.get_model(ref)
        return CommittedModel.from_doc(doc) if doc is not None else CommittedModel(ref)
    docs = store.find("models", {"model_id": {"$regex": "^" + ref}}, [("created_at", -1)], 6)
    if len(docs) == 1:
        return CommittedModel.from_doc(docs[0])
    if not docs:
        raise ConfigError(f"{what}: no model id starts with {ref} (`fedray models` lists them)")
    shown = ", ".join(d["model_id"][:16] for d in docs[:5]) + (", ..." if len(docs) > 5 else "")
    raise ConfigError(f"{what}: {ref} matches several models ({shown}); give more characters")


def _latest(store: TrackingStore, session: str | None, federation: str | None,
            what: str) -> CommittedModel:
    if session is not None:
        doc = store.get_session(resolve_session(store, session))
    else:
        found = store.find("sessions", {"federation": federation} if federation else {},
                           [("created_at", -1)], 1)
        if not found:
            of = f" of federation {federation}" if federation else ""
            raise ConfigError(f"{what}: latest: tracking has no session{of} yet")
        doc = found[0]
    assert doc is not None
    session_id = doc["session_id"]
    point = resume_point(doc, store.find("rounds", {"session_id": session_id}))
    if not point.rounds_done or not point.model_id:
        raise ConfigError(f"{what}: latest: session {session_id} has committed no round yet "
                          f"(its seed is model {doc.get('seed_model_id') or '?'})")
    model = store.get_model(point.model_id)
    if model is not None:
        return CommittedModel.from_doc(model)
    return CommittedModel(point.model_id, session_id, point.rounds_done)
