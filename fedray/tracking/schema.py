"""The tracking documents, one ``TypedDict`` per collection: what is written and what is read.

``TrackingStore`` (and ``tokens``) check every write against these classes before it
reaches the database (``checker`` does the checking): an insert is ``validate``d whole, an
update's ``$set`` fields one by one (``check_fields``), so a write with a field the schema
does not have, or a value of the wrong type, is refused with a ``SchemaError`` naming the
field. Readers take field names from the same classes (``ROUNDS.model_id``, ...: an
attribute the class does not have is an error where it is read). docs/tracking.md
publishes the tables, and a test keeps them equal to these classes.

Required keys are in every document fedray writes, from its first write on; ``NotRequired``
ones are written later or only sometimes. ``X | None`` may be stored as null. A ``float``
is any finite number (an int too: JSON and BSON do not tell 1 from 1.0); a count a client
reports is ``int | str``, since a number BSON cannot hold is stored as its decimal text
(``documents.clean``). Dates are timezone-aware UTC. What a whole document must satisfy
beyond its fields' types (a finished round names its model, ...) is in ``RULES``.

No ``from __future__ import annotations`` here: Python 3.11 then loses ``NotRequired``.
"""

import functools
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict, get_type_hints

from bson import ObjectId

SessionStatus = Literal["created", "waiting", "running", "finished", "failed", "stopped"]
RoundStatus = Literal["running", "finished", "failed"]
Mode = Literal["sync", "async"]
ClientStatus = Literal["online", "training", "validating", "offline"]
CombinerStatus = Literal["online", "stopped"]
Level = Literal["debug", "info", "warning", "error"]
Count = int | str  # reported by a client: text when BSON cannot hold it


class Session(TypedDict):
    _id: NotRequired[ObjectId]
    session_id: str
    federation: str
    status: SessionStatus
    config: dict[str, Any]
    rounds_planned: int
    rounds_done: int
    model_id: str
    created_at: datetime
    updated_at: datetime
    seed_model_id: NotRequired[str]
    package_sha256: NotRequired[str]
    package_size: NotRequired[int]
    continued_from: NotRequired[str | None]
    strategy: NotRequired[str]
    mode: NotRequired[Mode]
    reason: NotRequired[str]
    seed_mac: NotRequired[str]  # the controller's signature of the seed (tracking.resume)
    stopped_by: NotRequired[str]  # who stopped it (status "stopped", or a halted run)
    submitted_by: NotRequired[str]  # who asked for it (fedray session start, the API)


class CombinerShare(TypedDict):
    asked: int
    updates: int
    rejected: int
    rejections: dict[str, int]
    failed: int
    failures: dict[str, str]
    close_reason: str
    seconds: float
    bytes_in: int
    bytes_out: int
    aggregation_s: float


class StageTraffic(TypedDict):
    asked: int
    replies: int
    bytes_in: int
    bytes_out: int
    seconds: float


class Contribution(TypedDict):
    client_id: str
    base_version: int
    staleness: int
    num_examples: Count
    weight: float


class Round(TypedDict):
    _id: NotRequired[ObjectId]
    session_id: str
    round: int
    status: RoundStatus
    started_at: datetime
    updated_at: datetime
    attempt: NotRequired[int]
    clients_asked: NotRequired[dict[str, int]]
    parent_model_id: NotRequired[str]
    reason: NotRequired[str]
    failures: NotRequired[dict[str, str]]
    combiners: NotRequired[dict[str, CombinerShare]]
    model_id: NotRequired[str]
    mode: NotRequired[Mode]
    updates: NotRequired[int]
    rejected: NotRequired[int]
    lost_combiners: NotRequired[list[str]]
    reduce_s: NotRequired[float]
    seconds: NotRequired[float]
    aggregator_state_id: NotRequired[str]
    train_metrics: NotRequired[dict[str, float]]
    validation_metrics: NotRequired[dict[str, float]]
    report: NotRequired[dict[str, float | None]]
    contributions: NotRequired[list[Contribution]]
    commit_mac: NotRequired[str]  # the controller's signature of what it committed
    codec: NotRequired[str]  # session.codec the round's updates were sent in
    bytes_in: NotRequired[int]  # update bytes the combiners received (all of them)
    bytes_out: NotRequired[int]  # model bytes the combiners served
    stages: NotRequired[dict[str, StageTraffic]]  # the strategy's other stages (secagg's keys)


class TensorSpec(TypedDict):
    name: str
    dtype: str
    shape: list[int]


class Model(TypedDict):
    _id: NotRequired[ObjectId]
    model_id: str
    parent_id: str | None
    session_id: str | None
    round: int | None
    size: int
    storage_uri: str
    tensors: list[TensorSpec]
    created_at: datetime


class Client(TypedDict):
    _id: NotRequired[ObjectId]
    client_id: str
    name: str
    combiner: str
    status: ClientStatus
    first_seen: datetime
    last_seen: datetime
    attrs: NotRequired[dict[str, str]]
    version: NotRequired[str]
    connection_id: NotRequired[str]  # its current Join: unchanged while it stays connected
    connected_at: NotRequired[datetime]


class Combiner(TypedDict):
    _id: NotRequired[ObjectId]
    name: str
    address: str
    status: CombinerStatus
    restarts: int
    updated_at: datetime
    clients: NotRequired[int]


class Validation(TypedDict):
    _id: ObjectId
    session_id: str
    round: int
    model_id: str
    client_id: str
    combiner: str
    num_examples: Count
    metrics: dict[str, Any]
    ts: datetime


class Event(TypedDict):
    _id: ObjectId
    ts: datetime
    level: Level
    source: str
    session_id: str | None
    round: int | None
    message: str
    data: NotRequired[dict[str, Any]]


class Package(TypedDict):
    _id: NotRequired[ObjectId]
    sha256: str
    name: str
    size: int
    created_at: datetime
    source: NotRequired[str]
    federation: NotRequired[str]


class Token(TypedDict):
    _id: NotRequired[ObjectId]
    hash: str
    name: str
    mac: str
    created_at: datetime
    revoked: bool
    revoked_at: datetime | None
    live_name: NotRequired[str]
    kind: NotRequired[Literal["token", "key", "shared"]]
    public_key: NotRequired[str]
    expires_at: NotRequired[datetime | None]
    attrs: NotRequired[dict[str, str]]


DOCUMENTS: dict[str, type] = {
    "sessions": Session,
    "rounds": Round,
    "models": Model,
    "clients": Client,
    "combiners": Combiner,
    "validations": Validation,
    "events": Event,
    "packages": Package,
    "tokens": Token,
}
PARTS: tuple[type, ...] = (CombinerShare, StageTraffic, Contribution, TensorSpec)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The field types of a document class (cached: every event is checked)."""
    return get_type_hints(cls)


Problem = tuple[str, str] | None  # (field, what is wrong with it)
COMMITTED = ("model_id", "parent_model_id", "mode", "updates", "seconds", "aggregator_state_id")


def _round_rules(doc: Mapping[str, Any]) -> Problem:
    if doc.get("status") == "finished":
        for name in COMMITTED:
            if name not in doc:
                return name, "is required once the round is finished, but missing"
    if doc.get("status") == "failed" and "reason" not in doc:
        return "reason", "is required once the round failed, but missing"
    return None


def _token_rules(doc: Mapping[str, Any]) -> Problem:
    if doc.get("revoked") and "live_name" in doc:
        return "live_name", "must be gone once the token is revoked"
    if doc.get("kind") == "shared":  # many shared tokens may be live: none holds a name
        return ("live_name", "is only for a client's own credential") \
            if "live_name" in doc else None
    if not doc.get("revoked") and doc.get("live_name") != doc.get("name"):
        return "live_name", "must equal 'name' while the token is live"
    if doc.get("kind") == "key" and not doc.get("public_key"):
        return "public_key", "is required for a key"
    return None


# What a whole document must satisfy beyond its fields' types.
RULES: dict[str, Callable[[Mapping[str, Any]], Problem]] = {
    "rounds": _round_rules,
    "tokens": _token_rules,
}


class Fields:
    """The field names of one document class as attributes: ``ROUNDS.model_id`` is
    ``"model_id"``; a name the class does not have raises AttributeError where it is read."""

    def __init__(self, cls: type) -> None:
        self.__dict__.update({name: name for name in field_types(cls)})
        self.__dict__["_class"] = cls

    def __getattr__(self, name: str) -> str:  # only for names that are not fields
        cls = self.__dict__.get("_class")
        if cls is None or name.startswith("__"):  # unpickling, copy, ...: nothing special
            raise AttributeError(name)
        raise AttributeError(f"tracking document {cls.__name__} has no field {name!r} "
                             "(fedray/tracking/schema.py)")

    def __reduce__(self) -> tuple[Any, ...]:  # Ray may pickle a module's globals
        return (Fields, (self.__dict__["_class"],))


SESSIONS, ROUNDS, MODELS, CLIENTS = Fields(Session), Fields(Round), Fields(Model), Fields(Client)
COMBINERS, VALIDATIONS, EVENTS = Fields(Combiner), Fields(Validation), Fields(Event)
PACKAGES, TOKENS = Fields(Package), Fields(Token)
CONTRIBUTIONS, SHARES = Fields(Contribution), Fields(CombinerShare)
