"""One digits federation for integration tests that compare sessions on it: real Ray,
2 combiners, in-process edge clients over real sockets, each session submitted to the
same deployment (tests/test_codecs_federation.py, tests/test_secagg_digits.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from fedray.actors.controller.queue import SessionRequest
from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from fedray.edge.workers import CallbackWorker
from fedray.serialization import decode, encode
from fedray.storage import open_model_store
from tests.waiting import wait_connected, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.digits import app  # noqa: E402
from examples.digits.client import model  # noqa: E402
from examples.digits.data import load_client_data, write_partitions  # noqa: E402
from examples.digits.seed import seed_model  # noqa: E402


@dataclasses.dataclass
class Digits:
    fed: Federation
    store: Any
    seed_id: str
    test: Any  # the held-out split

    def submit(self, **session: Any) -> tuple[str, dict[str, Any]]:
        """Run one session with these session settings; (its id, its final status)."""
        settings = dataclasses.replace(self.fed.config.session, **session)
        session_id = uuid.uuid4().hex[:16]
        ray.get(self.fed.controller.submit_session.remote(
            SessionRequest(session_id, settings, self.seed_id)))
        # follow() reports the controller's current session: wait until it is this one
        wait_until(lambda: (ray.get(self.fed.controller.watch.remote(-1, 0.0, 0))[1] or {})
                   .get("session_id") == session_id, f"session {session_id} to start")
        return session_id, self.fed.follow(lambda s: None)

    def accuracy(self, status: dict[str, Any]) -> float:
        """Held-out accuracy of the session's final model."""
        weights = decode(self.store.get(status["model_id"]))
        return model.evaluate(weights, self.test.X, self.test.y)["accuracy"]


@contextlib.contextmanager
def digits_federation(name: str, tmp: Path, tracking_uri: str, clients: int,
                      rounds: int) -> Iterator[Digits]:
    from tests.conftest import EdgeFleet

    paths = write_partitions(tmp / "data", clients, "iid", seed=0)
    config = config_from_dict({
        "federation": name, "seed_model": "unused", "data_dir": str(tmp),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 2, "host": "127.0.0.1", "base_port": 0},
        "tracking": {"database": f"t_{name.replace('-', '_')}"},
        "session": {"rounds": rounds, "min_clients": clients, "round_timeout_s": 60,
                    "validate": False, "wait_for_clients_s": 60, "seed": 1},
    })
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(seed_model()))
    fed = Federation(config, None, tracking_uri).deploy()
    fleet = EdgeFleet()
    try:
        for i, path in enumerate(paths):
            fleet.add(f"digits-{i:02d}", CallbackWorker(*app.make_client_fns(str(path))),
                      fed.gateway)
        wait_connected(fleet, clients, timeout=60)
        yield Digits(fed, store, seed_id, load_client_data(tmp / "data" / "test.npz"))
    finally:
        fleet.close()
        fed.shutdown()
