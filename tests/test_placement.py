"""Where combiners run, decided without Ray: the placement policy, the check that every
node reaches tracking and the model store, the config rules, and the Ray options the
decision becomes."""

from __future__ import annotations

import pytest

from fedray.actors.placement import MARKER, NodeView
from fedray.actors.placement import plan as place
from fedray.deploy import reach
from fedray.deploy.config_file import config_from_dict
from fedray.errors import ConfigError

BASE = {"federation": "demo", "seed_model": "seed.safetensors"}


def _nodes(*resources: dict, ips: tuple[str, ...] | None = None) -> tuple[NodeView, ...]:
    ips = ips or ("127.0.0.1",) * len(resources)
    return tuple(NodeView(f"n{i}", ips[i], r, head=i == 0) for i, r in enumerate(resources))


def _config(**sections):
    return config_from_dict({**BASE, **sections})


@pytest.mark.parametrize(("mode", "strategy"), [("spread", "SPREAD"), ("pack", "PACK")])
def test_the_placement_is_a_placement_group_strategy_with_one_bundle_per_combiner(mode, strategy):
    # Prepare: three nodes, no resource asked of them
    nodes = _nodes({"CPU": 2, "memory": 8e9}, {"CPU": 1, "memory": 4e9}, {"memory": 4e9})
    # Execute
    decided = place(nodes, 3, mode, {})
    # Assert: each bundle asks the marker every node has, and all of them fit
    assert decided.strategy == strategy
    assert decided.bundles == (MARKER,) * 3
    assert decided.eligible == 3 and decided.unplaced == 0


def test_resources_become_the_bundles_and_only_nodes_offering_them_count():
    nodes = _nodes({"CPU": 4, "memory": 8e9}, {"fedray_combiner": 2}, {"fedray_combiner": 1.5})
    decided = place(nodes, 3, "spread", {"fedray_combiner": 1})
    assert decided.bundles == ({"fedray_combiner": 1.0},) * 3
    assert (decided.room, decided.eligible, decided.unplaced) == (3, 2, 0)


def test_combiners_that_fit_nowhere_are_counted_not_dropped_silently():
    nodes = _nodes({"CPU": 4}, {"fedray_combiner": 1})
    decided = place(nodes, 3, "pack", {"fedray_combiner": 1})
    assert (decided.room, decided.eligible, decided.unplaced) == (1, 1, 2)


def test_several_resources_must_all_fit():
    nodes = _nodes({"fedray_combiner": 4, "CPU": 1}, {"fedray_combiner": 4, "CPU": 4})
    decided = place(nodes, 4, "pack", {"fedray_combiner": 1, "CPU": 2})
    assert decided.bundles[0] == {"fedray_combiner": 1.0, "CPU": 2.0}
    assert (decided.room, decided.eligible, decided.unplaced) == (2, 1, 2)


def test_a_node_with_no_memory_resource_takes_no_marker_bundle():
    decided = place(_nodes({"CPU": 1}, {"memory": 1e9}), 2, "spread", {})
    assert (decided.eligible, decided.unplaced) == (1, 0)


def test_an_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="spread, pack"):
        place(_nodes({}), 1, "random", {})


# ---- the config

def test_placement_defaults_to_spread_with_no_resources():
    c = _config().combiners
    assert (c.placement, c.resources) == ("spread", {})


@pytest.mark.parametrize(("combiners", "message"), [
    ({"placement": "scatter"}, "combiners.placement must be spread or pack, got 'scatter'"),
    ({"resources": {"fedray_combiner": 0}}, "combiners.resources.fedray_combiner must be a "
                                            "number greater than 0"),
    ({"resources": {"fedray_combiner": "one"}}, "combiners.resources.fedray_combiner must be"),
    ({"resources": {"fedray_combiner": True}}, "combiners.resources.fedray_combiner must be"),
    ({"resources": ["fedray_combiner"]}, "combiners.resources must be dict"),
])
def test_bad_placement_settings_are_one_line_naming_the_field(combiners, message):
    with pytest.raises(ConfigError, match="^<dict>: " + message.replace(".", r"\.")
                       .replace("(", r"\(").replace("[", r"\[")):
        _config(combiners=combiners)


def test_placement_settings_load():
    c = _config(combiners={"placement": "pack", "resources": {"fedray_combiner": 1}}).combiners
    assert (c.placement, c.resources) == ("pack", {"fedray_combiner": 1})


# ---- every node reaches tracking and the model store

S3 = "s3://models?endpoint=minio.internal:9000"
MONGO = "mongodb://mongo.internal:27017/fedray"
TWO_HOSTS = ["10.0.0.1", "10.0.0.2", "10.0.0.2"]


@pytest.mark.parametrize("hosts", [[], ["10.0.0.1"], ["127.0.0.1"] * 3])
def test_one_host_needs_nothing_shared(hosts):
    assert reach.problems(_config(), hosts) == []


@pytest.mark.parametrize(("tracking", "storage", "expected"), [
    ("embedded", "file", ["tracking.uri is 'embedded'", "storage.uri is 'file'"]),
    ("embedded", S3, ["tracking.uri is 'embedded'"]),
    (MONGO, "file", ["storage.uri is 'file'"]),
    ("mongodb://127.0.0.1:27017/fedray", S3, ["tracking.uri names a loopback host"]),
    ("mongodb://u:p@mongo.internal:27017,[::1]:27018/x?replicaSet=r", S3,
     ["tracking.uri names a loopback host"]),
    (MONGO, "s3://models?endpoint=localhost:9000", ["storage.uri's endpoint is a loopback host"]),
    (MONGO, "s3://models?endpoint=http://127.0.0.1:9000", ["storage.uri's endpoint is a loopback"]),
    (MONGO, S3, []),
    ("mongodb+srv://cluster0.example.net/fedray", "s3://models", []),
    (MONGO, "file:///shared/fedray-models", []),
])
def test_several_hosts_need_tracking_and_storage_every_node_reaches(tracking, storage, expected):
    config = _config(tracking={"uri": tracking}, storage={"uri": storage})
    found = reach.problems(config, TWO_HOSTS)
    assert len(found) == len(expected)
    for problem, what in zip(found, expected, strict=True):
        assert problem.startswith("the Ray cluster's nodes are on 2 hosts, but " + what)
    if any("tracking" in w for w in expected):
        assert any("set tracking.uri: mongodb://" in p for p in found)
    if any("storage" in w for w in expected):
        assert any("set storage.uri: s3://" in p for p in found)


def test_a_file_path_on_several_hosts_is_a_warning_about_a_shared_filesystem():
    config = _config(tracking={"uri": MONGO}, storage={"uri": "file:///shared/models"})
    assert reach.problems(config, TWO_HOSTS) == []
    assert "every Ray node mounts" in reach.warnings(config, TWO_HOSTS)[0]
    assert reach.warnings(config, ["10.0.0.1"]) == []


def test_the_driver_refuses_to_start_across_hosts_with_what_to_set():
    pytest.importorskip("ray")
    from fedray.deploy.nodes import check_reach

    nodes = _nodes({}, {}, ips=("10.0.0.1", "10.0.0.2"))
    with pytest.raises(ConfigError) as refused:
        check_reach(_config(), nodes)
    text = str(refused.value)
    assert text.startswith("<dict>: the Ray cluster's nodes are on 2 hosts")
    assert "tracking.uri: mongodb://" in text and "storage.uri: s3://" in text
    assert "\n" not in text
    check_reach(_config(tracking={"uri": MONGO}, storage={"uri": S3}), nodes)  # no error


# ---- the decision, checked before Ray is asked

def test_too_few_nodes_with_the_resources_is_refused_with_what_to_change():
    pytest.importorskip("ray")
    from fedray.deploy.nodes import checked_plan

    config = _config(combiners={"count": 3, "resources": {"fedray_combiner": 1}})
    with pytest.raises(ConfigError, match=r"^<dict>: combiners.count is 3 but 1 of the cluster's "
                       r"2 nodes offer combiners.resources \{'fedray_combiner': 1\}, with room "
                       r"for 1: start nodes that offer it"):
        checked_plan(config, _nodes({"CPU": 1}, {"fedray_combiner": 1}))
    fits = checked_plan(config, _nodes({"CPU": 1}, {"fedray_combiner": 3}))
    assert fits.unplaced == 0
