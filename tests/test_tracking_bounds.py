"""Tracking under abuse, against the real embedded nx-27017: values BSON cannot hold, one
bad document in a batch, a writer whose queue fills while the database is down, and
events that outlive their retention."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from fedray.tracking import TrackingStore, TrackingWriter

BIG = 2**64 - 1  # a uint64 num_examples: BSON integers stop at 2**63 - 1


@pytest.fixture
def db_name() -> str:
    return f"b_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def store(tracking_uri: str, db_name: str) -> Iterator[TrackingStore]:
    store = TrackingStore.from_uri(tracking_uri, db_name)
    yield store
    store.db.client.drop_database(db_name)
    store.close()


def _held_writer(tracking_uri: str, db_name: str, **kwargs) -> tuple[TrackingWriter,
                                                                     threading.Event]:
    """A writer whose thread waits to connect until the returned event is set."""
    release = threading.Event()

    def factory() -> TrackingStore:
        release.wait(20)
        return TrackingStore.from_uri(tracking_uri, db_name)

    return TrackingWriter(factory, **kwargs), release


def test_integers_bson_cannot_hold_are_stored_as_text(store: TrackingStore) -> None:
    store.add_validation({"session_id": "s1", "client_id": "c1", "num_examples": BIG,
                          "metrics": {"n": -(2**70), "ok": 2**63 - 1}})
    store.event("info", "test", "big", data={"num_examples": BIG, "flag": True})

    [validation] = store.find("validations")
    [event] = store.find("events")
    assert validation["num_examples"] == str(BIG)
    assert validation["metrics"] == {"n": str(-(2**70)), "ok": 2**63 - 1}
    assert event["data"] == {"num_examples": str(BIG), "flag": True}


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
