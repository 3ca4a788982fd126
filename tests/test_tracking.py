"""Tracking against real servers: the embedded nx-27017, and MongoDB when one is given.

Every ``store`` test runs against each backend of the session-scoped ``mongo_uri``
fixture: an embedded server started once for the file, and the MongoDB named by
``FEDRAY_TEST_MONGO_URI`` when that is set. Each test works in a database of its own.
Tests that stop and restart a server start their own embedded one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pymongo.errors import DuplicateKeyError
from rich.console import Console

from fedray.errors import ConfigError, TrackingError
from fedray.tracking.documents import LEVELS, make_event, written_at
from fedray.tracking.embedded import EmbeddedMongo, connect_or_start, live_uri, read_server_record
from fedray.tracking.indexes import INDEXES
from fedray.tracking.loopback import free_port
from fedray.tracking.mongo import is_transient
from fedray.tracking.query import parse_filter, render_table, run_query, to_json
from fedray.tracking.store import COLLECTIONS, TrackingStore
from fedray.tracking.writer import TrackingWriter
from tests.waiting import wait_until

MODEL_A = "a" * 64
MODEL_B = "b" * 64


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMongo]:
    server = EmbeddedMongo(tmp_path_factory.mktemp("federation")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session", params=["embedded", "mongodb"])
def mongo_uri(request: pytest.FixtureRequest) -> str:
    if request.param == "mongodb":
        uri = os.environ.get("FEDRAY_TEST_MONGO_URI")
        if not uri:
            pytest.skip("FEDRAY_TEST_MONGO_URI is not set: no real MongoDB to test against")
        return uri
    return request.getfixturevalue("embedded_server").uri


@pytest.fixture
def db_name() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def store(mongo_uri: str, db_name: str) -> Iterator[TrackingStore]:
    store = TrackingStore.from_uri(mongo_uri, db_name)
    store.ensure_indexes()
    yield store
    store.db.client.drop_database(db_name)
    store.close()


def _at(seconds: float) -> datetime:
    return datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)


# store


def test_indexes_exist_and_are_enforced(store: TrackingStore) -> None:
    store.ensure_indexes()  # a second time is harmless

    for collection, indexes in INDEXES.items():
        info = store.db[collection].index_information()
        # compare keys, not names: nx-27017 names indexes differently from MongoDB
        found = {
            tuple(k for k, _ in spec["key"]): bool(spec.get("unique")) for spec in info.values()
        }
        for keys, unique in indexes:
            assert found.get(keys) == unique, (collection, keys, found)
    store.db.sessions.insert_one({"session_id": "dup"})
    with pytest.raises(DuplicateKeyError):
        store.db.sessions.insert_one({"session_id": "dup"})


def test_sessions(store: TrackingStore) -> None:
    config = {"rounds": 3, "lr": np.float32(0.5), "layers": (1, 2)}
    with written_at(_at(0)):
        assert store.create_session("s1", "digits", config, 3, MODEL_A) is True
    with written_at(_at(1)):
        assert store.create_session("s2", "faces", {}, 5, MODEL_B) is True
    assert store.create_session("s1", "digits", {}, 9, MODEL_B) is False

    store.update_session("s1", status="running", rounds_done=1, model_id=MODEL_B)

    s1 = store.get_session("s1")
    assert s1 is not None and "_id" not in s1
    assert s1["status"] == "running" and s1["rounds_done"] == 1 and s1["rounds_planned"] == 3
    assert s1["config"] == {"rounds": 3, "lr": 0.5, "layers": [1, 2]}
    assert s1["model_id"] == MODEL_B
    assert s1["created_at"] == _at(0) and s1["created_at"].tzinfo is not None
    assert s1["created_at"].utcoffset() == timedelta(0)
    assert s1["updated_at"] > _at(0) - timedelta(days=3650)
    assert store.get_session("nope") is None
    assert store.latest_session()["session_id"] == "s2"
    assert store.latest_session("digits")["session_id"] == "s1"
    assert store.latest_session("unknown") is None
    with pytest.raises(TrackingError, match="no session 'nope'"):
        store.update_session("nope", status="failed")


def test_datetimes_set_on_existing_documents_stay_datetimes(store: TrackingStore) -> None:
    store.create_session("s1", "digits", {}, 1, MODEL_A)
    store.start_round("s1", 1)
    store.upsert_client("c1")
    store.upsert_combiner("combiner-0")

    with written_at(_at(10)):
        store.update_session("s1", status="running")
        store.start_round("s1", 1)
        store.upsert_client("c1", status="offline")
        store.upsert_combiner("combiner-0", status="online")
        store.increment_combiner_restarts("combiner-0")
    with written_at(_at(11)):
        store.update_round("s1", 1, status="failed", reason="too few updates")

    session, round_ = store.get_session("s1"), store.get_round("s1", 1)
    client, combiner = store.find("clients")[0], store.find("combiners")[0]
    assert session["updated_at"] == _at(10)
    assert (round_["started_at"], round_["updated_at"]) == (_at(10), _at(11))
    assert client["last_seen"] == _at(10) and combiner["updated_at"] == _at(10)
    assert store.find("rounds", {"updated_at": {"$gt": _at(10.5)}}) == [round_]


def test_rounds(store: TrackingStore) -> None:
    share = {"asked": 3, "updates": 3, "rejected": 1, "rejections": {"non_finite": 1},
             "failed": 0, "failures": {}, "close_reason": "all_answered", "seconds": 1.5,
             "bytes_in": 300, "bytes_out": 900, "aggregation_s": 0.01}  # fmt: skip
    store.start_round("s1", 1, clients_asked={"combiner-0": 4})
    store.start_round("s1", 1, clients_asked={"combiner-0": 5})  # a rerun: the same document

    store.update_round(
        "s1",
        1,
        status="finished",
        model_id=MODEL_A,
        train_metrics={"loss": np.float64(0.25)},
        **{"combiners.combiner-0": share},
    )

    doc = store.get_round("s1", 1)
    assert doc is not None and "_id" not in doc
    assert doc["status"] == "finished" and doc["clients_asked"] == {"combiner-0": 5}
    assert doc["combiners"] == {"combiner-0": share}
    assert doc["train_metrics"] == {"loss": 0.25}
    assert doc["started_at"].tzinfo is not None
    assert store.db.rounds.count_documents({"session_id": "s1"}) == 1
    assert store.get_round("s1", 2) is None
    with pytest.raises(TrackingError, match="no round 2"):
        store.update_round("s1", 2, status="failed")


def test_models(store: TrackingStore) -> None:
    tensors = {"layer.0.weight": ("F32", (4, 3)), "bias": {"dtype": "F32", "shape": [3]}}

    assert store.add_model(MODEL_A, None, "s1", 0, 100, "file:///m/a", tensors) is True
    assert store.add_model(MODEL_A, None, "s1", 0, 100, "file:///m/a", tensors) is False
    assert store.add_model(MODEL_B, MODEL_A, "s1", 1, 100, "file:///m/b", {"w": np.zeros((2, 2))})

    a, b = store.get_model(MODEL_A), store.get_model(MODEL_B)
    assert a["tensors"] == [
        {"name": "layer.0.weight", "dtype": "F32", "shape": [4, 3]},
        {"name": "bias", "dtype": "F32", "shape": [3]},
    ]
    assert a["parent_id"] is None and a["size"] == 100 and a["storage_uri"] == "file:///m/a"
    assert b["parent_id"] == MODEL_A and b["round"] == 1
    assert b["tensors"] == [{"name": "w", "dtype": "float64", "shape": [2, 2]}]
    assert store.db.models.count_documents({}) == 2


def test_clients_and_combiners(store: TrackingStore) -> None:
    with written_at(_at(0)):
        store.upsert_client("c1", name="alice", combiner="combiner-0", status="online")
    with written_at(_at(5)):
        store.upsert_client("c1", status="training")

    client = store.find("clients", {"client_id": "c1"})[0]
    assert client["name"] == "alice" and client["status"] == "training"
    assert client["first_seen"] == _at(0) and client["last_seen"] == _at(5)

    store.upsert_combiner("combiner-0", address="127.0.0.1:12081", status="online", clients=1)
    store.increment_combiner_restarts("combiner-0")
    store.increment_combiner_restarts("combiner-0")
    store.increment_combiner_restarts("combiner-1")  # unknown so far: created
    store.upsert_combiner("combiner-2", restarts=7)

    combiners = {c["name"]: c for c in store.find("combiners")}
    assert combiners["combiner-0"]["restarts"] == 2
    assert combiners["combiner-0"]["address"] == "127.0.0.1:12081"
    assert combiners["combiner-1"]["restarts"] == 1
    assert combiners["combiner-2"]["restarts"] == 7


def test_upserts_that_create_a_document_give_it_every_required_field(
        store: TrackingStore) -> None:
    from fedray.tracking import checker

    store.upsert_combiner("combiner-3", clients=4)  # a client count before its address
    store.increment_combiner_restarts("combiner-4")
    store.upsert_client("c7", status="online")  # a status before its name and combiner
    store.upsert_client("c8", name="bob")
    for collection in ("combiners", "clients"):
        for doc in store.db[collection].find({}):
            checker.validate(collection, doc)
    combiners = {c["name"]: c for c in store.find("combiners")}
    assert (combiners["combiner-3"]["address"], combiners["combiner-3"]["clients"]) == ("", 4)
    assert combiners["combiner-4"]["restarts"] == 1
    clients = {c["client_id"]: c for c in store.find("clients")}
    assert clients["c7"]["name"] == "c7" and clients["c8"]["status"] == "offline"
    store.upsert_combiner("combiner-3", address="h:1", status="stopped")  # later writes win
    assert store.find("combiners", {"name": "combiner-3"})[0]["status"] == "stopped"


def test_validations_packages_and_events(store: TrackingStore) -> None:
    validation = {"session_id": "s1", "round": 1, "client_id": "c1", "model_id": MODEL_A,
                  "combiner": "combiner-0", "metrics": {"accuracy": np.float32(0.75)},
                  "num_examples": 10}  # fmt: skip
    store.add_validation(validation)
    store.add_validation(validation)  # a retry of the same write: stored once
    assert store.add_package("f" * 64, name="digits", size=1234) is True
    assert store.add_package("f" * 64, name="again", size=1) is False

    store.event("info", "controller", "session started", session_id="s1")
    store.event("error", "combiner-0", "update rejected", session_id="s1", round=1,
                data={"reason": "non_finite", "values": np.array([1, 2])})  # fmt: skip
    events = [make_event("debug", "test", f"e{i}") for i in range(3)]
    store.insert_events(events)
    store.insert_events(events + [make_event("warning", "test", "new")])  # retried batch

    [stored] = store.find("validations")
    assert stored["metrics"] == {"accuracy": 0.75} and stored["ts"].tzinfo is not None
    assert store.find("packages", {"sha256": "f" * 64})[0]["name"] == "digits"
    assert store.db.events.count_documents({}) == 6
    [error] = store.find("events", {"level": "error"})
    assert error["data"] == {"reason": "non_finite", "values": [1, 2]}
    assert error["round"] == 1 and error["source"] == "combiner-0"
    with pytest.raises(ValueError, match="level"):
        store.event("fatal", "test", "nope")


def test_find(store: TrackingStore) -> None:
    for i in range(5):
        with written_at(_at(i)):
            store.event("info" if i % 2 else "error", "test", f"m{i}", round=i)

    newest = store.find("events", {"level": "info"}, sort=[("ts", -1)], limit=1)
    everything = store.find("events", None, sort=[("round", 1)])

    assert [d["message"] for d in newest] == ["m3"]
    assert [d["round"] for d in everything] == [0, 1, 2, 3, 4]
    assert all("_id" not in d for d in everything)
    with pytest.raises(ValueError, match="unknown tracking collection"):
        store.find("network.clients")


def test_from_uri_database_choice(mongo_uri: str) -> None:
    base = mongo_uri.split("?")[0].rstrip("/")
    assert TrackingStore.from_uri(mongo_uri).db.name == "fedray"
    assert TrackingStore.from_uri(base + "/fromuri").db.name == "fromuri"
    assert TrackingStore.from_uri(base + "/fromuri", "explicit").db.name == "explicit"


def test_unreachable_and_invalid_uris() -> None:
    uri = f"mongodb://fedray:secret@127.0.0.1:{free_port()}/"
    store = TrackingStore.from_uri(uri, timeout_s=0.3)

    with pytest.raises(TrackingError) as info:
        store.ping()

    assert f"127.0.0.1:{uri.rsplit(':', 1)[1].rstrip('/')}" in str(info.value)
    assert "secret" not in str(info.value)
    assert is_transient(info.value)
    with pytest.raises(TrackingError, match="notmongo://"):
        TrackingStore.from_uri("notmongo://host")


# writer


class CountingStore(TrackingStore):
    """A real store that also counts how many event batches it wrote."""

    batches: list[int] = []

    def insert_events(self, docs: Sequence[dict[str, Any]]) -> None:
        CountingStore.batches.append(len(docs))
        super().insert_events(docs)


def test_writer_delivers_in_order_and_batches_events(mongo_uri: str, db_name: str) -> None:
    CountingStore.batches = []
    store = TrackingStore.from_uri(mongo_uri, db_name)
    release = threading.Event()

    def held_store() -> TrackingStore:  # the writer waits here until all is queued
        release.wait(10)
        return CountingStore.from_uri(mongo_uri, db_name)

    writer = TrackingWriter(held_store)
    config = {"lr": 0.1}
    try:
        writer.submit("create_session", "s1", "digits", config, 2, MODEL_A)
        config["lr"] = 99.0  # arguments were copied at submit
        writer.submit("update_session", "s1", status="running")
        for i in range(200):
            writer.event("info", "test", f"e{i}", session_id="s1")
        writer.submit("start_round", "s1", 1)
        assert writer.pending == 203
        release.set()

        assert writer.flush(20)

        assert store.get_session("s1")["config"] == {"lr": 0.1}
        assert store.get_session("s1")["status"] == "running"
        assert store.db.events.count_documents({"session_id": "s1"}) == 200
        assert store.get_round("s1", 1)["status"] == "running"
        assert CountingStore.batches == [200]  # consecutive events: one insert_many
        assert writer.written == 203 and writer.dropped == 0
    finally:
        assert writer.close()
        store.db.client.drop_database(db_name)
        store.close()


def test_writer_drops_refused_writes_and_goes_on(
    mongo_uri: str, db_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = TrackingStore.from_uri(mongo_uri, db_name)
    with TrackingWriter(lambda: TrackingStore.from_uri(mongo_uri, db_name)) as writer:
        writer.submit("update_session", "missing", status="failed")
        writer.submit("upsert_client", "c1", status="online")

        with caplog.at_level(logging.ERROR, logger="fedray.tracking.writer"):
            assert writer.flush(20)

        assert writer.dropped == 1 and writer.written == 1
        assert "no session 'missing'" in caplog.text
        assert store.find("clients")[0]["status"] == "online"
        with pytest.raises(ValueError, match="not a TrackingStore write method"):
            writer.submit("find", "events")
        with pytest.raises(ValueError, match="level"):
            writer.event("loud", "test", "x")
    with pytest.raises(TrackingError, match="closed"):
        writer.submit("upsert_client", "c2")
    store.db.client.drop_database(db_name)
    store.close()


def test_writer_survives_a_server_restart(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fedray.tracking.writer")
    server = EmbeddedMongo(tmp_path).start()
    port = server.port
    writer = TrackingWriter(
        lambda: TrackingStore.from_uri(server.uri, "restart", timeout_s=1.0), max_backoff_s=0.5
    )
    try:
        writer.submit("create_session", "s1", "digits", {}, 3, MODEL_A)
        assert writer.flush(10)
        server.stop()
        submitted = datetime.now(UTC)
        writer.submit("update_session", "s1", status="running")
        for r in range(3):
            writer.submit("start_round", "s1", r)
            writer.event("info", "test", f"round {r}", session_id="s1", round=r)
        writer.submit("add_model", MODEL_B, MODEL_A, "s1", 1, 10, "file:///b", {"w": ("F32", [1])})
        wait_until(lambda: "unreachable, will retry" in caplog.text, "the writer to retry")
        assert writer.pending > 0

        server.start()
        restarted = datetime.now(UTC)

        assert server.port == port
        assert writer.flush(30)
        store = TrackingStore.from_uri(server.uri, "restart")
        assert store.get_session("s1")["status"] == "running"
        assert [store.get_round("s1", r)["status"] for r in range(3)] == ["running"] * 3
        events = store.find("events", {"session_id": "s1"}, sort=[("round", 1)])
        assert [e["message"] for e in events] == ["round 0", "round 1", "round 2"]
        assert all(submitted - timedelta(seconds=1) <= e["ts"] < restarted for e in events)
        assert store.get_round("s1", 0)["started_at"] < restarted  # stamped at submit
        assert store.get_model(MODEL_B)["parent_id"] == MODEL_A
        store.close()
    finally:
        writer.close(timeout=5)
        server.stop()


def test_writer_close_gives_up_on_an_unreachable_server() -> None:
    uri = f"mongodb://127.0.0.1:{free_port()}/"
    writer = TrackingWriter(lambda: TrackingStore.from_uri(uri, timeout_s=0.2), max_backoff_s=0.2)
    writer.submit("upsert_client", "c1")
    writer.event("info", "test", "lost")
    started = time.monotonic()

    assert writer.close(timeout=0.5) is False

    assert time.monotonic() - started < 5
    assert writer.dropped == 2 and writer.pending == 0


# query


def test_run_query_filters_and_orders(mongo_uri: str, store: TrackingStore) -> None:
    for i in range(4):
        with written_at(_at(i)):
            store.event("error" if i % 2 else "info", "test", f"m{i}", session_id="s1", round=i)

    errors = run_query(mongo_uri, "events", '{"level": "error"}', 50, database=store.db.name)
    latest = run_query(mongo_uri, "events", None, 2, database=store.db.name)
    since = run_query(
        mongo_uri, "events", '{"ts": {"$gte": {"$date": "2030-01-01T00:00:02Z"}}}', 0,
        database=store.db.name,
    )  # fmt: skip

    assert [d["message"] for d in errors] == ["m1", "m3"]
    assert [d["message"] for d in latest] == ["m2", "m3"]  # the latest two, oldest first
    assert [d["message"] for d in since] == ["m2", "m3"]


@pytest.mark.parametrize(
    ("filter_json", "message"),
    [
        ("{status: failed}", "--filter: not valid JSON"),
        ('["a"]', "--filter: expected a JSON object"),
    ],
)
def test_bad_filters(filter_json: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_query("mongodb://127.0.0.1:1/", "events", filter_json, 10)


def test_parse_filter_and_unknown_collection() -> None:
    assert parse_filter(None) == {} and parse_filter("  ") == {}
    assert parse_filter('{"status": "failed"}') == {"status": "failed"}
    with pytest.raises(ConfigError, match="unknown tracking collection"):
        run_query("mongodb://127.0.0.1:1/", "nope", None, 10)


def test_to_json() -> None:
    docs = [{"ts": _at(0), "metrics": {"loss": float("nan"), "acc": 0.5}, "n": [1, (2, 3)]}]

    parsed = json.loads(to_json(docs))

    assert parsed == [
        {"ts": "2030-01-01T00:00:00+00:00", "metrics": {"loss": None, "acc": 0.5}, "n": [1, [2, 3]]}
    ]


def test_render_table_for_every_collection() -> None:
    docs = {
        "sessions": [{"session_id": "s1", "status": "failed", "rounds_done": 2, "rounds_planned": 5,
                      "model_id": MODEL_A, "created_at": _at(0)}],
        "rounds": [{"session_id": "s1", "round": 3, "status": "finished", "model_id": MODEL_B,
                    "seconds": 75.0, "updates": 4, "rejected": 1,
                    "validation_metrics": {"accuracy": 0.5}}],
        "models": [{"model_id": MODEL_A, "parent_id": MODEL_B, "round": 2, "size": 3 * 2**20}],
        "clients": [{"client_id": "c1", "name": "alice", "combiner": "combiner-0",
                     "status": "online", "last_seen": _at(0)}],
        "events": [{"ts": _at(0), "level": "error", "source": "combiner-0",
                    "message": "rejected [bold]x[/bold]", "session_id": "s1", "round": 2}],
        "validations": [{"ts": _at(0), "client_id": "c1", "metrics": {"acc": 0.91234567}}],
        "combiners": [{"name": "combiner-0", "restarts": 2}],
        "packages": [{"sha256": "f" * 64, "name": "digits", "size": 2048}],
    }  # fmt: skip
    expected = {
        "sessions": ["s1", "failed", "2/5", MODEL_A[:12]],
        "rounds": ["finished", "4 (1 rejected)", "1m15s", "val.accuracy=0.5", MODEL_B[:12]],
        "models": [MODEL_A[:12], MODEL_B[:12], "3.0 MiB"],
        "clients": ["alice", "combiner-0", "online"],
        "events": ["error", "combiner-0", "rejected [bold]x[/bold]"],
        "validations": ["c1", "acc=0.9123"],
        "combiners": ["combiner-0", "2"],
        "packages": ["digits", "2.0 KiB"],
    }
    assert set(docs) == set(COLLECTIONS)
    for collection, rows in docs.items():
        console = Console(record=True, width=250, color_system=None)

        render_table(collection, rows, console)

        text = console.export_text()
        for value in expected[collection]:
            assert value in text, (collection, value, text)


# embedded server


def test_connect_or_start_reuses_a_live_server(tmp_path: Path) -> None:
    uri, server = connect_or_start(tmp_path)
    try:
        assert server is not None and uri == server.uri
        assert read_server_record(tmp_path) == {"pid": server.pid, "port": server.port,
                                                "owner": os.getpid()}

        again, other = connect_or_start(tmp_path)

        assert again == uri and other is None
        TrackingStore.from_uri(uri).event("info", "test", "hello")
        assert (tmp_path / "tracking" / "fedray.db").is_file()
    finally:
        server.stop()
    assert live_uri(tmp_path) is None

    uri2, server2 = connect_or_start(tmp_path)  # nothing live: a new one, same port
    try:
        assert server2 is not None and uri2 == uri
        assert TrackingStore.from_uri(uri2).find("events")[0]["message"] == "hello"
    finally:
        server2.stop()


def test_connect_or_start_ignores_a_stale_record(tmp_path: Path) -> None:
    (tmp_path / "tracking").mkdir()
    with socket.socket() as busy:  # the recorded port now belongs to someone else
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        record = {"pid": 2**22 + 7, "port": taken}  # above Linux's default pid_max
        (tmp_path / "tracking" / "server.json").write_text(json.dumps(record))

        uri, server = connect_or_start(tmp_path)

    try:
        assert server is not None and server.running
        assert server.port != taken and uri == server.uri
        assert read_server_record(tmp_path) == {"pid": server.pid, "port": server.port,
                                                "owner": os.getpid()}
    finally:
        server.stop()


def test_a_run_never_depends_on_a_server_another_command_will_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedray rounds` started a server for itself and stops it when done; a `fedray run`
    starting meanwhile must not reuse it (its session would then hang in flush())."""
    from fedray.tracking import embedded

    query_uri, query_server = connect_or_start(tmp_path)  # the query command's own
    assert query_server is not None
    got: list[Any] = []
    done = threading.Event()
    owners: list[int | None] = []  # the live server's owner, each time the run looked
    owner_of = embedded._foreign_owner

    def looked(data_dir):
        owners.append(owner_of(data_dir))
        return owners[-1]

    monkeypatch.setattr(embedded, "_foreign_owner", looked)

    def fedray_run() -> None:  # stays alive: the kernel ties a server to its thread
        got.append(connect_or_start(tmp_path, own=True))
        done.wait(60)

    run = threading.Thread(target=fedray_run)
    run.start()
    try:
        wait_until(lambda: owners.count(os.getpid()) >= 2,
                   "the run to find the query's server owned, twice", describe=lambda: owners)
        assert got == [] and run.is_alive()  # waiting: the owner will stop that one
        again, other = connect_or_start(tmp_path)  # a second query still shares it
        assert (again, other) == (query_uri, None)
    finally:
        query_server.stop()  # the query command ends: only it stops its server
    wait_until(lambda: got, "the run to start a server of its own", timeout=30)
    [(uri, server)] = got
    try:
        assert server is not None and server.running and server.pid != query_server.pid
        assert read_server_record(tmp_path)["pid"] == server.pid  # the run's, supervised
        TrackingStore.from_uri(uri).event("info", "run", "tracking stays up")
        again, other = connect_or_start(tmp_path)  # a query now reuses the run's server
        assert again == uri and other is None
    finally:
        server.stop()
        done.set()
        run.join(10)


def test_a_run_refuses_in_one_line_when_another_commands_server_stays(tmp_path: Path) -> None:
    _, query_server = connect_or_start(tmp_path)
    assert query_server is not None
    try:
        with pytest.raises(TrackingError, match=rf"belongs to another fedray command "
                                                rf"\(pid {os.getpid()}\) that will stop it"):
            connect_or_start(tmp_path, own=True, wait_s=0.5)
    finally:
        query_server.stop()


def test_embedded_start_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = EmbeddedMongo(tmp_path, port=busy.getsockname()[1])
        with pytest.raises(TrackingError, match="exited during start-up") as info:
            server.start()
    assert "nx-27017.out" in str(info.value)
    assert not server.running

    monkeypatch.setattr(sys, "executable", str(tmp_path / "nowhere" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(TrackingError, match="not found"):
        EmbeddedMongo(tmp_path).start()


# events people can use: --session, --level, counts, the events table, speed


def _sessions_and_events(store: TrackingStore) -> None:
    """Three sessions, two sharing a prefix; events of every level, one per second."""
    for i, sid in enumerate(("aaaa1111bbbb2222", "aaaa1111cccc3333", "dddd4444eeee5555")):
        with written_at(_at(i)):
            store.create_session(sid, "digits", {}, 3, MODEL_A)
    levels = ("debug", "info", "warning", "error")
    for i in range(24):
        with written_at(_at(10 + i)):
            store.event(levels[i % 4], "combiner-0" if i % 3 else "controller", f"e{i}",
                        session_id="aaaa1111cccc3333" if i < 12 else "dddd4444eeee5555",
                        round=i // 4)  # fmt: skip


def test_indexable_writes_scalar_equalities_as_eq() -> None:
    from fedray.tracking.mongo import indexable

    query = {"session_id": "s1", "round": 3, "status": {"$in": ["a"]}, "lost_combiners": "c0",
             "level": True, "metrics.loss": 1}  # fmt: skip

    assert indexable(query) == {"session_id": {"$eq": "s1"}, "round": {"$eq": 3},
                                "status": {"$in": ["a"]}, "lost_combiners": "c0",
                                "level": True, "metrics.loss": 1}  # fmt: skip
    assert indexable(None) == {}


def test_session_prefix_and_level_filters(mongo_uri: str, store: TrackingStore) -> None:
    from fedray.tracking.query import query_page

    _sessions_and_events(store)
    db = store.db.name

    def messages(**kw: Any) -> list[str]:
        filter_json = kw.pop("filter_json", None)
        limit = kw.pop("limit", 0)
        docs = run_query(mongo_uri, "events", filter_json, limit, database=db, **kw)
        return [d["message"] for d in docs]

    assert messages(session="aaaa1111c") == [f"e{i}" for i in range(12)]
    assert messages(session="DDDD4444") == [f"e{i}" for i in range(12, 24)]  # case-insensitive
    assert messages(session="dddd4444eeee5555", level="warning") == \
        ["e14", "e15", "e18", "e19", "e22", "e23"]  # fmt: skip
    assert messages(level="error") == [f"e{i}" for i in range(3, 24, 4)]
    # the latest 3 of warning-and-above, merged across levels, shown oldest first
    assert messages(level="warning", limit=3) == ["e19", "e22", "e23"]
    assert messages(level="debug") == messages()
    assert messages(filter_json='{"source": "controller"}', level="warning") == \
        ["e3", "e6", "e15", "e18"]  # fmt: skip
    # a --filter on the same field as an option: both must hold
    assert messages(filter_json='{"level": "error"}', level="warning", session="aaaa1111c") == \
        ["e3", "e7", "e11"]  # fmt: skip
    assert messages(filter_json='{"session_id": "x"}', session="aaaa1111c") == []
    assert [d["round"] for d in run_query(mongo_uri, "events", None, 2, database=db)] == [5, 5]

    page = query_page(mongo_uri, "events", None, 5, database=db, level="warning", count=True)
    assert page.total == 12 and len(page.docs) == 5
    assert query_page(mongo_uri, "events", None, 50, database=db, count=True).total is None

    with pytest.raises(ConfigError, match="matches several sessions"):
        run_query(mongo_uri, "events", None, 10, database=db, session="aaaa1111")
    with pytest.raises(ConfigError, match="no session id starts with it"):
        run_query(mongo_uri, "events", None, 10, database=db, session="ffff")
    with pytest.raises(ConfigError, match="--level applies to events"):
        run_query(mongo_uri, "rounds", None, 10, database=db, level="error")


def test_count_agrees_with_count_documents(store: TrackingStore) -> None:
    _sessions_and_events(store)

    for flt in ({}, {"level": "error"}, {"session_id": "dddd4444eeee5555", "round": 4},
                {"level": {"$in": ["warning", "error"]}}, {"session_id": "nope"}):  # fmt: skip
        assert store.count("events", flt) == store.db.events.count_documents(flt), flt
    assert store.count("sessions") == 3


def test_filtered_event_queries_stay_fast(
    mongo_uri: str, store: TrackingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedray.tracking.query import query_page

    store.create_session("0123456789abcdef", "digits", {}, 3, MODEL_A)
    store.create_session("fedcba9876543210", "digits", {}, 3, MODEL_A)
    levels = ["debug", "info", "info", "info", "info", "info", "info", "debug", "warning", "error"]
    docs = []
    for i in range(5000):
        with written_at(_at(i)):
            docs.append(make_event(levels[i % 10], "combiner-0", f"e{i}", round=i // 100,
                                   session_id="0123456789abcdef" if i < 2500 else "fedcba9876543210"))  # fmt: skip
    for start in range(0, len(docs), 1000):
        store.insert_events(docs[start : start + 1000])

    sent: list[str] = []  # the filters the query sends: none that nx-27017 cannot index
    for method in ("find", "count"):
        real = getattr(TrackingStore, method)

        def spy(self: TrackingStore, collection: str, filter: Any = None, *args: Any,
                _real: Any = real, **kw: Any) -> Any:
            sent.append(json.dumps(filter, default=str))
            return _real(self, collection, filter, *args, **kw)

        monkeypatch.setattr(TrackingStore, method, spy)

    started = time.perf_counter()
    page = query_page(mongo_uri, "events", None, 200, database=store.db.name,
                      session="01234567", level="warning", count=True)  # fmt: skip
    elapsed = time.perf_counter() - started

    expected = [f"e{i}" for i in range(2500) if i % 10 in (8, 9)][-200:]
    assert [d["message"] for d in page.docs] == expected
    assert page.total == 500
    assert elapsed < 3.0, f"a filtered events query took {elapsed:.2f} s over 5000 events"
    events_filters = [f for f in sent if '"level"' in f]
    assert events_filters and not any(op in f for f in events_filters
                                      for op in ("$and", "$or", "$in")), sent  # fmt: skip


def _events_text(docs: list[dict[str, Any]], width: int, **kw: Any) -> str:
    console = Console(record=True, width=width, color_system=None)
    render_table("events", docs, console, **kw)
    return console.export_text()


def test_events_table_wraps_messages_and_colours_levels() -> None:
    long = "update from client-7 rejected: " + " ".join(f"word{i}" for i in range(40))
    docs = [
        {"ts": _at(0), "level": "info", "source": "controller", "session_id": "s1", "round": 1,
         "message": "round 1 started"},
        {"ts": _at(1.5), "level": "error", "source": "combiner-0", "session_id": "s1", "round": 1,
         "message": long},
    ]  # fmt: skip

    text = _events_text(docs, 80, total=57)
    coloured = Console(record=True, width=80, color_system="standard", force_terminal=True)
    render_table("events", docs, coloured)

    assert "events (the latest 2 of 57" in text
    assert "…" not in text and "word39" in text  # wrapped, never cut
    assert max(len(line) for line in text.splitlines()) <= 80
    local = _at(1.5).astimezone()
    assert f"{local:%H:%M:%S}.500" in text and f"on {_at(0).astimezone():%Y-%m-%d}" in text
    assert "session" not in text.splitlines()[1]  # one session: no session column
    assert "\x1b[1;31merror" in coloured.export_text(styles=True)
    several = _events_text([{**docs[0], "session_id": "abcdef0123"}, docs[1]], 120)
    assert "session" in several and "abcdef01" in several


def test_events_cli_options(embedded_server: EmbeddedMongo, db_name: str) -> None:
    from click.testing import CliRunner

    from fedray.cli.main import main
    from fedray.cli.query import EVENT_LEVELS

    store = TrackingStore.from_uri(embedded_server.uri, db_name)
    try:
        _sessions_and_events(store)
        uri = embedded_server.uri + db_name
        runner = CliRunner()

        warn = runner.invoke(main, ["events", "--tracking", uri, "--session", "aaaa1111c",
                                    "--level", "warning", "--json"])  # fmt: skip
        table = runner.invoke(main, ["events", "--tracking", uri, "--level", "error",
                                     "--filter", '{"source": "controller"}', "--limit", "1"])  # fmt: skip
        everything = runner.invoke(main, ["events", "--tracking", uri, "--level", "error",
                                          "--filter", '{"source": "controller"}'])  # fmt: skip
        rounds = runner.invoke(main, ["rounds", "--tracking", uri, "--session", "dddd"])
        ambiguous = runner.invoke(main, ["validations", "--tracking", uri, "--session", "aaaa"])
        bad_level = runner.invoke(main, ["events", "--tracking", uri, "--level", "fatal"])
    finally:
        store.db.client.drop_database(db_name)
        store.close()

    assert warn.exit_code == 0, warn.output
    assert [d["message"] for d in json.loads(warn.output)] == ["e2", "e3", "e6", "e7", "e10", "e11"]
    assert table.exit_code == 0, table.output
    assert "e15" in table.output and " e3 " not in table.output
    assert "events (the latest 1 of 2; --limit shows more)" in table.output
    assert everything.exit_code == 0 and "events (2)" in everything.output  # nothing cut off
    assert " e3 " in everything.output
    assert rounds.exit_code == 0 and "rounds (0)" in rounds.output
    assert ambiguous.exit_code == 2 and "matches several sessions" in ambiguous.output
    assert bad_level.exit_code == 2 and "fatal" in bad_level.output
    assert EVENT_LEVELS == LEVELS


# fedray rounds and clients: versions, staleness, privacy, attrs


def _rounds_and_clients(store: TrackingStore) -> None:
    """A DP session (round 2 needed a second attempt), an async session of two versions,
    and two clients with attributes."""
    share = {"asked": 2, "updates": 2, "rejected": 0, "rejections": {}, "failed": 0,
             "failures": {}, "close_reason": "buffer_full", "seconds": 0.5, "bytes_in": 10,
             "bytes_out": 20, "aggregation_s": 0.01}
    store.create_session("dddd0000dddd0000", "digits", {}, 2, MODEL_A)
    store.update_session("dddd0000dddd0000", strategy="dp_fixed", mode="sync")
    store.create_session("aaaa0000aaaa0000", "digits", {}, 2, MODEL_A)
    store.update_session("aaaa0000aaaa0000", strategy="fedbuff", mode="async")
    for n in (1, 2):
        with written_at(_at(n)):
            store.start_round("dddd0000dddd0000", n, attempt=n, clients_asked={"combiner-0": 2},
                              parent_model_id=MODEL_A)
        store.update_round("dddd0000dddd0000", n, status="finished", model_id=MODEL_B,
                           parent_model_id=MODEL_A, mode="sync", updates=2, rejected=0,
                           combiners={"combiner-0": share}, seconds=0.6 * n, attempt=n,
                           aggregator_state_id="", train_metrics={"loss": 0.5},
                           report={"epsilon": 1.5 * n, "delta": 1e-5, "noise_std": 0.25,
                                   "dp_rounds": n})  # fmt: skip
        with written_at(_at(10 + n)):
            store.start_round("aaaa0000aaaa0000", n, attempt=1, parent_model_id=MODEL_A)
        contributions = [{"client_id": c, "base_version": n - 1 - s, "staleness": s,
                          "num_examples": 10, "weight": 1 / (1 + s)}
                         for c, s in (("c1", 0), ("c2", n - 1), ("c3", 2 * (n - 1)))]
        store.update_round("aaaa0000aaaa0000", n, status="finished", model_id=MODEL_B,
                           parent_model_id=MODEL_A, mode="async", updates=3,
                           seconds=0.2, aggregator_state_id="", contributions=contributions,
                           train_metrics={"staleness_mean": float(n - 1),
                                          "staleness_max": float(2 * (n - 1))},
                           report={})  # fmt: skip
    store.upsert_client("c1", name="site-a", combiner="combiner-0", status="online",
                        attrs={"site": "eu", "gpu": "0"}, version="fedray-0.1")
    store.upsert_client("c2", name="site-b", combiner="combiner-0", status="offline",
                        attrs={"site": "us\x1b[31m"})


def test_rounds_and_clients_cli(embedded_server: EmbeddedMongo, db_name: str) -> None:
    from click.testing import CliRunner

    from fedray.cli.main import main

    store = TrackingStore.from_uri(embedded_server.uri, db_name)
    try:
        _rounds_and_clients(store)
        uri = embedded_server.uri + db_name
        runner = CliRunner(env={"COLUMNS": "250"})

        def run(*args: str) -> str:
            result = runner.invoke(main, [*args, "--tracking", uri])
            assert result.exit_code == 0, result.output
            return result.output

        versions = run("rounds", "--session", "aaaa")
        dp = run("rounds", "--session", "dddd")
        both = run("rounds")
        full = json.loads(run("rounds", "--session", "aaaa", "--json"))
        clients = run("clients")
        sessions = run("sessions")
    finally:
        store.db.client.drop_database(db_name)
        store.close()

    header = versions.splitlines()[2]
    assert "version" in header and "staleness" in header and " mode " not in header
    assert "report" not in header  # no version has one
    assert "mean 0, max 0" in versions and "mean 1, max 2" in versions
    assert "staleness_m" not in versions  # said once, in its own column
    assert "version" not in dp.splitlines()[2] and "staleness" not in dp
    assert "ε=1.5 δ=1e-05 noise_std=0.25 dp_rounds=1" in dp
    assert "ε=3 δ=1e-05" in dp and "finished (attempt 2)" in dp
    assert " mode " in both.splitlines()[2] and "async" in both and "sync" in both
    assert full[1]["contributions"][2] == {"client_id": "c3", "base_version": -1,
                                           "staleness": 2, "num_examples": 10,
                                           "weight": pytest.approx(1 / 3)}
    assert {"train_metrics", "report", "started_at", "attempt"} <= set(full[0])  # whole
    assert "gpu=0 site=eu" in clients and "fedray-0.1" in clients
    assert "site=us " in clients and "\x1b" not in clients and "[31m" not in clients
    assert "fedbuff (async)" in sessions and "dp_fixed" in sessions


def test_query_commands_read_the_database_a_run_wrote(embedded_server: EmbeddedMongo,
                                                      db_name: str) -> None:
    from click.testing import CliRunner

    from fedray.cli.main import main
    from fedray.deploy.config_file import config_from_dict

    # tracking.database set in a config: --database finds it; a URI naming one: the same URI
    named = config_from_dict({"federation": "x", "seed_model": "s",
                              "tracking": {"uri": embedded_server.uri, "database": db_name}})
    in_uri = config_from_dict({"federation": "x", "seed_model": "s",
                               "tracking": {"uri": embedded_server.uri + db_name}})
    assert named.tracking.database == in_uri.tracking.database == db_name
    store = TrackingStore.from_uri(named.tracking.uri, named.tracking.database)
    try:
        store.create_session("eeee0000eeee0000", "x", {}, 1, MODEL_A)
        runner = CliRunner()
        results = [runner.invoke(main, args) for args in (
            ["sessions", "--json", "--tracking", embedded_server.uri, "--database", db_name],
            ["sessions", "--json", "--tracking", in_uri.tracking.uri],
            ["rounds", "--json", "--tracking", embedded_server.uri, "--database", db_name])]
    finally:
        store.db.client.drop_database(db_name)
        store.close()
    assert all(r.exit_code == 0 for r in results), [r.output for r in results]
    assert [d["session_id"] for d in json.loads(results[0].output)] == ["eeee0000eeee0000"]
    assert json.loads(results[1].output) == json.loads(results[0].output)
    assert json.loads(results[2].output) == []


def test_a_missing_tls_file_in_the_uri_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedray.cli.main import main

    for option in ("tlsCAFile", "tlsCertificateKeyFile"):
        uri = f"mongodb://u:pw@127.0.0.1:1/?tls=true&{option}={tmp_path}/missing.pem"
        with pytest.raises(TrackingError, match="check the paths of the URI's tlsCAFile"):
            TrackingStore.from_uri(uri)
        result = CliRunner().invoke(main, ["sessions", "--tracking", uri])
        assert result.exit_code == TrackingError.exit_code, result.output
        assert "Traceback" not in result.output and result.output.count("\n") == 1
        assert ":pw@" not in result.output


def test_query_commands_refuse_a_data_dir_without_tracking(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from fedray.cli.main import main

    typo = tmp_path / "digts"
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    for args in (["rounds", "--data-dir", str(typo)], ["events", "--data-dir", str(typo)],
                 ["plot", "--data-dir", str(tmp_path / "empty"), "-o", str(tmp_path / "c.png")],
                 ["token", "list", "--data-dir", str(typo)],
                 ["token", "revoke", "--name", "a", "--data-dir", str(typo)]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert "not a federation's data directory" in result.output and "/tracking is " \
            "missing" in result.output and result.output.count("\n") == 1, result.output
    monkeypatch.setenv("FEDRAY_DATA_DIR", str(typo))
    result = runner.invoke(main, ["sessions"])
    assert result.exit_code == 2 and f"$FEDRAY_DATA_DIR {typo}: not a" in result.output
    assert not typo.exists() and list((tmp_path / "empty").iterdir()) == []


def test_a_stop_while_the_server_starts_is_a_tracking_error_not_a_crash(tmp_path, monkeypatch):
    """`ray job stop` of a `fedray serve` job: the supervisor was restarting the server as
    the teardown stopped it, and its start crashed with AttributeError on the process the
    stop had taken."""
    import fedray.tracking.embedded as embedded

    server = EmbeddedMongo(tmp_path)

    def ping_that_stops(uri: str, timeout_s: float = 0.5) -> bool:
        server.stop()  # the teardown, landing while start() waits for the first answer
        return False

    monkeypatch.setattr(embedded, "ping", ping_that_stops)
    with pytest.raises(TrackingError, match="stopped while it started"):
        server.start()
    assert not server.running
