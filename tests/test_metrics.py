"""Ray dashboard metrics: read back from the node's Prometheus endpoint after a round."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest
import ray
from test_federation import SEED, BadWorker, DeltaWorker, _config

from fedray.deploy.federation import Federation
from fedray.serialization import encode
from fedray.storage import open_model_store
from tests.waiting import wait_connected, wait_until

pytestmark = pytest.mark.integration


def _scrape() -> str:
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def _value(text: str, name: str, **tags: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(labels.get(k) == v for k, v in tags.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_round_metrics_reach_the_node_metrics_endpoint(ray_session, tracking_uri, fleet, tmp_path):
    config = _config("metrics", tmp_path, combiners=1, min_clients=2)
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(SEED))
    nan = {"w": np.full((4, 8), np.nan, np.float32), "b": np.zeros(8, np.float32)}
    fed = Federation(config, None, tracking_uri).deploy()
    try:
        for i, worker in enumerate([DeltaWorker(1.0, 10), DeltaWorker(2.0, 10), BadWorker(nan)]):
            fleet.add(f"m{i}", worker, fed.gateway)
            wait_connected(fleet, i + 1)
        fed.start_session(seed_id)
        assert fed.follow(lambda s: None)["state"] == "finished"
        wanted = {
            ("ray_fedray_updates_received_total", "combiner-0", ()): 2.0,
            ("ray_fedray_updates_rejected_total", "combiner-0", (("reason", "non_finite"),)): 1.0,
            ("ray_fedray_connected_clients", "combiner-0", ()): 3.0,
            ("ray_fedray_rounds_completed_total", "controller", ()): 1.0,
        }
        scraped = {"text": "", "seen": {}}

        def exported() -> bool:
            text = scraped["text"] = _scrape()
            scraped["seen"] = {key: _value(text, key[0], federation="metrics", source=key[1],
                                           **dict(key[2]))
                               for key in wanted}
            return scraped["seen"] == wanted

        # Ray exports every few seconds
        wait_until(exported, "Ray to export the wanted metrics", timeout=30, poll_s=1.0,
                   describe=lambda: scraped["seen"])
        text = scraped["text"]
        bytes_in = _value(text, "ray_fedray_bytes_in_total", federation="metrics", source="combiner-0")
        assert bytes_in and bytes_in > 0
        assert "ray_fedray_round_seconds_bucket" in text
    finally:
        fed.shutdown()
