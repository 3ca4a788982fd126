"""deploy/kuberay agrees with the federation config it deploys (no cluster needed).

The RayJob's entrypoint is a `fedray run` (or `serve`) command line that fedray's own CLI
parses, naming the config file the head mounts and a data directory on a volume; the
config, loaded with fedray's loader, passes every check, and its multi-host rule (a
MongoDB and an S3 store every node reaches); the RayCluster's pods offer the resources
the placement policy needs for every combiner, expose the gateway and combiner ports on
every pod that may run them, keep Ray's worker ports clear of those, carry the secrets
the config reads, and run the Ray version fedray pins.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from fedray.actors.placement import NodeView, plan
from fedray.deploy import reach
from fedray.deploy.config_file import config_from_dict, load_yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "deploy" / "kuberay"


def _documents() -> dict[str, dict]:
    found = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found[doc["kind"]] = doc
    return found


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return _documents()


@pytest.fixture(scope="module")
def command(docs):
    """The RayJob's entrypoint as fedray's CLI parses it: (command name, its params)."""
    from fedray.cli.main import main

    args = shlex.split(docs["RayJob"]["spec"]["entrypoint"])
    assert args[0] == "fedray" and args[1] in {"run", "serve"}, args
    group = main.make_context("fedray", [args[1]])
    sub = main.get_command(group, args[1])
    return args[1], sub.make_context(args[1], args[2:], parent=group).params


@pytest.fixture(scope="module")
def config(docs, command):
    _, params = command
    (text,) = docs["ConfigMap"]["data"].values()
    overrides = dict(item.split("=", 1) for item in params["overrides"])
    return config_from_dict(load_yaml(text), "deploy/kuberay/federation.yaml",
                            {k: load_yaml(v) for k, v in overrides.items()})


def _groups(docs) -> list[tuple[str, dict, dict, int]]:
    """(name, rayStartParams, the Ray container, pods) of the head and each worker group."""
    spec = docs["RayCluster"]["spec"]
    groups = [("head", spec["headGroupSpec"], 1)]
    groups += [(g["groupName"], g, g["replicas"]) for g in spec["workerGroupSpecs"]]
    return [(name, g["rayStartParams"], g["template"]["spec"]["containers"][0], pods)
            for name, g, pods in groups]


def _custom_resources(params: dict) -> dict:
    raw = params.get("resources")
    return json.loads(json.loads(raw)) if raw else {}  # KubeRay's form: a quoted JSON string


def _head_mounts(docs) -> dict[str, str]:
    (_, _, head, _) = _groups(docs)[0]
    return {m["mountPath"]: m["name"] for m in head.get("volumeMounts", [])}


def test_the_job_runs_fedray_on_the_cluster_the_manifest_makes(docs, command):
    assert docs["RayJob"]["spec"]["clusterSelector"] == {
        "ray.io/cluster": docs["RayCluster"]["metadata"]["name"]}
    name, params = command
    assert params["config_path"].parent.as_posix() in _head_mounts(docs)
    assert params["data_dir"] is not None, "the data directory must be on a volume, not ~"
    assert params["data_dir"].as_posix() in _head_mounts(docs)
    assert not params["insecure"]


def test_the_config_it_deploys_loads_and_is_fit_for_several_hosts(docs, config):
    assert config.ray.address == "local"  # a Ray job's driver joins the job's cluster
    pods = sum(pods for *_, pods in _groups(docs))
    hosts = [f"10.0.0.{i}" for i in range(pods)]  # every pod is a host of its own
    assert reach.problems(config, hosts) == []
    assert reach.warnings(config, hosts) == []


def test_the_pods_have_room_for_every_combiner_where_the_config_asks(docs, config):
    nodes = []
    for name, params, _container, pods in _groups(docs):
        resources = {"CPU": float(params.get("num-cpus", 1)), "memory": 4e9,
                     **_custom_resources(params)}
        nodes += [NodeView(f"{name}-{i}", f"{name}-{i}", resources, head=name == "head")
                  for i in range(pods)]
    decided = plan(nodes, config.combiners.count, config.combiners.placement,
                   config.combiners.resources)
    assert decided.unplaced == 0
    # With one fedray_combiner per pod, spread over as many pods as there are combiners.
    assert decided.eligible >= config.combiners.count


def _may_run_a_combiner(config, params: dict) -> bool:
    need = config.combiners.resources
    return all(_custom_resources(params).get(k, 0) >= v for k, v in need.items())


def test_every_pod_exposes_the_ports_of_what_may_run_on_it(docs, config):
    c = config.combiners
    combiner_ports = set(range(c.base_port, c.base_port + c.count))
    for name, params, container, _ in _groups(docs):
        ports = {p["containerPort"] for p in container.get("ports", [])}
        assert config.controller.port in ports, name  # the controller goes where Ray puts it
        if _may_run_a_combiner(config, params):
            assert combiner_ports <= ports, (name, sorted(combiner_ports - ports))
        low, high = int(params["min-worker-port"]), int(params["max-worker-port"])
        clash = {config.controller.port, *combiner_ports} & set(range(low, high + 1))
        assert not clash, f"{name}: Ray's worker ports {low}-{high} take {sorted(clash)}"


def test_the_driver_has_the_secrets_the_config_reads(docs, config):
    from fedray.deploy.federation import FORWARDED_ENV

    (_, _, head, _) = _groups(docs)[0]
    env = {e["name"]: e for e in head["env"]}
    assert "secretKeyRef" in env[config.auth.token_env]["valueFrom"]
    if config.storage.uri.startswith("s3://"):  # read by the driver, forwarded to the actors
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key in FORWARDED_ENV and "secretKeyRef" in env[key]["valueFrom"]


def test_the_image_runs_the_ray_fedray_pins(docs):
    import ray

    assert docs["RayCluster"]["spec"]["rayVersion"] == ray.__version__
    images = {container["image"] for *_, container, _ in _groups(docs)}
    assert images == {f"fedray:0.1.0-ray{ray.__version__}"}
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311" in dockerfile
    assert f"-t {images.pop()} ." in dockerfile
