"""The tracking documents, one ``TypedDict`` per collection: what is written and what is read.

``TrackingStore`` (and ``tokens``) check every write against these classes before it
reaches the database: an insert is ``validate``d whole, an update's ``$set`` fields one by
one (``check_fields``), so a write with a field the schema does not have, or a value of
the wrong type, is refused with a ``SchemaError`` naming the field. Readers take field
names from the same classes (``ROUNDS.model_id``, ...: an attribute the class does not
have is an error where it is read). docs/tracking.md publishes the tables, and a test
keeps them equal to these classes.

Required keys are in every document fedray writes, from its first write on; ``NotRequired``
ones are written later or only sometimes. ``X | None`` may be stored as null. A ``float``
is any finite number (an int too: JSON and BSON do not tell 1 from 1.0); a count a client
reports is ``int | str``, since a number BSON cannot hold is stored as its decimal text
(``documents.clean``). Dates are timezone-aware UTC.

No ``from __future__ import annotations`` here: Python 3.11 then loses ``NotRequired``.
"""

import functools
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from types import NoneType, UnionType
from typing import Any, Literal, NotRequired, TypedDict, Union, get_args, get_origin, get_type_hints
from typing import is_typeddict as _is_typeddict

from bson import ObjectId

from fedray.errors import SchemaError

SessionStatus = Literal["created", "waiting", "running", "finished", "failed"]
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
PARTS: tuple[type, ...] = (CombinerShare, Contribution, TensorSpec)  # sub-documents


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
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
    if not doc.get("revoked") and doc.get("live_name") != doc.get("name"):
        return "live_name", "must equal 'name' while the token is live"
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
        self.__dict__.update({name: name for name in _hints(cls)})
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


def validate(collection: str, doc: Mapping[str, Any]) -> None:
    """Refuse ``doc`` (SchemaError naming the field) unless it is a whole, well-typed
    document of ``collection``."""
    cls = _document(collection)
    _check(doc, cls, collection, "")
    rule = RULES.get(collection)
    problem = rule(doc) if rule is not None else None
    if problem is not None:
        raise SchemaError(collection, *problem)


def check_fields(collection: str, fields: Mapping[str, Any]) -> None:
    """Refuse the fields of an update (``$set``) unless each names a field of
    ``collection`` (a dotted name reaches into a sub-document) and has its type."""
    cls = _document(collection)
    for path, value in fields.items():
        hint: Any = cls
        parts = path.split(".")
        for depth, part in enumerate(parts):
            hint = _step(hint, part, collection, ".".join(parts[: depth + 1]))
        _check(value, hint, collection, path)


def type_text(hint: Any) -> str:
    """A field's type as docs/tracking.md writes it."""
    if hint is Any:
        return "any"
    if hint is NoneType:
        return "null"
    if _is_typeddict(hint):
        return hint.__name__
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "string: " + ", ".join(str(a) for a in args)
    if origin in (Union, UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin is list:
        return f"[{type_text(args[0])}]"
    if origin is dict:
        return f"{{string: {type_text(args[1])}}}"
    return _NAMES[hint]


def fields_of(cls: type) -> list[tuple[str, str, bool]]:
    """(name, type text, required) of every field of ``cls``, in declaration order."""
    return [(name, type_text(hint), name in cls.__required_keys__)  # type: ignore[attr-defined]
            for name, hint in _hints(cls).items()]


# ----------------------------------------------------------------- the checks

_NAMES = {str: "string", int: "int", float: "number", bool: "bool", datetime: "date",
          ObjectId: "ObjectId"}


def _document(collection: str) -> type:
    try:
        return DOCUMENTS[collection]
    except KeyError:
        raise SchemaError(collection, "", "not a tracking collection") from None


def _step(hint: Any, part: str, collection: str, path: str) -> Any:
    """The type one level down a dotted update path."""
    if _is_typeddict(hint):
        hints = _hints(hint)
        if part not in hints:
            raise SchemaError(collection, path, "is not in the schema (fedray/tracking/schema.py)")
        return hints[part]
    if get_origin(hint) is dict:
        return get_args(hint)[1]
    if hint is Any:
        return Any
    raise SchemaError(collection, path, f"cannot reach into a {type_text(hint)}")


def _check(value: Any, hint: Any, collection: str, path: str) -> None:
    problem = _problem(value, hint, collection, path)
    if problem is not None:
        raise SchemaError(collection, path, problem)


def _problem(value: Any, hint: Any, collection: str, path: str) -> str | None:
    """Why ``value`` is not a ``hint`` (None when it is); nested fields raise themselves."""
    if hint is Any:
        return None
    origin, args = get_origin(hint), get_args(hint)
    if _is_typeddict(hint):
        if not isinstance(value, Mapping):
            return f"must be a {hint.__name__} document, got {_shown(value)}"
        hints = _hints(hint)
        for key in value:
            if key not in hints:
                raise SchemaError(collection, _join(path, key), "is not in the schema (fedray/tracking/schema.py)")
        for key, item in value.items():
            _check(item, hints[key], collection, _join(path, key))
        for key in hints:  # in declaration order, so the message is always the same
            if key in hint.__required_keys__ and key not in value:
                raise SchemaError(collection, _join(path, key), "is required but missing")
        return None
    if origin in (Union, UnionType):
        if value is None and NoneType in args:
            return None
        others = [a for a in args if a is not NoneType]
        if len(others) == 1:  # X | None: X's own message, nested fields included
            return _problem(value, others[0], collection, path)
        if any(_problem(value, a, collection, path) is None for a in others):
            return None
        return f"must be {type_text(hint)}, got {_shown(value)}"
    if origin is Literal:
        return None if value in args else f"must be one of {', '.join(map(str, args))}, " \
                                          f"got {_shown(value)}"
    if origin is list:
        if not isinstance(value, list):
            return f"must be a list, got {_shown(value)}"
        for i, item in enumerate(value):
            _check(item, args[0], collection, f"{path}.{i}")
        return None
    if origin is dict:
        if not isinstance(value, Mapping):
            return f"must be a document, got {_shown(value)}"
        for key, item in value.items():
            if not isinstance(key, str):
                return f"must have string keys, got {_shown(key)}"
            _check(item, args[1], collection, _join(path, key))
        return None
    return _scalar(value, hint)


def _scalar(value: Any, hint: Any) -> str | None:
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number, got {_shown(value)}"
        return None if math.isfinite(value) else f"must be a finite number, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"must be an int, got {_shown(value)}"
    if hint is datetime:
        if not isinstance(value, datetime):
            return f"must be a date, got {_shown(value)}"
        return None if value.utcoffset() is not None else "must be a UTC date, got a naive one"
    if isinstance(hint, type):
        return None if isinstance(value, hint) else \
            f"must be a {type_text(hint)}, got {_shown(value)}"
    raise TypeError(f"the tracking schema cannot check {hint!r}")  # a bug in this module


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
