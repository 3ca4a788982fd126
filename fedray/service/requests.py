"""What a session asked of a running federation may change, and the config it runs with.

A session may bring its own ``session`` settings, ``seed_model`` and ``package``; the rest
of a config (Ray, the combiners, the gateway, tracking, storage, TLS, the API) belongs to
the running service and changes only with a restart. ``session_config`` takes the
service's config, the user's config file (if any) and ``--set`` overrides, and gives the
config the session runs with, every check of ``fedray run`` applied; what would need a
restart is refused with the fields named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedray.config import FederationConfig
from fedray.deploy.config_file import config_from_dict, load_yaml, parse_override
from fedray.errors import ConfigError

PER_SESSION = ("session", "seed_model", "package")  # what a session may set for itself
MAX_CONFIG_BYTES = 256 * 1024  # a config file sent with a session
MAX_OVERRIDES = 64


@dataclass(frozen=True)
class SessionAsk:
    """A request to start a session, as the API receives it (JSON body)."""

    config: str = ""  # a config file's YAML text; only its per-session fields are used
    set: Sequence[str] = field(default_factory=tuple)  # "session.rounds=20", as --set
    submitted_by: str = ""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> SessionAsk:
        config, overrides = body.get("config") or "", body.get("set") or []
        if not isinstance(config, str) or len(config.encode()) > MAX_CONFIG_BYTES:
            raise ConfigError(f"'config' must be a config file's YAML text of at most "
                              f"{MAX_CONFIG_BYTES} bytes")
        if not isinstance(overrides, list) or len(overrides) > MAX_OVERRIDES \
                or not all(isinstance(item, str) for item in overrides):
            raise ConfigError(f"'set' must be a list of at most {MAX_OVERRIDES} strings "
                              "FIELD=VALUE, e.g. [\"session.rounds=20\"]")
        who = body.get("submitted_by") or ""
        return cls(config, tuple(overrides), str(who)[:200])


def session_config(running: FederationConfig, ask: SessionAsk) -> FederationConfig:
    """The config the asked session runs with (see the module)."""
    base = _raw(running)
    if ask.config:
        given = load_yaml(ask.config)
        if not isinstance(given, dict):
            raise ConfigError("the session's config: the top level must be a mapping of fields")
        restart = _needs_restart(running, given)
        if restart:
            raise ConfigError(f"the session's config changes {', '.join(restart)}, which a "
                              "running federation keeps; set only session.*, seed_model and "
                              "package per session (or fedray down, then fedray serve the new "
                              "config)")
        for key in PER_SESSION:
            if key in given:
                base[key] = given[key]
    overrides = dict(parse_override(item) for item in ask.set)
    restart = sorted(k for k in overrides if k.partition(".")[0] not in PER_SESSION)
    if restart:
        raise ConfigError(f"--set {restart[0]}: a running federation keeps it; a session sets "
                          "only session.*, seed_model and package")
    return config_from_dict(base, running.source, overrides)


def _raw(config: FederationConfig) -> dict[str, Any]:
    raw = dataclasses.asdict(config)
    raw.pop("source", None)
    return raw


def _needs_restart(running: FederationConfig, given: Mapping[str, Any]) -> list[str]:
    """The fields of ``given`` outside PER_SESSION whose value differs from the running
    config's (a config file that repeats the service's settings is fine)."""
    have = _raw(running)
    out: list[str] = []

    def walk(node: Any, ours: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and isinstance(ours, Mapping):
            for key, value in node.items():
                if key in ("data_dir", "source"):
                    continue
                walk(value, ours.get(key, _MISSING), f"{prefix}{key}.")
        elif node != ours and not (ours is _MISSING and node is None):
            out.append(prefix.rstrip("."))

    for key, value in given.items():
        if key not in PER_SESSION and key not in ("data_dir",):
            walk(value, have.get(key, _MISSING), f"{key}.")
    return sorted(out)


_MISSING = object()
