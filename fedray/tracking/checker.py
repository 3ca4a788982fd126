"""Checking a document against the tracking schema: the checker behind every write.

``schema`` says what each collection's documents are; this module decides whether a given
document (an insert: ``validate``) or set of fields (an update's ``$set``:
``check_fields``) is one, and refuses it with a ``SchemaError`` naming the field when it
is not. It reads any ``TypedDict`` of ``schema`` the same way, so a new field needs no
code here. ``type_text``/``fields_of`` write a class's types as docs/tracking.md does,
which lets a test keep those tables equal to the classes.

Kept apart from ``schema`` so that module stays the reference it is (the classes, their
field names and the rules of a whole document), and the generic code that walks type
hints lives in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin
from typing import is_typeddict as _is_typeddict

from bson import ObjectId

from fedray.errors import SchemaError
from fedray.tracking.schema import DOCUMENTS, RULES, field_types


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
            for name, hint in field_types(cls).items()]


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
        hints = field_types(hint)
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
        hints = field_types(hint)
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
