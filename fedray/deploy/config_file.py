"""Reading a federation config: YAML (or a mapping) in, ``FederationConfig`` out.

``--set FIELD=VALUE`` overrides apply on top of the file, ``$FEDRAY_DATA_DIR`` over the
file's ``data_dir`` (under ``--data-dir``), and every rule of ``config_checks`` runs before
the config is returned: an error is one line naming the field and the file, or the
``--set`` that set it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fedray.config import DATA_DIR_ENV, DEFAULT_DATABASE, FederationConfig, uri_database
from fedray.deploy.config_checks import Blame, check, field_hint, resolve_tier
from fedray.errors import ConfigError


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"{key!r} is given twice (lines {first} and {line})")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: PyYAML keeps the
    last one silently, so a pasted block would quietly undo the settings above it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then overriding a key of it is what merges are for
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:
                continue  # an unhashable key: construct_mapping says so
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader


def parse_override(item: str) -> tuple[str, Any]:
    """One ``--set FIELD=VALUE`` as (FIELD, the YAML value)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
    try:
        return key, load_yaml(value)
    except _DuplicateKey as exc:
        raise ConfigError(f"--set {key}: {exc.key!r} is given twice; keep one") from None
    except yaml.YAMLError as exc:
        problem = " ".join((getattr(exc, "problem", None) or str(exc)).split())
        raise ConfigError(f"--set {key}: {value!r} is not a valid YAML value ({problem}); "
                          "check its brackets and quotes") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> FederationConfig:
    """Read a YAML config; ``overrides`` uses dotted keys (``{"session.rounds": 3}``), as
    `--set` gives them: an error in one of them names ``--set FIELD``, not the file."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: line {exc.line}: {exc.key!r} is given twice (first on "
                          f"line {exc.first}); keep one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    return _overridden(raw, str(path), overrides)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>",
                     overrides: dict[str, Any] | None = None) -> FederationConfig:
    """A config from a mapping, ``overrides`` as in ``load_config`` (a flag's value)."""
    return _overridden(copy.deepcopy(raw), source, overrides)


def _overridden(raw: dict[str, Any], source: str,
                overrides: dict[str, Any] | None) -> FederationConfig:
    blame = Blame(source, frozenset(overrides or ()))
    for dotted, value in (overrides or {}).items():
        _check_override(dotted)
        _set_dotted(raw, dotted, value, blame)
    if "data_dir" not in blame.overridden and os.environ.get(DATA_DIR_ENV):
        raw["data_dir"] = os.environ[DATA_DIR_ENV]  # over the config's, under --data-dir
    return _from_dict(raw, blame)


def _from_dict(raw: dict[str, Any], blame: Blame) -> FederationConfig:
    config = _build(FederationConfig, {**raw, "source": blame.source}, "", blame)
    if config.tracking.database is None:  # what the query commands read with the same URI
        database = uri_database(config.tracking.uri) or DEFAULT_DATABASE
        config = dataclasses.replace(
            config, tracking=dataclasses.replace(config.tracking, database=database))
    config = resolve_tier(config, raw.get("combiners"), blame)
    check(config, blame)
    return config


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "source"]


def _check_override(dotted: str) -> None:
    """``--set`` names a field that exists (any key below a free-form mapping does)."""
    cls: Any = FederationConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if cls is None:
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:i])} is a value, not a section")
        if part not in _fields(cls):
            what = "unknown field" if where == dotted else f"unknown field {where}"
            raise ConfigError(f"--set {dotted}: {what} ({field_hint(where, _fields(cls))})")
        hint = typing.get_type_hints(cls)[part]
        if hint is dict:
            return
        cls = hint if dataclasses.is_dataclass(hint) else None


def _set_dotted(raw: dict, dotted: str, value: Any, blame: Blame) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for i, key in enumerate(parents):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise blame.error(".".join(parents[: i + 1]), "must be a mapping")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str, blame: Blame) -> Any:
    if not isinstance(raw, dict):
        raise blame.error(prefix.rstrip(".") or "config", "must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise blame.unknown(f"{prefix}{unknown[0]}", _fields(cls))
    values = {}
    for name, f in fields.items():
        where = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{blame.source}: missing required field {where}")
            continue
        values[name] = _coerce(hints[name], raw[name], where, blame)
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str, blame: Blame) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, f"{where}.", blame)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return _finite(float(value), where, blame)
        if option is str and isinstance(value, str):
            return value
        if option is dict and isinstance(value, dict):
            return _finite(value, where, blame)
        if option is list and isinstance(value, list):
            return _finite(value, where, blame)
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise blame.error(where, f"must be {wanted}, got {value!r}")


def _finite(value: Any, where: str, blame: Blame) -> Any:
    """``value`` itself; an infinity or NaN anywhere in it is refused (YAML's ``.inf`` and
    ``.nan``): NaN passes every "> 0" check, and inf breaks the arithmetic on it."""
    if isinstance(value, float) and not math.isfinite(value):
        raise blame.error(where, f"must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite(item, f"{where}.{key}", blame)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _finite(item, f"{where}.{i}", blame)
    return value
