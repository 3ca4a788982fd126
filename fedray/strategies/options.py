"""A strategy's options (``session.aggregator_kwargs``), read from its constructor's
signature: which have no default and were not given, which were given but do not exist.

The config check says so in one line that names the option and shows a ``--set`` that
works, instead of Python's signature error::

    dp_fixed needs session.aggregator_kwargs noise_multiplier and clipping_norm, e.g.
    --set 'session.aggregator_kwargs={noise_multiplier: 1.0, clipping_norm: 1.0}'

The example's values are the strategy's ``option_examples`` (a class attribute), else a
placeholder of the annotated type; the options already given keep their values, so the
whole mapping can be pasted as it is.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from collections.abc import Mapping
from typing import Any

from fedray.strategies.base import Strategy

_PLACEHOLDERS = {"bool": True, "int": 1, "float": 1.0, "str": "VALUE"}
_PLAIN = re.compile(r"[A-Za-z_][\w.-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "none", "~"}


def _parameters(cls: type) -> list[inspect.Parameter] | None:
    """The named options of ``cls(...)``; None when any name goes (``**kwargs``)."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # a builtin or an odd metaclass: nothing to read
        return None
    named = []
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            if cls.__init__ is not Strategy.__init__:  # type: ignore[misc]
                return None  # a constructor of its own that takes anything
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            named.append(p)
    return named


def missing_options(cls: type, given: Mapping[str, Any]) -> list[str]:
    """The options of ``cls`` that have no default and are not in ``given``, in order."""
    params = _parameters(cls) or []
    return [p.name for p in params if p.default is p.empty and p.name not in given]


def unknown_options(cls: type, given: Mapping[str, Any]) -> list[str]:
    """The options in ``given`` that ``cls`` does not take (none if it takes any)."""
    params = _parameters(cls)
    if params is None:
        return []
    names = {p.name for p in params}
    return [k for k in given if k not in names]


def options_problem(name: str, cls: type, given: Mapping[str, Any] | None,
                    where: str = "session.aggregator_kwargs") -> str:
    """One line saying what is wrong with ``given`` for strategy ``name`` (``cls``), or "";
    ``where`` is the config field the options are set in."""
    given = dict(given or {})
    params = _parameters(cls)
    unknown = unknown_options(cls, given)
    if unknown:
        known = [p.name for p in params or []]
        if not known:
            return f"{name} takes no options; leave {where} empty " \
                   f"(got {', '.join(unknown)})"
        close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"its options: {', '.join(known)}"
        return f"{name} has no option {unknown[0]} in {where} ({hint})"
    missing = missing_options(cls, given)
    if not missing:
        return ""
    examples = getattr(cls, "option_examples", {}) or {}
    example: dict[str, Any] = {}
    for p in params or []:
        if p.name in given:
            example[p.name] = given[p.name]
        elif p.name in missing:
            example[p.name] = examples.get(p.name, _placeholder(p.annotation))
    names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
    return (f"{name} needs {where} {names}, e.g. --set "
            f"'{where}={flow_yaml(example)}'")


def _placeholder(annotation: Any) -> Any:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    for part in str(text).split("|"):
        if part.strip() in _PLACEHOLDERS:
            return _PLACEHOLDERS[part.strip()]
    return "VALUE"


def flow_yaml(value: Any) -> str:
    """``value`` as one line of YAML flow style, as ``--set`` reads it back."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{flow_yaml(str(k))}: {flow_yaml(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(flow_yaml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a number
        text = repr(value)
        return text if "." in text or "e" not in text else text.replace("e", ".0e", 1)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)  # a double-quoted YAML scalar
