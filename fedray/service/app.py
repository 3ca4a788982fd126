"""The federation's HTTP API (FastAPI): tracking to read, sessions to start and stop.

``make_app`` builds it over a ``TrackingReader`` (always) and a ``LiveControl`` (when a
federation runs: ``fedray serve``; ``fedray dashboard`` over a finished run's tracking
has none, and its live endpoints answer 409). Everything is under ``/api/v1``; the
OpenAPI document is ``/api/v1/openapi.json`` (kept in the repo as docs/openapi.json).

Who may call: writes always need the API token (``Authorization: Bearer TOKEN``, the
token in ``<data_dir>/api-token``); reads need it too when the API listens beyond
loopback. Errors are JSON ``{"error": message}``: 400 for a bad request, 401 without the
token, 404 for what is not there, 409 for what the federation's state refuses, 503 when
Ray or tracking does not answer. A bug is a 500 with its type, logged whole.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from fedray.errors import (
    AuthError,
    ConfigError,
    FedrayError,
    NotFound,
    SessionError,
    StorageError,
    TrackingError,
    TransportError,
)
from fedray.service.control import LiveControl
from fedray.service.reader import MAX_LIMIT, TrackingReader
from fedray.service.requests import SessionAsk
from fedray.tracking.query import plain

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
MAX_STREAMS = 32  # event streams open at once; more are refused (503)
KEEPALIVE_S = 15.0
WEB_DIR = Path(__file__).parent / "web"
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]


class ErrorBody(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a bad request (the message says what to fix)"},
    401: {"model": ErrorBody, "description": "the API token is missing or wrong"},
    404: {"model": ErrorBody, "description": "no such session or model"},
    409: {"model": ErrorBody, "description": "the federation's state refuses it"},
    503: {"model": ErrorBody, "description": "Ray or tracking does not answer"},
}


def _status(exc: FedrayError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, ConfigError):
        return 400
    if isinstance(exc, SessionError):
        return 409
    if isinstance(exc, TransportError | TrackingError | StorageError):
        return 503
    return 400


def make_app(reader: TrackingReader, control: LiveControl | None, token: str, *,
             reads_need_token: bool = False,
             on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    app = FastAPI(title="fedray", version="1", openapi_url=f"{PREFIX}/openapi.json",
                  docs_url=None, redoc_url=None, responses=ERRORS,
                  description="A running fedray federation: its tracking, and its sessions. "
                              "Writes need the API token (Authorization: Bearer TOKEN, from "
                              "<data_dir>/api-token); so do reads when the API listens "
                              "beyond loopback.")
    streams = asyncio.Semaphore(MAX_STREAMS)

    @app.exception_handler(FedrayError)
    async def fedray_error(request: Request, exc: FedrayError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=_status(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"},
                            status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("API %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the "
                                      "service's log has the trace"}, status_code=500)

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                                  token.encode())

    def reader_allowed(request: Request) -> None:
        if reads_need_token and not authorized(request):
            raise AuthError("this API listens beyond loopback: send the federation's API "
                               "token (Authorization: Bearer TOKEN; <data_dir>/api-token)")

    def writer_allowed(request: Request) -> None:
        if not authorized(request):
            raise AuthError("writing needs the federation's API token (Authorization: "
                               "Bearer TOKEN; it is in <data_dir>/api-token)")

    def live() -> LiveControl:
        if control is None:
            raise SessionError("no federation runs behind this API (fedray dashboard shows "
                               "a run's tracking); start one with fedray serve")
        return control

    read = [Depends(reader_allowed)]
    write = [Depends(writer_allowed)]

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    # ------------------------------------------------------------------ federation

    @app.get(f"{PREFIX}/federation", dependencies=read, tags=["federation"])
    async def federation() -> dict[str, Any]:
        """Where everything is: gateway, combiners, tracking, Ray, this API."""
        if control is not None:
            return control.info()
        return {"federation": reader.federation, "live": False, "tracking": "",
                "database": reader.database}

    @app.get(f"{PREFIX}/combiners", dependencies=read, tags=["federation"])
    async def combiners() -> list[dict[str, Any]]:
        return await off_loop(reader.combiners)

    @app.get(f"{PREFIX}/clients", dependencies=read, tags=["federation"])
    async def clients(status: Annotated[str | None, Query(max_length=32)] = None,
                      limit: Limit = 1000) -> list[dict[str, Any]]:
        return await off_loop(reader.clients, status, limit)

    # ------------------------------------------------------------------ sessions

    @app.get(f"{PREFIX}/sessions", dependencies=read, tags=["sessions"])
    async def sessions(limit: Limit = 100) -> list[dict[str, Any]]:
        """Sessions, newest first: those queued on a live federation, then tracking's."""
        docs = await off_loop(reader.sessions, limit)
        if control is None:
            return docs
        queue = await off_loop(control.queue)
        known = {d.get("session_id") for d in docs}
        extra = [q for q in [*reversed(queue["queued"]), *queue["ended"]]
                 if q["session_id"] not in known]
        return [plain(q) for q in extra] + docs

    @app.get(f"{PREFIX}/sessions/{{session_id}}", dependencies=read, tags=["sessions"])
    async def session(session_id: str) -> dict[str, Any]:
        if control is not None:
            queue = await off_loop(control.queue)
            for q in [*queue["queued"], *queue["ended"]]:
                if q["session_id"].startswith(session_id.strip().lower()) and session_id:
                    return plain(q)
        return await off_loop(reader.session, session_id)

    @app.get(f"{PREFIX}/sessions/{{session_id}}/rounds", dependencies=read, tags=["sessions"])
    async def rounds(session_id: str, limit: Limit = MAX_LIMIT) -> list[dict[str, Any]]:
        return await off_loop(reader.rounds, session_id, limit)

    @app.get(f"{PREFIX}/sessions/{{session_id}}/validations", dependencies=read,
             tags=["sessions"])
    async def validations(session_id: str, limit: Limit = MAX_LIMIT) -> list[dict[str, Any]]:
        return await off_loop(reader.validations, session_id, limit)

    @app.post(f"{PREFIX}/sessions", dependencies=write, status_code=202, tags=["sessions"])
    async def start_session(body: Annotated[dict[str, Any], Body(
            examples=[{"set": ["session.rounds=20", "session.aggregator=fedadam"]}])]
    ) -> dict[str, Any]:
        """Queue a session: ``config`` (a config file's YAML text; its session, seed_model
        and package are used), ``set`` (``FIELD=VALUE`` overrides, as ``--set``),
        ``submitted_by``. It runs when the sessions before it have ended."""
        ask = SessionAsk.from_json(body)
        return await off_loop(live().submit, ask)

    @app.post(f"{PREFIX}/sessions/{{session_id}}/stop", dependencies=write, tags=["sessions"])
    async def stop_session(session_id: str, request: Request,
                           body: Annotated[dict[str, Any] | None, Body()] = None
                           ) -> dict[str, Any]:
        """Stop a queued or running session: a running one finishes its current round."""
        body = body or {}
        reason = str(body.get("reason") or "")[:500]
        by = str(body.get("by") or (request.client.host if request.client else "api"))[:200]
        return await off_loop(live().stop, session_id, by, reason)

    @app.get(f"{PREFIX}/status", dependencies=read, tags=["sessions"])
    async def status(version: Annotated[int, Query(ge=-1, le=2**53)] = -1,
                     timeout: Annotated[float, Query(ge=0, le=25)] = 0.0,
                     after: Annotated[int | None, Query(ge=0, le=2**53)] = None
                     ) -> dict[str, Any]:
        """The current session's live status: with ``timeout``, waits until it is newer
        than ``version`` (a long poll); ``after`` skips round records already seen."""
        return await off_loop(live().watch, version, timeout, after)

    # ------------------------------------------------------------------ models

    @app.get(f"{PREFIX}/models", dependencies=read, tags=["models"])
    async def models(session: Annotated[str | None, Query(max_length=64)] = None,
                     limit: Limit = 200) -> list[dict[str, Any]]:
        return await off_loop(reader.models, session, limit)

    @app.get(f"{PREFIX}/models/{{model_id}}", dependencies=read, tags=["models"])
    async def model(model_id: str) -> dict[str, Any]:
        """A committed model (an id, a unique prefix of 6+ characters, or ``latest``)."""
        return await off_loop(reader.model, model_id)

    @app.get(f"{PREFIX}/models/{{model_id}}/download", dependencies=read, tags=["models"],
             response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def download(model_id: str) -> Response:
        """The model's bytes (safetensors), checked against its id (its sha256)."""
        doc = await off_loop(reader.model, model_id)
        if control is None:
            raise SessionError("downloads need the running federation's model store; "
                               "use fedray models get on the machine that holds it")
        data = await off_loop(_model_bytes, control, doc["model_id"])
        return Response(data, media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{doc["model_id"][:16]}.safetensors"'})

    # ------------------------------------------------------------------ events

    @app.get(f"{PREFIX}/events", dependencies=read, tags=["events"])
    async def events(session: Annotated[str | None, Query(max_length=64)] = None,
                     level: Annotated[str | None, Query(max_length=16)] = None,
                     limit: Limit = 200) -> list[dict[str, Any]]:
        return await off_loop(reader.events, session, level, limit)

    @app.get(f"{PREFIX}/events/stream", dependencies=read, tags=["events"],
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def event_stream(request: Request,
                           session: Annotated[str | None, Query(max_length=64)] = None,
                           level: Annotated[str | None, Query(max_length=16)] = None,
                           since: Annotated[dt.datetime | None, Query()] = None
                           ) -> StreamingResponse:
        """Server-sent events: each new event as ``data: JSON`` as it lands (from
        ``since``, else from now)."""
        return await _stream(request, streams, lambda: reader.event_tail(session, level, since))

    @app.get(f"{PREFIX}/rounds/stream", dependencies=read, tags=["sessions"],
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def round_stream(request: Request,
                           session: Annotated[str | None, Query(max_length=64)] = None,
                           since: Annotated[dt.datetime | None, Query()] = None
                           ) -> StreamingResponse:
        """Server-sent events: each round document as it starts and as it changes."""
        return await _stream(request, streams, lambda: reader.round_tail(session, since))

    # ------------------------------------------------------------------ service

    @app.post(f"{PREFIX}/shutdown", dependencies=write, status_code=202, tags=["federation"])
    async def shutdown() -> dict[str, Any]:
        """Stop the federation (what fedray down does): its running session is recorded
        as stopped, the actors, tracking and a local Ray go."""
        if on_shutdown is None:
            raise SessionError("this API runs no federation to shut down")
        asyncio.get_running_loop().call_later(0.1, on_shutdown)
        return {"stopping": True}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = WEB_DIR / "index.html"
        if not page.is_file():
            return JSONResponse({"api": f"{PREFIX}/openapi.json"})
        return FileResponse(page, media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name == "plotly.min.js":  # the bundle the plotly package ships
            return FileResponse(_plotly_bundle(), media_type="text/javascript",
                                headers={"Cache-Control": "max-age=86400"})
        path = (WEB_DIR / name).resolve()
        if path.parent != WEB_DIR.resolve() or not path.is_file():
            raise NotFound(f"no file {name!r}")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    return app


def _plotly_bundle() -> Path:
    try:
        import plotly
    except ModuleNotFoundError:
        raise NotFound("the web view's charts need plotly: pip install \"fedray[server]\"") \
            from None
    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def _model_bytes(control: LiveControl, model_id: str) -> bytes:
    return control.up.store.get(model_id)


async def _stream(request: Request, streams: asyncio.Semaphore, open_tail) -> StreamingResponse:
    if streams.locked():
        raise TransportError(f"{MAX_STREAMS} streams are open already; close one")
    await streams.acquire()  # not locked: returns at once, nothing can come between
    try:
        tail, store = await asyncio.to_thread(open_tail)  # a bad session id is a 404 here
    except BaseException:
        streams.release()
        raise

    async def lines() -> AsyncIterator[bytes]:
        quiet = 0.0
        try:
            yield b": fedray\n\n"
            while not await request.is_disconnected():
                fresh = await asyncio.to_thread(tail.poll)
                for doc in fresh:
                    yield f"data: {json.dumps(plain(doc), allow_nan=False)}\n\n".encode()
                wait = tail.settle(bool(fresh))
                quiet = 0.0 if fresh else quiet + wait
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield b": keepalive\n\n"
                await asyncio.sleep(wait)
        finally:
            streams.release()
            await asyncio.to_thread(store.close)

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})
