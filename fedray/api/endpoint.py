"""Where a federation's HTTP API is, and its token: two files in the data directory.

``fedray serve`` writes ``<data_dir>/api.json`` (its URL, the federation, its pid) while it
runs and keeps ``<data_dir>/api-token`` (0600, made once, the same across restarts), so
``fedray.connect(data_dir)`` and the CLI on the same machine need nothing else. From
another machine: ``fedray.connect(URL, token=...)`` or ``$FEDRAY_API_TOKEN``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from fedray.errors import ConfigError, NotRunning

RECORD = "api.json"
TOKEN_FILE = "api-token"
TOKEN_ENV = "FEDRAY_API_TOKEN"


@dataclass(frozen=True)
class Endpoint:
    url: str
    token: str = ""
    federation: str = ""


def api_token(data_dir: Path) -> str:
    """The data directory's API token, made (0600) the first time."""
    path = Path(data_dir) / TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


def record_api(data_dir: Path, url: str, federation: str):
    """Say where the API is while it runs; returns the call that takes it back."""
    path = Path(data_dir) / RECORD
    path.write_text(json.dumps({"url": url, "federation": federation,
                                "pid": os.getpid()}) + "\n")
    return lambda: path.unlink(missing_ok=True)


def endpoint_of(target: str | Path, token: str | None = None) -> Endpoint:
    """An API URL (``http://HOST:PORT``) or a data directory, as the endpoint to call."""
    text = str(target)
    if text.startswith(("http://", "https://")):
        return Endpoint(text.rstrip("/"), token or os.environ.get(TOKEN_ENV, ""))
    data_dir = Path(text).expanduser()
    try:
        record = json.loads((data_dir / RECORD).read_text())
        url, federation = str(record["url"]), str(record.get("federation", ""))
    except FileNotFoundError:
        if not data_dir.is_dir():
            raise ConfigError(f"{data_dir}: neither an API URL (http://HOST:PORT) nor a "
                              "federation's data directory") from None
        raise NotRunning(f"no federation serves from {data_dir} (no {RECORD}); start one "
                         "with fedray serve CONFIG") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{data_dir / RECORD}: unreadable ({exc})") from None
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
        with contextlib.suppress(OSError):
            token = (data_dir / TOKEN_FILE).read_text().strip()
    return Endpoint(url, token, federation)
