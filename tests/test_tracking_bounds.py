"""Tracking under abuse, against the real embedded nx-27017: values BSON cannot hold, one
bad document in a batch, a writer whose queue fills while the database is down, and
events that outlive their retention."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from fedray.errors import ConfigError
from fedray.tracking.documents import written_at
from fedray.tracking.embedded import EmbeddedMongo
from fedray.tracking.loopback import free_port, mongo_uri
from fedray.tracking.store import TrackingStore
from fedray.tracking.writer import TrackingWriter
from tests.waiting import wait_until

BIG = 2**64 - 1  # a uint64 num_examples: BSON integers stop at 2**63 - 1


def _held_writer(tracking_uri: str, db_name: str, **kwargs) -> tuple[TrackingWriter,
                                                                     threading.Event]:
    """A writer whose thread waits to connect until the returned event is set."""
    release = threading.Event()

    def factory() -> TrackingStore:
        release.wait(20)
        return TrackingStore.from_uri(tracking_uri, db_name)

    return TrackingWriter(factory, **kwargs), release


def test_integers_bson_cannot_hold_are_stored_as_text(store: TrackingStore) -> None:
    store.add_validation({"session_id": "s1", "round": 1, "model_id": "a" * 64,
                          "client_id": "c1", "combiner": "combiner-0", "num_examples": BIG,
                          "metrics": {"n": -(2**70), "ok": 2**63 - 1}})
    store.event("info", "test", "big", data={"num_examples": BIG, "flag": True})

    [validation] = store.find("validations")
    [event] = store.find("events")
    assert validation["num_examples"] == str(BIG)
    assert validation["metrics"] == {"n": str(-(2**70)), "ok": 2**63 - 1}
    assert event["data"] == {"num_examples": str(BIG), "flag": True}


def test_non_finite_numbers_are_stored_as_null(store: TrackingStore) -> None:
    import numpy as np

    store.add_validation({"session_id": "s1", "round": 1, "model_id": "a" * 64,
                          "client_id": "c1", "combiner": "combiner-0", "num_examples": 5,
                          "metrics": {"loss": float("nan"), "accuracy": 0.1,
                                      "ppl": np.float32("inf")}})

    [validation] = store.find("validations")
    assert validation["metrics"] == {"loss": None, "accuracy": 0.1, "ppl": None}


def test_one_bad_event_does_not_drop_the_rest_of_its_batch(tracking_uri: str, store: TrackingStore,
                                                           db_name: str) -> None:
    writer, release = _held_writer(tracking_uri, db_name)
    try:
        writer.event("warning", "gate", "refused a wrong token")
        writer.event("info", "combiner-0", "huge", data={"num_examples": BIG})
        writer.event("info", "combiner-0", "unstorable", data={"value": object()})
        writer.event("error", "gate", "the revoked token of 'alice'")
        release.set()
        assert writer.flush(20)
    finally:
        writer.close()

    messages = sorted(e["message"] for e in store.find("events"))
    assert messages == ["huge", "refused a wrong token", "the revoked token of 'alice'"]
    assert writer.dropped == 1 and writer.written == 3


def test_a_full_queue_drops_debug_and_info_first_and_never_session_writes(
        tmp_path, db_name: str) -> None:
    port = free_port()  # the database is down until the server starts on this port
    drops: list[tuple[str, int]] = []
    writer = TrackingWriter(lambda: TrackingStore.from_uri(mongo_uri(port), db_name,
                                                           timeout_s=0.3),
                            max_backoff_s=0.2, max_pending=10, source="combiner-0",
                            on_drop=lambda reason, n: drops.append((reason, n)))
    server = EmbeddedMongo(tmp_path, port=port)
    try:
        writer.submit("create_session", "s1", "digits", {}, 3, "a" * 64)
        wait_until(lambda: writer.queued == 0,  # the thread holds it, retrying
                   "the writer's thread to take the first write")
        for i in range(4):
            writer.event("debug", "c", f"debug {i}")
        for i in range(6):
            writer.event("info", "c", f"info {i}")
        for i in range(5):  # each pushes out a debug event, then an info event
            writer.event("warning", "c", f"warning {i}")
        writer.submit("start_round", "s1", 1)
        writer.submit("update_round", "s1", 1, status="finished")
        writer.submit("add_model", "b" * 64, "a" * 64, "s1", 1, 10, "file:///b", {})
        for i in range(3):  # the last two info events, then the oldest warning
            writer.event("error", "c", f"error {i}")
        assert writer.queued == 10 and writer.pending == 11

        server.start()
        assert writer.flush(30)
        store = TrackingStore.from_uri(server.uri, db_name)
        events = store.find("events", sort=[("ts", 1)])
        assert store.get_session("s1")["rounds_done"] == 0
        assert store.get_round("s1", 1)["status"] == "finished"
        assert store.get_model("b" * 64)["parent_id"] == "a" * 64
        store.close()
    finally:
        writer.close(timeout=5)
        server.stop()

    kept = [e["message"] for e in events if e["source"] == "c"]
    assert kept == [f"warning {i}" for i in range(1, 5)] + [f"error {i}" for i in range(3)]
    [report] = [e for e in events if e["source"] == "combiner-0"]
    assert report["level"] == "warning" and "dropped 11 low-value write(s)" in report["message"]
    assert report["data"]["by_kind"] == {"debug": 4, "info": 6, "warning": 1}
    assert writer.dropped_by_reason == {"queue_full": 11} and sum(n for _, n in drops) == 11


def test_events_older_than_their_retention_go_away(store: TrackingStore, tracking_uri: str,
                                                    db_name: str) -> None:
    now = datetime.now(UTC)
    for days in (400, 45, 31):
        with written_at(now - timedelta(days=days)):
            store.event("info", "old", f"{days} days ago")
    with written_at(now - timedelta(days=29)):
        store.event("info", "recent", "29 days ago")

    writer = TrackingWriter(lambda: TrackingStore.from_uri(tracking_uri, db_name),
                            events_ttl_s=30 * 86400, prune_every_s=0.2)
    try:
        writer.event("info", "recent", "now")
        assert writer.flush(10)
        wait_until(lambda: store.db.events.count_documents({"source": "old"}) == 0,
                   "the prune to delete the events older than 30 days",
                   describe=lambda: [e["message"] for e in store.find("events")])
        writer.event("info", "old", "now, but old")  # the next prune spares it
        with written_at(now - timedelta(days=60)):
            store.event("info", "old", "60 days ago, written late")
        wait_until(lambda: not store.find("events", {"message": "60 days ago, written late"}),
                   "the next prune to delete an old event written late")
        assert writer.flush(10)
    finally:
        writer.close()

    assert sorted(e["message"] for e in store.find("events")) == \
        ["29 days ago", "now", "now, but old"]
    ttl = [spec for spec in store.db.events.index_information().values()
           if spec["key"] == [("ts", 1)]]
    assert ttl and ttl[0]["expireAfterSeconds"] == 30 * 86400


def test_events_ttl_days_is_checked() -> None:
    from fedray.deploy.config_file import config_from_dict

    base = {"federation": "f", "seed_model": "x"}
    assert config_from_dict(base).tracking.events_ttl_s == 30 * 86400
    assert config_from_dict({**base, "tracking": {"events_ttl_days": 0}}).tracking.events_ttl_s \
        is None
    with pytest.raises(ConfigError, match="tracking.events_ttl_days must be 0"):
        config_from_dict({**base, "tracking": {"events_ttl_days": -1}})


def _events_ts(store: TrackingStore) -> dict:
    [spec] = [s for s in store.db.events.index_information().values() if s["key"] == [("ts", 1)]]
    return spec


def test_the_indexing_writer_creates_every_index_and_drops_a_ttl_set_to_zero(
        store: TrackingStore, tracking_uri: str, db_name: str) -> None:
    from fedray.tracking.indexes import INDEXES

    def writer(ttl: int | None) -> None:
        with TrackingWriter(lambda: TrackingStore.from_uri(tracking_uri, db_name),
                            events_ttl_s=ttl, indexes=True) as w:
            w.event("info", "test", "hello")
            assert w.flush(10)

    writer(7 * 86400)
    for collection, indexes in INDEXES.items():
        found = {tuple(k for k, _ in spec["key"]): bool(spec.get("unique"))
                 for spec in store.db[collection].index_information().values()}
        assert all(found.get(keys) == unique for keys, unique in indexes), (collection, found)
    assert _events_ts(store)["expireAfterSeconds"] == 7 * 86400
    writer(86400)  # a changed events_ttl_days: the index follows
    assert _events_ts(store)["expireAfterSeconds"] == 86400
    writer(None)  # events_ttl_days: 0 keeps events forever: no TTL left behind
    assert "expireAfterSeconds" not in _events_ts(store)
