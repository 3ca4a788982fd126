"""The Python API: drive a running federation from a notebook or a script.

    import fedray
    fed = fedray.connect("~/.fedray/digits")          # a data directory, or http://HOST:PORT
    session = fed.start_session(rounds=10, aggregator="fedadam")
    session.wait()                                    # follows it; its final state
    session.rounds()[-1]["validation_metrics"]
    fed.models.download("latest", "model.safetensors")
    for event in fed.events(follow=True): ...

Everything goes through the federation's HTTP API (``fedray.service.app``), so it needs
no Ray, no pymongo and no access to the cluster; the CLI's ``fedray session`` commands use
this same class. Failures are ``fedray.errors.ApiError`` with the API's own message.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedray.api.endpoint import Endpoint, endpoint_of
from fedray.errors import ApiError, NotFound, SessionError

TIMEOUT_S = 30.0
TERMINAL = ("finished", "failed", "stopped")
POLL_S = 20.0  # one long poll of the status


def connect(target: str | Path, token: str | None = None) -> Federation:
    """A handle on the federation at ``target``: its data directory (where ``fedray serve``
    records its API) or the API's URL; ``token`` is the API token (read from the data
    directory, else ``$FEDRAY_API_TOKEN``)."""
    fed = Federation(endpoint_of(target, token))
    fed.info()  # said now if nothing answers there
    return fed


@dataclass(frozen=True)
class Call:
    """One HTTP call's answer."""

    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class Transport:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def call(self, method: str, path: str, body: Any = None, query: Mapping[str, Any] | None = None,
             timeout: float = TIMEOUT_S) -> Call:
        url = self.endpoint.url + "/api/v1" + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.endpoint.token:
            headers["Authorization"] = f"Bearer {self.endpoint.token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                return Call(response.status, response.read(),
                            response.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"the federation's API at {self.endpoint.url} does not answer "
                           f"({reason}); is fedray serve running?") from None

    def json(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        return self.call(method, path, body, query).json()

    def lines(self, path: str, **query: Any) -> Iterator[bytes]:
        """A server-sent event stream's ``data:`` payloads, as they come."""
        url = self.endpoint.url + "/api/v1" + path
        params = {k: v for k, v in query.items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Accept": "text/event-stream"}
        if self.endpoint.token:
            headers["Authorization"] = f"Bearer {self.endpoint.token}"
        try:
            response = urllib.request.urlopen(  # noqa: S310
                urllib.request.Request(url, headers=headers), timeout=None)
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(f"the federation's API at {self.endpoint.url} does not answer "
                           f"({getattr(exc, 'reason', exc)})") from None
        with response:
            for raw in response:
                if raw.startswith(b"data: "):
                    yield raw[6:].rstrip(b"\r\n")


def _api_error(exc: urllib.error.HTTPError) -> ApiError:
    try:
        message = json.loads(exc.read()).get("error") or exc.reason
    except (ValueError, AttributeError):
        message = exc.reason
    if exc.code == 404:
        return NotFound(str(message))
    return ApiError(str(message), exc.code)


class Models:
    """``fed.models()`` lists committed models; ``fed.models.download(id, path)`` saves one."""

    def __init__(self, http: Transport) -> None:
        self.http = http

    def __call__(self, session: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        return self.http.json("GET", "/models", session=session, limit=limit)

    def get(self, model_id: str) -> dict[str, Any]:
        return self.http.json("GET", f"/models/{_quoted(model_id)}")

    def download(self, model_id: str, path: str | Path) -> Path:
        """Write the model (``latest``, an id or a prefix) to ``path``, its sha256 checked."""
        doc = self.get(model_id)
        data = self.http.call("GET", f"/models/{doc['model_id']}/download", timeout=600).body
        if hashlib.sha256(data).hexdigest() != doc["model_id"]:
            raise ApiError(f"model {doc['model_id'][:16]}: the bytes received do not match "
                           "its id (sha256); download it again")
        out = Path(path).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        return out


class Session:
    """A session on the federation (queued, running or ended)."""

    def __init__(self, http: Transport, session_id: str) -> None:
        self.http = http
        self.id = session_id

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def info(self) -> dict[str, Any]:
        return self.http.json("GET", f"/sessions/{_quoted(self.id)}")

    @property
    def state(self) -> str:
        """queued, created, waiting, running, finished, failed or stopped."""
        doc = self.info()
        return str(doc.get("status") or doc.get("state") or "")

    def rounds(self) -> list[dict[str, Any]]:
        return self.http.json("GET", f"/sessions/{_quoted(self.id)}/rounds")

    def validations(self) -> list[dict[str, Any]]:
        return self.http.json("GET", f"/sessions/{_quoted(self.id)}/validations")

    def events(self, level: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        return self.http.json("GET", "/events", session=self.id, level=level, limit=limit)

    def stop(self, reason: str = "", by: str = "") -> dict[str, Any]:
        """Stop it: a queued session never runs, a running one finishes its round first."""
        return self.http.json("POST", f"/sessions/{_quoted(self.id)}/stop",
                              {"reason": reason, "by": by or "fedray.api"})

    def wait(self, timeout: float | None = None,
             on_status: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
        """Follow the session until it ends; its tracking document then. ``on_status`` is
        called with each live status while it runs (round by round)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        version = -1
        while True:
            doc = self._ended()
            if doc is not None:
                return doc
            if deadline is not None and time.monotonic() > deadline:
                raise SessionError(f"session {self.id} did not end within {timeout:g}s")
            wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            answer = self.http.json("GET", "/status", version=version, timeout=wait)
            version, status = answer["version"], answer["status"]
            if status and status.get("session_id") == self.id and on_status is not None:
                on_status(status)

    def _ended(self) -> dict[str, Any] | None:
        try:
            doc = self.info()
        except NotFound:
            return None  # queued a moment ago: tracking does not have it yet
        state = doc.get("status") or doc.get("state")
        return doc if state in TERMINAL else None


class Federation:
    """A running federation, through its HTTP API (``connect`` makes one)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.http = Transport(endpoint)
        self.models = Models(self.http)

    def __repr__(self) -> str:
        return f"fedray.connect({self.endpoint.url!r})"

    def info(self) -> dict[str, Any]:
        """Where everything is: gateway, combiners, tracking, Ray, the API."""
        return self.http.json("GET", "/federation")

    def clients(self, status: str | None = None) -> list[dict[str, Any]]:
        return self.http.json("GET", "/clients", status=status)

    def combiners(self) -> list[dict[str, Any]]:
        return self.http.json("GET", "/combiners")

    def sessions(self, limit: int = 100) -> list[dict[str, Any]]:
        return self.http.json("GET", "/sessions", limit=limit)

    def session(self, session_id: str) -> Session:
        doc = Session(self.http, session_id).info()
        return Session(self.http, str(doc["session_id"]))

    def start_session(self, config: str | Path | None = None, *,
                      set: Sequence[str] = (), submitted_by: str = "",
                      **session: Any) -> Session:
        """Queue a session and return it (it runs once the ones before it have ended).

        ``session`` fields are ``session.*`` settings (``rounds=20``,
        ``aggregator="fedadam"``, ``continue_from=ID``); ``set`` takes ``--set`` style
        overrides (``"seed_model=model:latest"``); ``config`` is a config file whose
        session, seed_model and package are used."""
        overrides = [*set, *(f"session.{k}={json.dumps(v)}" for k, v in session.items())]
        body: dict[str, Any] = {"set": overrides, "submitted_by": submitted_by or "fedray.api"}
        if config is not None:
            body["config"] = Path(config).expanduser().read_text()
        answer = self.http.json("POST", "/sessions", body)
        return Session(self.http, answer["session_id"])

    def stop_session(self, session_id: str, reason: str = "") -> dict[str, Any]:
        return Session(self.http, session_id).stop(reason)

    def status(self) -> dict[str, Any] | None:
        """The current session's live status (None before the first session)."""
        return self.http.json("GET", "/status")["status"]

    def events(self, session: str | None = None, level: str | None = None,
               follow: bool = False, limit: int = 200) -> Iterator[dict[str, Any]]:
        """Events, oldest first; with ``follow``, then every new one as it lands (an
        endless iterator: break out of it)."""
        listed = self.http.json("GET", "/events", session=session, level=level, limit=limit)
        yield from listed
        if follow:  # from the last one listed: the stream drops what it has given
            since = listed[-1].get("ts") if listed else None
            seen = {json.dumps(e, sort_keys=True) for e in listed[-50:]}
            for line in self.http.lines("/events/stream", session=session, level=level,
                                        since=since):
                event = json.loads(line)
                if json.dumps(event, sort_keys=True) not in seen:
                    yield event

    def shutdown(self) -> dict[str, Any]:
        """Stop the whole federation (what ``fedray down`` does)."""
        return self.http.json("POST", "/shutdown")


def _quoted(part: str) -> str:
    return urllib.parse.quote(str(part), safe="")
