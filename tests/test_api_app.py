"""The HTTP API's own rules, over a real server and real tracking (no federation behind
it, as `fedray dashboard` serves it): who may call, what is refused, what streams."""

from __future__ import annotations

import datetime as dt
import json
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from fedray.service.app import make_app
from fedray.service.reader import TrackingReader
from fedray.service.server import ApiServer

TOKEN = "t0ken-for-tests"


@pytest.fixture
def api(tracking_uri, db_name, store):
    def start(reads_need_token: bool = False) -> str:
        app = make_app(TrackingReader(tracking_uri, db_name, ""), None, TOKEN,
                       reads_need_token=reads_need_token)
        server = ApiServer(app, "127.0.0.1", 0).start()
        servers.append(server)
        return server.url

    servers: list[ApiServer] = []
    yield start
    for server in servers:
        server.stop()


def _call(url: str, method: str = "GET", token: str | None = None, body=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_writes_need_the_token_and_a_dashboard_runs_no_sessions(api):
    url = api()
    status, body = _call(f"{url}/api/v1/sessions", "POST", body={"set": []})
    assert status == 401 and b"API token" in body
    status, body = _call(f"{url}/api/v1/sessions", "POST", TOKEN, {"set": []})
    assert status == 409 and b"fedray serve" in body
    status, body = _call(f"{url}/api/v1/federation")
    assert status == 200 and json.loads(body)["live"] is False


def test_beyond_loopback_every_read_needs_the_token(api):
    url = api(reads_need_token=True)
    assert _call(f"{url}/api/v1/sessions")[0] == 401
    assert _call(f"{url}/api/v1/sessions", token="wrong")[0] == 401
    assert _call(f"{url}/api/v1/sessions", token=TOKEN) == (200, b"[]")


def test_what_is_not_there_is_a_404_with_a_message_and_files_stay_in_their_folder(api):
    url = api()
    status, body = _call(f"{url}/api/v1/sessions/abcdef12")
    assert status == 404 and "no session id starts with it" in json.loads(body)["error"]
    assert _call(f"{url}/static/..%2F..%2Fapp.py")[0] == 404
    assert _call(f"{url}/static/app.js")[0] == 200
    status, body = _call(f"{url}/")
    assert status == 200 and b"<title>fedray</title>" in body
    status, body = _call(f"{url}/api/v1/events?level=loud")
    assert status == 400 and "level" in json.loads(body)["error"]


def test_the_event_stream_sends_events_from_since_and_then_as_they_land(api, store):
    url = api()
    got: list[dict] = []
    arrived = threading.Event()
    since = urllib.parse.quote(dt.datetime.now(dt.UTC).isoformat())
    store.event("info", "test", "before the stream's start")  # given: at or after since

    def read() -> None:
        with urllib.request.urlopen(f"{url}/api/v1/events/stream?since={since}",
                                    timeout=30) as response:
            for raw in response:
                if raw.startswith(b"data: "):
                    got.append(json.loads(raw[6:]))
                    arrived.set()
                    if len(got) == 2:
                        return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert arrived.wait(15), "no event streamed"
    assert got[0]["message"] == "before the stream's start" and got[0]["level"] == "info"
    store.event("warning", "test", "landed while it streamed")
    reader.join(15)
    assert [e["message"] for e in got] == ["before the stream's start",
                                           "landed while it streamed"]
