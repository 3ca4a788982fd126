"""Federation configs: YAML in, frozen dataclasses out, one-line errors that name the field.

Everything an actor needs travels as one of these objects, parsed and checked once here,
so a typo in a config stops `fedray run` before anything starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from fedray.deploy.config_checks import check
from fedray.errors import ConfigError
from fedray.text import redact


@dataclass(frozen=True)
class RayConfig:
    # "local": start a private Ray (or join the cluster of a `ray job submit` driver);
    # "auto": join the running cluster on this machine; "HOST:PORT": join that one.
    address: str = "local"
    num_cpus: int | None = None
    include_dashboard: bool = False


@dataclass(frozen=True)
class ControllerConfig:
    host: str = "0.0.0.0"
    port: int = 12080


@dataclass(frozen=True)
class CombinersConfig:
    count: int = 2
    host: str = "0.0.0.0"
    base_port: int = 12081  # combiner i listens on base_port + i; 0 picks free ports
    advertise: str = "auto"  # the host clients are told to dial; auto = this node's IP
    max_clients: int = 10_000
    max_inflight_uploads: int = 4
    max_update_mb: float = 2048.0
    chunk_kib: int = 1024
    heartbeat_interval_s: float = 2.0
    offline_after_s: float = 10.0
    max_rpcs_per_s: float = 50.0  # per client: its token's name, else connection + claimed name
    upload_idle_s: float = 30.0  # an upload with no chunk for this long gives its slot back
    max_clients_per_connection: int = 256  # client ids one connection may act for (shared token)
    max_client_events_per_min: float = 20.0  # PushEvents a client may have recorded
    max_event_bytes: int = 2048  # of a client event's message and data, once recorded
    max_connection_age_s: float = 3600.0  # then gRPC closes a connection (after 10 min grace)
    max_connection_idle_s: float = 300.0  # a connection without calls is closed after this


@dataclass(frozen=True)
class SelectConfig:
    """Which online clients a round may ask (all of them when nothing is set)."""

    ids: list = field(default_factory=list)  # only these client ids
    attrs: dict = field(default_factory=dict)  # {key: value or [values]} from --attr KEY=VALUE
    policy: str = ""  # package.module:callable(clients, ctx) -> client ids, over a snapshot


@dataclass(frozen=True)
class SessionConfig:
    rounds: int = 5  # rounds; for an asynchronous strategy (fedbuff), model versions
    aggregator: str = "fedavg"
    aggregator_kwargs: dict = field(default_factory=dict)
    clients_per_round: float = 1.0  # a fraction (<= 1.0) or a count (> 1)
    min_clients: int = 2
    round_timeout_s: float = 120.0
    round_attempts: int = 3  # a round with too few updates runs again, up to this many times
    wait_for_clients_s: float = 600.0
    validate: bool = True
    round_config: dict = field(default_factory=dict)  # sent to clients with every task
    seed: int = 0
    buffer_size: int = 0  # close a round on its first K updates (fedbuff: a version every K)
    over_select: float = 0.0  # ask this fraction more clients than wanted (stragglers)
    select: SelectConfig = field(default_factory=SelectConfig)
    max_examples_per_update: int = 1_000_000  # a larger self-reported num_examples is refused
    max_update_norm: float | None = None  # L2 norm of (update - round model); larger: refused
    max_kept_updates: int = 1000  # robust strategies keep a round's updates (object store)
    time_budget_s: float | None = None  # asynchronous sessions also end after this long
    continue_from: str = ""  # a session id: start from its last model and strategy state


DEFAULT_DATABASE = "fedray"
DATA_DIR_ENV = "FEDRAY_DATA_DIR"


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = "embedded"  # or mongodb://host:27017/
    database: str | None = None  # set at load: the URI's database, else "fedray"
    events_ttl_days: float = 30.0  # events older than this are deleted; 0 keeps them forever

    @property
    def events_ttl_s(self) -> int | None:
        """``events_ttl_days`` in whole seconds; None keeps events forever."""
        return int(self.events_ttl_days * 86400) or None

    def __repr__(self) -> str:  # the URI may hold a password: configs end up in logs
        return (f"TrackingConfig(uri={redact(self.uri)!r}, database={self.database!r}, "
                f"events_ttl_days={self.events_ttl_days!r})")


@dataclass(frozen=True)
class StorageConfig:
    uri: str = "file"  # or file:///abs/path, or s3://BUCKET?...&secret_key=...

    def __repr__(self) -> str:
        return f"StorageConfig(uri={redact(self.uri)!r})"


@dataclass(frozen=True)
class AuthConfig:
    token_env: str = "FEDRAY_TOKEN"  # the shared federation token is read from this variable


@dataclass(frozen=True)
class TlsConfig:
    cert: str | None = None  # PEM certificate (chain) of the gateway and combiners
    key: str | None = None  # its PEM private key
    ca: str | None = None  # PEM CA that signs client certificates: mutual TLS
    client_auth: bool | None = None  # require a client certificate; default: when ca is set


@dataclass(frozen=True)
class FederationConfig:
    federation: str
    seed_model: str  # a .safetensors path, module:function returning arrays, or model:ID|latest
    package: str | None = None
    data_dir: str | None = None
    ray: RayConfig = field(default_factory=RayConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    combiners: CombinersConfig = field(default_factory=CombinersConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    source: str = "<dict>"  # where the config came from, for error messages

    @property
    def namespace(self) -> str:
        return f"fedray-{self.federation}"

    def resolved_data_dir(self) -> Path:
        """``data_dir`` as loaded (``--data-dir``, else $FEDRAY_DATA_DIR, else the config's),
        else ``~/.fedray/<federation>``; actors on other nodes get the same answer."""
        base = Path(self.data_dir) if self.data_dir else Path.home() / ".fedray" / self.federation
        return base.expanduser().resolve()


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
    blame = _Blame(source, frozenset(overrides or ()))
    for dotted, value in (overrides or {}).items():
        _check_override(dotted)
        _set_dotted(raw, dotted, value, blame)
    if "data_dir" not in blame.overridden and os.environ.get(DATA_DIR_ENV):
        raw["data_dir"] = os.environ[DATA_DIR_ENV]  # over the config's, under --data-dir
    return _from_dict(raw, blame)


def _from_dict(raw: dict[str, Any], blame: _Blame) -> FederationConfig:
    config = _build(FederationConfig, {**raw, "source": blame.source}, "", blame)
    if config.tracking.database is None:  # what the query commands read with the same URI
        database = uri_database(config.tracking.uri) or DEFAULT_DATABASE
        config = dataclasses.replace(
            config, tracking=dataclasses.replace(config.tracking, database=database))
    check(config, blame)
    return config


def uri_database(uri: str) -> str | None:
    """The database a ``mongodb://`` URI names (``/NAME`` after its hosts), if any; read as
    pymongo reads it, whose hosts end at the first '/'."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("mongodb", "mongodb+srv"):
        return None
    return unquote(rest.partition("/")[2].partition("?")[0]) or None


@dataclass(frozen=True)
class _Blame:
    """Where a field's value came from: the config file, or a `--set` override."""

    source: str
    overridden: frozenset[str]

    def origin(self, where: str) -> str | None:
        """The override that set ``where`` (or a section holding it), if one did."""
        return next((o for o in sorted(self.overridden)
                     if where == o or where.startswith(f"{o}.")), None)

    def error(self, where: str, why: str) -> ConfigError:
        origin = self.origin(where)
        if origin is None:
            return ConfigError(f"{self.source}: {where} {why}")
        return ConfigError(f"--set {origin}: {why}" if origin == where
                           else f"--set {origin}: {where} {why}")

    def touched(self, *fields: str) -> str | None:
        """The override that set one of ``fields``, a key below one, or a section above."""
        return next((o for o in sorted(self.overridden) for f in fields
                     if o == f or o.startswith(f"{f}.") or f.startswith(f"{o}.")), None)

    def among(self, fields: tuple[str, ...], where: str, why: str) -> ConfigError:
        """An error about ``where`` that follows from all of ``fields``: blamed on the
        ``--set`` of one of them if there is one, else on the file."""
        origin = self.touched(*fields)
        if origin is None:
            return ConfigError(f"{self.source}: {where} {why}")
        return ConfigError(f"--set {origin}: {why}" if origin == where
                           else f"--set {origin}: {where} {why}")

    def unknown(self, where: str, known: list[str]) -> ConfigError:
        origin = self.origin(where)
        head = f"--set {where}: unknown field" if origin == where else \
            f"--set {origin}: unknown field {where}" if origin else \
            f"{self.source}: unknown field {where}"
        return ConfigError(f"{head} ({_hint(where, known)})")


def _hint(where: str, known: list[str]) -> str:
    prefix, _, name = where.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    return "known: " + ", ".join(sorted(known))


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
            raise ConfigError(f"--set {dotted}: {what} ({_hint(where, _fields(cls))})")
        hint = typing.get_type_hints(cls)[part]
        if hint is dict:
            return
        cls = hint if dataclasses.is_dataclass(hint) else None


def _set_dotted(raw: dict, dotted: str, value: Any, blame: _Blame) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for i, key in enumerate(parents):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise blame.error(".".join(parents[: i + 1]), "must be a mapping")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str, blame: _Blame) -> Any:
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


def _coerce(hint: Any, value: Any, where: str, blame: _Blame) -> Any:
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


def _finite(value: Any, where: str, blame: _Blame) -> Any:
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
