"""Integration: a whole federation whose models live in S3 (a real SeaweedFS on loopback).

The controller actor opens the model store itself from ``storage.uri``. Actors of a Ray that
was already running do not see environment variables the driver set later, so the keys
travel in the URI's ``access_key``/``secret_key`` parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_federation import SEED, DeltaWorker

from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from fedray.serialization import decode, encode
from fedray.storage import open_model_store
from fedray.storage.s3 import S3ModelStore
from fedray.tracking.store import TrackingStore
from tests.waiting import wait_connected

pytestmark = pytest.mark.integration



def test_two_rounds_commit_every_model_to_the_bucket(ray_session, tracking_uri, fleet, seaweedfs,
                                                     tmp_path):
    bucket = seaweedfs.new_bucket()
    config = config_from_dict({
        "federation": "s3-models", "seed_model": "unused", "data_dir": str(tmp_path),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 1, "host": "127.0.0.1", "base_port": 0,
                      "heartbeat_interval_s": 0.5, "offline_after_s": 3},
        "tracking": {"database": "t_s3_models"},
        "storage": {"uri": seaweedfs.uri(bucket, prefix="fed")},
        "session": {"rounds": 2, "min_clients": 2, "round_timeout_s": 20, "validate": False,
                    "wait_for_clients_s": 30},
    })
    store = open_model_store(config.storage.uri, config.resolved_data_dir())
    assert isinstance(store, S3ModelStore)
    seed_id = store.put(encode(SEED))
    fed = Federation(config, None, tracking_uri).deploy()
    try:
        fleet.add("a", DeltaWorker(1.0, 10), fed.gateway)
        fleet.add("b", DeltaWorker(3.0, 30), fed.gateway)
        wait_connected(fleet, 2)
        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()

    assert status["state"] == "finished", status
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    trail = tracking.find("models", {"session_id": status["session_id"]}, sort=[("round", 1)])
    assert [m["round"] for m in trail] == [0, 1, 2]
    assert trail[-1]["model_id"] == status["model_id"]
    for model in trail:
        assert model["storage_uri"] == f"s3://{bucket}/{store.key(model['model_id'])}"
        assert model["storage_uri"].startswith(f"s3://{bucket}/fed/models/")
        store.get(model["model_id"])  # present, and its bytes hash to its id
    objects = {o.object_name for o in seaweedfs.client().list_objects(bucket, recursive=True)}
    assert objects == {store.key(m["model_id"]) for m in trail}
    np.testing.assert_allclose(decode(store.get(status["model_id"]))["w"], 2 * 2.5)  # (10+90)/40
