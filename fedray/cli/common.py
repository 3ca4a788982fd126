"""What several command groups share: the tracking options, the data directory they name,
and the tracking connection made from them.

A query, ``plot``, ``token`` and ``models get`` all read a federation's tracking: through
``--tracking URI``, else the embedded server of ``--data-dir`` (default: the newest
federation under ~/.fedray). Nothing here imports a server extra at module level, so the
edge-only install can still load every command group and print its help.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console

from fedray.errors import ConfigError

if TYPE_CHECKING:
    from fedray.tracking.store import TrackingStore

DATA_DIR_ENV = "FEDRAY_DATA_DIR"  # fedray.config's, without importing it
TRACKING_MODULES = ("pymongo", "nx_27017")  # what reading tracking needs of [server]

F = TypeVar("F", bound=Callable[..., Any])

database_option = click.option(
    "--database", default=None, metavar="NAME",
    help="The tracking database (default: the URI's, else 'fedray'; a config's "
         "tracking.database).")


def tracking_options(command: F) -> F:
    """``--data-dir``, ``--tracking`` and ``--database``, in that order in the help."""
    command = database_option(command)
    command = click.option("--tracking", "tracking_uri", default=None, metavar="URI",
                           help="A mongodb:// URI instead of the embedded tracking of "
                                "--data-dir.")(command)
    return click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                        help="A federation's data directory (default: the newest under "
                             "~/.fedray).")(command)


def stderr_console() -> Console:
    return Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def tracking(data_dir: Path | None, tracking_uri: str | None) -> Iterator[str]:
    """The tracking URI to query: --tracking, else the embedded server of the data directory
    (started for the command, and stopped after it, when it is not already running)."""
    from fedray.tracking.embedded import connect_or_start

    if tracking_uri is not None:
        yield tracking_uri
        return
    uri, server = connect_or_start(federation_dir(data_dir, "tracking"))
    try:
        yield uri
    finally:
        if server is not None:
            server.stop()


def federation_dir(data_dir: Path | None, needs: str = "tracking") -> Path:
    """``data_dir`` (else the default) once it is a federation's: it has ``needs`` (its
    tracking/ folder, or itself). A mistyped path must not get an empty tracking server,
    nor a fresh token secret that no federation knows."""
    folder = data_dir or default_data_dir()
    where = "--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}" \
        if os.environ.get(DATA_DIR_ENV) else "the data directory"
    wanted = folder / needs if needs else folder
    if not wanted.is_dir():
        what = f"{wanted} is missing" if needs else "no such folder"
        raise ConfigError(f"{where} {folder}: not a federation's data directory ({what}): "
                          "a mistyped path, or no `fedray run` used it yet")
    return folder


def default_data_dir() -> Path:
    """$FEDRAY_DATA_DIR, else the most recently used federation under ~/.fedray."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    root = Path.home() / ".fedray"
    candidates = [d for d in root.glob("*") if (d / "tracking").is_dir()] if root.is_dir() else []
    if not candidates:
        raise ConfigError("no federation data found under ~/.fedray; pass --data-dir or --tracking")
    newest = max(candidates, key=lambda d: (d / "tracking").stat().st_mtime)
    click.echo(f"(tracking of {newest})", err=True)
    return newest


@contextlib.contextmanager
def token_store(data_dir: Path | None, tracking_uri: str | None,
                 database: str | None) -> Iterator[TrackingStore]:
    from fedray.tracking.store import TrackingStore

    with tracking(data_dir, tracking_uri) as uri:
        store = TrackingStore.from_uri(uri, database)
        try:
            yield store
        finally:
            store.close()


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_expiry(text: str | None, option: str = "--expires") -> float | None:
    """``30m``, ``8h``, ``90d``... from now, as a Unix time (None: never)."""
    if text is None:
        return None
    match = _DURATION.match(text.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"{option} {text!r}: a duration such as 30m, 8h or 90d")
    return time.time() + float(match.group(1)) * _UNITS[match.group(2)]


def credential_table(rows: list[dict], title: str):
    from datetime import UTC, datetime

    from rich.table import Table
    from rich.text import Text

    from fedray.text import printable

    now = datetime.now(UTC)
    table = Table("name", "kind", "id", "created", "state", "attrs", title=title)
    for row in rows:
        when, expires = row["revoked_at"], row.get("expires_at")
        if expires is not None and expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        state = (f"revoked {when:%Y-%m-%d %H:%M}" if row["revoked"] and when else
                 "revoked" if row["revoked"] else
                 f"expired {expires:%Y-%m-%d %H:%M}" if expires and expires <= now else
                 f"live until {expires:%Y-%m-%d %H:%M}" if expires else "live")
        created = row["created_at"]
        attrs = ", ".join(f"{k}={v}" for k, v in (row.get("attrs") or {}).items())
        table.add_row(Text(printable(str(row["name"]), newlines=False)), row["kind"],
                      Text(str(row["id"])), f"{created:%Y-%m-%d %H:%M}" if created else "",
                      state, Text(printable(attrs, newlines=False)))
    return table


def api_options(command: F) -> F:
    """``--data-dir`` and ``--api``: which running federation a command drives."""
    command = click.option("--api", "api_url", default=None, metavar="URL",
                           help="The federation's API, http://HOST:PORT (token from "
                                "$FEDRAY_API_TOKEN), instead of --data-dir.")(command)
    return click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                        help="The data directory of the federation fedray serve runs "
                             "(default: the one serving under ~/.fedray).")(command)


def connect_to(data_dir: Path | None, api_url: str | None):
    """The ``fedray.api`` handle on the running federation the options name."""
    from fedray.api import connect

    if api_url:
        return connect(api_url)
    if data_dir is None and os.environ.get(DATA_DIR_ENV):
        data_dir = Path(os.environ[DATA_DIR_ENV])
    if data_dir is None:
        root = Path.home() / ".fedray"
        serving = sorted((p.parent for p in root.glob("*/api.json")),
                         key=lambda d: (d / "api.json").stat().st_mtime) if root.is_dir() else []
        if not serving:
            from fedray.errors import NotRunning

            raise NotRunning("no federation is serving under ~/.fedray; start one with "
                             "fedray serve CONFIG, or pass --data-dir or --api")
        data_dir = serving[-1]
    return connect(data_dir)
