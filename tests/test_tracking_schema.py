"""The tracking schema (fedray/tracking/schema.py, checked by fedray/tracking/checker.py):
wrong documents are refused with the field named, writers cannot write what it does not
describe, and docs/tracking.md says the same as the classes."""

from __future__ import annotations

import logging
import pickle
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import pytest
from bson import ObjectId

from fedray.errors import SchemaError, TrackingError
from fedray.tracking import checker, schema
from fedray.tracking.store import TrackingStore
from fedray.tracking.writer import TrackingWriter

NOW = datetime(2030, 1, 1, tzinfo=UTC)
MODEL = "a" * 64


def _round(**fields: Any) -> dict[str, Any]:
    share = {"asked": 2, "updates": 2, "rejected": 0, "rejections": {}, "failed": 0,
             "failures": {}, "close_reason": "all_answered", "seconds": 0.5, "bytes_in": 10,
             "bytes_out": 20, "aggregation_s": 0.01}
    return {"session_id": "s1", "round": 1, "status": "finished", "started_at": NOW,
            "updated_at": NOW, "attempt": 1, "clients_asked": {"combiner-0": 2},
            "parent_model_id": MODEL, "model_id": "b" * 64, "mode": "sync", "updates": 2,
            "rejected": 0, "combiners": {"combiner-0": share}, "lost_combiners": [],
            "reduce_s": 0.01, "seconds": 0.6, "aggregator_state_id": "",
            "train_metrics": {"loss": 0.5}, "validation_metrics": {},
            "report": {"epsilon": 1.5, "delta": 1e-5}, "contributions": [], **fields}


GOOD: dict[str, dict[str, Any]] = {
    "sessions": {"session_id": "s1", "federation": "f", "status": "running", "config": {},
                 "rounds_planned": 3, "rounds_done": 1, "model_id": MODEL, "created_at": NOW,
                 "updated_at": NOW, "continued_from": None},
    "rounds": _round(),
    "models": {"model_id": MODEL, "parent_id": None, "session_id": "s1", "round": 0,
               "size": 10, "storage_uri": "file:///m", "created_at": NOW,
               "tensors": [{"name": "layer.0.w", "dtype": "F32", "shape": [2, 3]}]},
    "clients": {"client_id": "c1", "name": "c1", "combiner": "combiner-0", "status": "online",
                "first_seen": NOW, "last_seen": NOW, "attrs": {"site": "eu"}},
    "combiners": {"name": "combiner-0", "address": "127.0.0.1:1", "status": "online",
                  "restarts": 0, "updated_at": NOW, "clients": 2},
    "validations": {"_id": ObjectId(), "session_id": "s1", "round": 1, "model_id": MODEL,
                    "client_id": "c1", "combiner": "combiner-0", "num_examples": str(2**64),
                    "metrics": {"accuracy": 0.9, "note": "any value"}, "ts": NOW},
    "events": {"_id": ObjectId(), "ts": NOW, "level": "info", "source": "controller",
               "session_id": None, "round": None, "message": "m", "data": {"x": [1]}},
    "packages": {"sha256": "f" * 64, "name": "digits", "size": 3, "created_at": NOW},
    "tokens": {"hash": "h", "name": "alice", "mac": "m", "created_at": NOW, "revoked": False,
               "revoked_at": None, "live_name": "alice"},
}  # fmt: skip


def test_every_collection_has_a_class_and_a_valid_example() -> None:
    assert set(GOOD) == set(schema.DOCUMENTS)
    for collection, doc in GOOD.items():
        checker.validate(collection, doc)


@pytest.mark.parametrize(("collection", "change", "field", "problem"), [
    ("rounds", {"updates_received": 3}, "updates_received", "is not in the schema"),
    ("rounds", {"status": "committed"}, "status", "must be one of running, finished, failed"),
    ("rounds", {"updates": "3"}, "updates", "must be an int, got str '3'"),
    ("rounds", {"updates": True}, "updates", "must be an int, got bool"),
    ("rounds", {"seconds": float("nan")}, "seconds", "must be a finite number"),
    ("rounds", {"report": {"epsilon": "1"}}, "report.epsilon", "must be a number"),
    ("rounds", {"combiners": {"combiner-0": {"asked": "1"}}}, "combiners.combiner-0.asked",
     "must be an int"),
    ("rounds", {"combiners": {"combiner-0": {"asked": 1}}}, "combiners.combiner-0.updates",
     "is required but missing"),
    ("rounds", {"contributions": [{"client_id": "c1"}]}, "contributions.0.base_version",
     "is required but missing"),
    ("rounds", {"model_id": None}, "model_id", "must be a string, got NoneType"),
    ("rounds", {"started_at": datetime(2030, 1, 1)}, "started_at", "naive"),
    ("rounds", {"started_at": "2030-01-01"}, "started_at", "must be a date"),
    ("sessions", {"status": "done"}, "status", "must be one of created, waiting"),
    ("sessions", {"config": ["a"]}, "config", "must be a document"),
    ("models", {"tensors": [{"name": "w", "dtype": "F32", "shape": ["2"]}]},
     "tensors.0.shape.0", "must be an int"),
    ("clients", {"attrs": {"site": 1}}, "attrs.site", "must be a string"),
    ("clients", {"status": "busy"}, "status", "must be one of online, training"),
    ("combiners", {"restarts": 1.0}, "restarts", "must be an int"),
    ("validations", {"num_examples": 1.5}, "num_examples", "must be int or string"),
    ("events", {"level": "fatal"}, "level", "must be one of debug, info, warning, error"),
    ("events", {"data": "x"}, "data", "must be a document"),
    ("packages", {"size": None}, "size", "must be an int"),
    ("tokens", {"revoked": "no"}, "revoked", "must be a bool"),
])  # fmt: skip
def test_a_wrong_field_is_refused_by_name(collection: str, change: dict[str, Any], field: str,
                                          problem: str) -> None:
    with pytest.raises(SchemaError, match=problem) as info:
        checker.validate(collection, {**GOOD[collection], **change})

    assert info.value.field == field and info.value.collection == collection
    assert f"field {field!r}" in str(info.value)


@pytest.mark.parametrize(("collection", "missing"), [
    ("sessions", "rounds_done"), ("models", "tensors"), ("clients", "status"),
    ("validations", "_id"), ("events", "ts"), ("tokens", "mac"),
])  # fmt: skip
def test_a_missing_required_field_is_named(collection: str, missing: str) -> None:
    doc = {k: v for k, v in GOOD[collection].items() if k != missing}

    with pytest.raises(SchemaError, match=f"field '{missing}' is required but missing"):
        checker.validate(collection, doc)


@pytest.mark.parametrize(("collection", "doc", "field"), [
    ("rounds", _round(mode="async", combiners={}, contributions=[
        {"client_id": "c1", "base_version": 0, "staleness": 1, "num_examples": 5,
         "weight": 0.5}]), None),
    ("rounds", {k: v for k, v in _round(status="running").items() if k != "model_id"}, None),
    ("rounds", {k: v for k, v in _round().items() if k != "aggregator_state_id"},
     "aggregator_state_id"),
    ("rounds", _round(status="failed"), "reason"),
    ("tokens", {**GOOD["tokens"], "revoked": True}, "live_name"),
    ("tokens", {**GOOD["tokens"], "live_name": "bob"}, "live_name"),
])  # fmt: skip
def test_whole_document_rules(collection: str, doc: dict[str, Any], field: str | None) -> None:
    if field is None:
        checker.validate(collection, doc)
        return
    with pytest.raises(SchemaError) as info:
        checker.validate(collection, doc)
    assert info.value.field == field


def test_update_fields_are_checked_along_their_dotted_path() -> None:
    checker.check_fields("rounds", {"status": "failed", "combiners.combiner-0.updates": 3,
                                   "report.epsilon": None, "validation_metrics": {}})
    for fields, field in [({"combiners.combiner-0.updates_received": 1},
                           "combiners.combiner-0.updates_received"),
                          ({"report.epsilon.x": 1}, "report.epsilon.x"),
                          ({"$set": {}}, "$set"), ({"": 1}, ""),
                          ({"train_metrics.loss": "low"}, "train_metrics.loss")]:
        with pytest.raises(SchemaError) as info:
            checker.check_fields("rounds", fields)
        assert info.value.field == field, fields
    with pytest.raises(SchemaError, match="not a tracking collection"):
        checker.validate("network.clients", {})


def test_schema_errors_are_tracking_errors_and_cross_processes() -> None:
    error = SchemaError("rounds", "status", "must be one of running")

    again = pickle.loads(pickle.dumps(error))

    assert isinstance(again, TrackingError) and str(again) == str(error)
    assert (again.collection, again.field) == ("rounds", "status")


def test_readers_get_field_names_from_the_classes() -> None:
    assert schema.ROUNDS.aggregator_state_id == "aggregator_state_id"
    assert schema.SESSIONS.status == "status" and schema.CLIENTS.attrs == "attrs"
    with pytest.raises(AttributeError, match="Round has no field 'updates_received'"):
        _ = schema.ROUNDS.updates_received


def test_statuses_are_the_states_fedray_knows() -> None:
    from fedray.actors.combiner.clients import CLIENT_STATUSES
    from fedray.states import RoundState, SessionState
    from fedray.tracking.documents import LEVELS

    assert set(get_args(schema.SessionStatus)) == {s.value for s in SessionState}
    assert set(get_args(schema.RoundStatus)) <= {s.value for s in RoundState}
    assert set(get_args(schema.ClientStatus)) == CLIENT_STATUSES | {"offline"}
    assert get_args(schema.Level) == LEVELS


DOCS = Path(__file__).resolve().parent.parent / "docs" / "tracking.md"


def _doc_tables() -> dict[str, list[tuple[str, str, bool]]]:
    """docs/tracking.md's field tables, by the class named in each heading."""
    tables: dict[str, list[tuple[str, str, bool]]] = {}
    current = None
    for line in DOCS.read_text().splitlines():
        heading = re.match(r"^#{2,3} .*\((\w+)\)\s*$", line)
        if heading:
            current = tables.setdefault(heading.group(1), [])
            continue
        row = re.match(r"^\| `([^`]+)` \| ([^|]+) \| (yes|no) \|", line)
        if row and current is not None:
            current.append((row.group(1), row.group(2).strip(), row.group(3) == "yes"))
    return tables


def test_docs_tracking_md_lists_every_field_with_its_type() -> None:
    classes = {cls.__name__: cls for cls in (*schema.DOCUMENTS.values(), *schema.PARTS)}

    tables = _doc_tables()

    assert set(tables) == set(classes)
    for name, cls in classes.items():
        assert tables[name] == checker.fields_of(cls), name


def test_indexes_sorts_and_scalar_fields_name_schema_fields() -> None:
    from fedray.tracking.indexes import INDEXES
    from fedray.tracking.mongo import SCALAR_FIELDS
    from fedray.tracking.query import _ORDER

    def top_level(collection: str) -> set[str]:
        return {name for name, _, _ in checker.fields_of(schema.DOCUMENTS[collection])}

    for collection, indexes in INDEXES.items():
        assert {k for keys, _ in indexes for k in keys} <= top_level(collection), collection
    for collection, (sort, _) in _ORDER.items():
        assert {key for key, _ in sort} <= top_level(collection), collection
    everywhere = set().union(*(top_level(c) for c in schema.DOCUMENTS))
    assert not SCALAR_FIELDS - everywhere


def _doc_examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOCS.read_text(), re.M | re.S)


# the store and the writer refuse what the schema does not describe


@pytest.fixture
def store(tracking_uri: str) -> Iterator[TrackingStore]:
    name = f"s_{uuid.uuid4().hex[:16]}"
    store = TrackingStore.from_uri(tracking_uri, name)
    yield store
    store.db.client.drop_database(name)
    store.close()


def test_the_store_refuses_a_drifted_write_and_writes_nothing(store: TrackingStore) -> None:
    store.create_session("s1", "digits", {}, 3, MODEL)
    store.start_round("s1", 1, clients_asked={"combiner-0": 2})

    with pytest.raises(SchemaError, match="'updates_received' is not in the schema"):
        store.update_round("s1", 1, status="finished", updates_received=2)
    with pytest.raises(SchemaError, match="'status' must be one of"):
        store.update_session("s1", status="committed")
    with pytest.raises(SchemaError, match="'clients_asked' must be a document"):
        store.start_round("s1", 2, clients_asked=4)
    with pytest.raises(SchemaError, match="'size' is required"):
        store.add_package("f" * 64, name="digits")
    with pytest.raises(SchemaError, match="'combiner' is required"):
        store.add_validation({"session_id": "s1", "round": 1, "model_id": MODEL,
                              "client_id": "c1", "num_examples": 1, "metrics": {}})
    with pytest.raises(SchemaError, match="'status' must be one of online"):
        store.upsert_combiner("combiner-0", address="x", status="up")

    assert store.get_round("s1", 1)["status"] == "running"
    assert store.get_session("s1")["status"] == "created"
    assert store.get_round("s1", 2) is None and store.find("packages") == []
    assert store.find("validations") == [] and store.find("combiners") == []


def test_the_writer_drops_a_drifted_write_loudly_and_goes_on(
        store: TrackingStore, tracking_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    with TrackingWriter(lambda: TrackingStore.from_uri(tracking_uri, store.db.name)) as writer:
        writer.submit("create_session", "s1", "digits", {}, 3, MODEL)
        writer.submit("update_session", "s1", committed=True)
        writer.submit("update_session", "s1", status="running")
        with caplog.at_level(logging.ERROR, logger="fedray.tracking.writer"):
            assert writer.flush(20)

    assert writer.dropped_by_reason == {"refused": 1}
    assert "tracking sessions: field 'committed' is not in the schema" in caplog.text
    assert store.get_session("s1")["status"] == "running"
    [lost] = store.find("events", {"level": "error"})  # not only in an actor's log
    assert lost["data"] == {"reason": "tracking_refused", "method": "update_session"}
    assert "tracking refused the write update_session(s1); it is lost" in lost["message"]
    assert "'committed' is not in the schema" in lost["message"]


# what the session runner's tracking callback writes


class StoreObserver:
    """The observer TrackingCallback writes through, writing at once (no queue): a write
    the store refuses fails the test where it is made."""

    def __init__(self, store: TrackingStore) -> None:
        self.store = store

    def write(self, method: str, *args: Any, **kwargs: Any) -> None:
        getattr(self.store, method)(*args, **kwargs)

    def event(self, level: str, message: str, **data: Any) -> None:
        session_id, round_ = data.pop("session_id", None), data.pop("round", None)
        self.store.event(level, "controller", message, session_id=session_id, round=round_,
                         data=data or None)

    def round_committed(self, seconds: float) -> None:
        pass

    def flush(self, timeout: float = 10.0) -> bool:
        return True


def _callback(store: TrackingStore):
    from fedray.actors.controller.callbacks import TrackingCallback

    store.create_session("s1", "digits", {}, 3, MODEL)
    return TrackingCallback(StoreObserver(store))


def test_a_round_s_model_id_is_only_the_model_it_committed(store: TrackingStore) -> None:
    from fedray.actors.controller.callbacks import RoundFailed, RoundStarted

    tracking = _callback(store)

    tracking.on_event(RoundStarted("s1", 1, 1, MODEL, {"combiner-0": 2}))
    running = store.get_round("s1", 1)
    tracking.on_event(RoundFailed("s1", 1, 1, "only 1 update(s) arrived"))
    failed = store.get_round("s1", 1)

    assert running["parent_model_id"] == MODEL and "model_id" not in running
    assert failed["status"] == "failed" and "model_id" not in failed  # it made no model
    checker.validate("rounds", store.db.rounds.find_one({"session_id": "s1"}))


def test_a_rerun_round_keeps_no_outcome_of_its_failed_attempt(store: TrackingStore) -> None:
    from fedray.actors.controller.callbacks import RoundCommitted, RoundFailed, RoundStarted

    tracking = _callback(store)
    share = GOOD["rounds"]["combiners"]["combiner-0"]

    tracking.on_event(RoundStarted("s1", 1, 1, MODEL, {"combiner-0": 2}))
    tracking.on_event(RoundFailed("s1", 1, 1, "only 1 update(s) arrived",
                                  {"combiner-0": share}, {"c2": "RuntimeError: no data"}))
    failed = store.get_round("s1", 1)
    tracking.on_event(RoundStarted("s1", 1, 2, MODEL, {"combiner-0": 2}))
    rerun = store.get_round("s1", 1)
    tracking.on_event(RoundCommitted("s1", 1, 2, "b" * 64, MODEL, 2, 0, 0.5, 0.01, "",
                                     {"loss": 0.5}, {"combiner-0": share}))
    committed = store.db.rounds.find_one({"session_id": "s1", "round": 1})

    assert failed["failures"] == {"c2": "RuntimeError: no data"} and failed["reason"]
    assert rerun["attempt"] == 2 and rerun["status"] == "running"
    assert not {"reason", "failures", "combiners"} & set(rerun)
    checker.validate("rounds", committed)
    assert committed["model_id"] == "b" * 64 and "reason" not in committed


def test_field_names_survive_pickling_as_ray_does_it() -> None:
    import cloudpickle

    again = cloudpickle.loads(cloudpickle.dumps(schema.ROUNDS))

    assert again.model_id == "model_id"
    with pytest.raises(AttributeError, match="no field 'nope'"):
        _ = again.nope


# a real federation (Ray, gRPC, edge clients): every document it writes validates


class FlakyWorker:
    """Fails its first training task, then adds ``delta`` like DeltaWorker."""

    def __init__(self, delta: float, examples: int) -> None:
        from test_federation import DeltaWorker

        self.inner, self.calls = DeltaWorker(delta, examples), 0

    def train(self, model: bytes, config: dict):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("the data volume is not mounted yet")
        return self.inner.train(model, config)

    def validate(self, model: bytes, config: dict):
        return self.inner.validate(model, config)


def _session(config, tracking_uri: str, fleet, workers: dict, tokens: dict[str, str],
             seed_id: str) -> dict[str, Any]:
    from fedray.deploy.federation import Federation
    from tests.waiting import wait_connected

    fleet.stop()  # the clients of an earlier session, if any
    fleet.lines.clear()
    fed = Federation(config, None, tracking_uri).deploy()
    try:
        for i, (name, worker) in enumerate(workers.items()):
            fleet.add(name, worker, fed.gateway, token=tokens[name],
                      attrs={"site": "eu" if i % 2 else "us", "rank": str(i)})
            wait_connected(fleet, i + 1)
        fed.start_session(seed_id)
        return fed.follow(lambda s: None)
    finally:
        fed.shutdown()


@pytest.mark.integration
def test_a_real_federation_writes_only_documents_the_schema_describes(
        ray_session, tracking_uri, fleet, tmp_path, monkeypatch) -> None:
    from test_federation import SEED, DeltaWorker, _config

    from fedray.bridge.keys import load_token_secret, mark_tokens_issued
    from fedray.deploy.runner import _record_package
    from fedray.serialization import encode
    from fedray.storage import open_model_store
    from fedray.tracking.tokens import create_token, revoke_token

    sync = _config("schema", tmp_path, combiners=2, rounds=2, min_clients=2, buffer_size=2,
                   validate=True, round_attempts=2, aggregator="dp_fixed",
                   aggregator_kwargs={"noise_multiplier": 0.5, "clipping_norm": 10.0,
                                      "delta": 1e-5})
    fedbuff = _config("schema", tmp_path, combiners=2, rounds=3, min_clients=2,
                      buffer_size=2, validate=True, aggregator="fedbuff")
    store = TrackingStore.from_uri(tracking_uri, sync.tracking.database)
    secret = load_token_secret(tmp_path)
    names = ["steady", "flaky-1", "flaky-2"]
    tokens = {name: create_token(store, name, secret) for name in [*names, "gone"]}
    revoke_token(store, "gone")
    mark_tokens_issued(tmp_path)
    seed_id = open_model_store("file", sync.resolved_data_dir()).put(encode(SEED))
    _record_package(tracking_uri, sync, ("f" * 64, b"package bytes", "digits-client"))

    first = _session(sync, tracking_uri, fleet, {"steady": DeltaWorker(1.0, 10),
                                                 "flaky-1": FlakyWorker(2.0, 10),
                                                 "flaky-2": FlakyWorker(3.0, 10)},
                     tokens, seed_id)
    second = _session(fedbuff, tracking_uri, fleet, {name: DeltaWorker(1.0, 10)
                                                     for name in names}, tokens, seed_id)

    assert first["state"] == "finished", first["reason"]
    assert second["state"] == "finished", second["reason"]
    docs = {c: list(store.db[c].find({})) for c in schema.DOCUMENTS}
    wrong = []
    for collection, found in docs.items():
        for doc in found:
            try:
                checker.validate(collection, doc)
            except SchemaError as exc:
                wrong.append(f"{exc}: {doc}")
    assert not wrong, "\n".join(wrong)
    # and the run wrote what the test is about, so the check above was not vacuous
    rounds = {(r["session_id"], r["round"]): r for r in docs["rounds"]}
    dp1, dp2 = rounds[first["session_id"], 1], rounds[first["session_id"], 2]
    assert dp1["status"] == dp2["status"] == "finished" and dp1["attempt"] == 2
    assert dp1["mode"] == "sync" and dp2["report"]["epsilon"] > 0 and dp2["report"]["delta"]
    closes = {s["close_reason"] for r in (dp1, dp2) for s in r["combiners"].values()}
    assert "buffer_full" in closes, closes
    assert "reason" not in dp1 and "failures" not in dp1
    versions = [rounds[second["session_id"], n] for n in (1, 2, 3)]
    assert all(v["mode"] == "async" and len(v["contributions"]) == 2 for v in versions)
    assert dp2["validation_metrics"] == {"accuracy": 0.5}  # RoundValidated's update
    assert {(s["strategy"], s["mode"], s["status"], s["seed_model_id"])
            for s in docs["sessions"]} == {("dp_fixed", "sync", "finished", seed_id),
                                           ("fedbuff", "async", "finished", seed_id)}
    assert len(docs["models"]) == 1 + 2 + 3
    assert {v["session_id"] for v in docs["validations"]} == {first["session_id"],
                                                               second["session_id"]}
    assert {c["client_id"]: (c["attrs"]["rank"], c["version"]) for c in docs["clients"]} == \
        {"steady": ("0", "fedray-0.1"), "flaky-1": ("1", "fedray-0.1"),
         "flaky-2": ("2", "fedray-0.1")}
    assert {(c["name"], c["status"]) for c in docs["combiners"]} == \
        {("combiner-0", "stopped"), ("combiner-1", "stopped")}
    assert any("round 1 attempt 1 failed" in e["message"] for e in docs["events"])
    assert len(docs["packages"]) == 1 and len(docs["tokens"]) == 4
    # docs/tracking.md's pymongo examples run on these documents and find what they say
    import pymongo

    class Client:  # what the examples' MongoClient(...) gives: this test's database
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

        def __getitem__(self, name: str):
            return store.db

    monkeypatch.setattr(pymongo, "MongoClient", Client)
    found: dict[str, Any] = {}
    for block in _doc_examples():
        exec(block, found)  # noqa: S102 - our own documentation
    nonempty = ["rounds", "retried", "shares", "epsilons", "per_client", "trail", "in_eu",
                "accuracy", "problems", "by_level"]
    assert all(found[name] for name in nonempty), {n: found[n] for n in nonempty}
    assert found["resume_from"][0] == 2 and len(found["trail"]) == 4
    per_client = [c["_id"] for c in found["per_client"]]  # who got in first is timing
    assert per_client == sorted(per_client) and set(per_client) <= set(names)
    store.close()
