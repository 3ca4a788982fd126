"""FEDn's compute packages as they are: fedn.yaml, python_env.yaml, .fednignore, the numpy
helper's npz at the boundary, seed.npz, `fedray package seed` and `--format fedn`.

The packages here mimic FEDn's helper with numpy alone (``np.savez_compressed`` under
"0", "1", ...), so they run in this interpreter; tests/test_fedn_e2e.py runs the real
``fedn`` helpers in a package venv.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from wheels import make_wheel, offline_pip

from fedray.cli.main import main
from fedray.errors import ConfigError, PackageError
from fedray.packages import build_package, load_package
from fedray.packages.fedn import parse_fedn_manifest, read_fedn_manifest
from fedray.serialization import (
    SerializationError,
    decode,
    decode_npz,
    encode,
    encode_fedn_npz,
)

SEED = {"0": np.arange(6, dtype=np.float32).reshape(2, 3), "1": np.zeros(3, np.float32),
        "2": np.array([7, 8], np.int64)}
FEDN_YAML = """\
entry_points:
  build:
    command: python model.py
  startup:
    command: python data.py
  train:
    command: python train.py
  validate:
    command: python validate.py
"""
# FEDn's helper in numpy alone: helper.load/save, save_metadata, load_metadata, save_metrics.
HELPER = """\
import json, os
import numpy as np

def load(path):
    a = np.load(path)
    return [a[str(i)] for i in range(len(a.files))]

def save(weights, path):
    np.savez_compressed(path, **{str(i): w for i, w in enumerate(weights)})

def save_metadata(meta, path):
    with open(path + "-metadata", "w") as f:
        json.dump(meta, f)

def load_metadata(path):
    with open(path + "-metadata") as f:
        return json.load(f)
"""
# Adds 1 to every array; the round's settings (FEDn's client_settings) say what else to do.
TRAIN = """\
import os, sys
import numpy as np
from helper import load, load_metadata, save, save_metadata

inp, out = sys.argv[1], sys.argv[2]
settings = load_metadata(inp)
mode = settings.get("mode", "ok")
weights = [w + 1 for w in load(inp)]
if mode == "wrong_keys":
    weights = weights[:-1]
if mode == "wrong_shape":
    weights[0] = np.zeros((5, 5), np.float32)
if mode != "no_model":
    save(weights, out)
meta = {"num_examples": 7, "loss": 0.5, "lr": settings.get("lr", 0), "note": "text",
        "data_seen": int(os.environ.get("FEDN_DATA_PATH") == os.environ.get("FEDRAY_DATA"))}
if mode == "no_num_examples":
    del meta["num_examples"]
if mode != "no_metadata":
    save_metadata(meta, out)
"""
VALIDATE = """\
import json, sys
from helper import load
json.dump({"accuracy": 0.9, "n_arrays": len(load(sys.argv[1])), "tag": "x"},
          open(sys.argv[2], "w"))
"""
MODEL = """\
import numpy as np
from helper import save
save([np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros(3, np.float32),
      np.array([7, 8], np.int64)], "../seed.npz")
"""
DATA = """\
import os
if "COUNT_DIR" in os.environ:
    with open(os.path.join(os.environ["COUNT_DIR"], "startups"), "a") as f:
        f.write("x")
"""


def fedn_package(root: Path, **extra: str) -> Path:
    files = {"fedn.yaml": FEDN_YAML, "helper.py": HELPER, "train.py": TRAIN,
             "validate.py": VALIDATE, "model.py": MODEL, "data.py": DATA, **extra}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


# ------------------------------------------------------------------------------ manifest


def test_fedn_yaml_entry_points_get_fedns_arguments():
    manifest = parse_fedn_manifest(FEDN_YAML + "unknown_key: ignored\n")
    assert manifest.format == "fedn" and manifest.name == "fedn-package"
    assert manifest.command("train") == ("python", "train.py", "{in_model}", "{out_model}")
    assert manifest.command("validate") == ("python", "validate.py", "{in_model}", "{out_meta}")
    assert manifest.command("build") == ("python", "model.py")
    assert manifest.python_env is None


@pytest.mark.parametrize("text, needle", [
    ("entry_points:\n  startup: {command: python data.py}\n  forward: {command: python f.py}\n"
     "  backward: {command: python b.py}\n",
     "entry_points has no 'train' (it has backward, forward, startup); fedray runs train and "
     "validate (split learning's forward and backward are not supported)"),
    ("entry_points:\n  train: {command: python a.py && python b.py}\n",
     "entry_points.train.command uses shell syntax ('&&'); fedray runs entry points without a "
     "shell"),
    ("entry_points:\n  train: python train.py\n", "entry_points.train: needs 'command'"),
    ("python_env: python_env.yaml\n", "needs 'entry_points'"),
    ("entry_points: [\n", "not valid YAML"),
])
def test_a_fedn_yaml_fedray_cannot_run_is_one_line_naming_the_file(text, needle):
    with pytest.raises(PackageError) as err:
        parse_fedn_manifest(text, "client/fedn.yaml")
    assert str(err.value).startswith("client/fedn.yaml") and needle in str(err.value)
    assert "\n" not in str(err.value).strip() or "YAML" in str(err.value)


def test_python_env_yaml_gives_the_requirements_in_order_and_the_name(tmp_path):
    root = fedn_package(tmp_path / "client", **{
        "fedn.yaml": "python_env: python_env.yaml\n" + FEDN_YAML,
        "python_env.yaml": textwrap.dedent("""\
            name: .mnist-pytorch
            python: "3.11"
            build_dependencies:
              - pip
              - wheel==0.37.1
            dependencies:
              - fedn
              # PyTorch macOS x86 builds deprecation
              - torch==2.4.1; (sys_platform == "darwin" and platform_machine == "arm64") or (sys_platform == "linux")
              - -r extra.txt
            """),
        "extra.txt": "numpy>=1.24  # pinned\n"})
    manifest = read_fedn_manifest(root)
    assert manifest.name == "mnist-pytorch"
    assert manifest.python_env.requirements == (
        "pip", "wheel==0.37.1", "fedn", 'torch==2.4.1; (sys_platform == "darwin" and '
        'platform_machine == "arm64") or (sys_platform == "linux")', "numpy>=1.24")


@pytest.mark.parametrize("line, needle", [
    ("fedn @ https://example.com/fedn.whl", "dependencies[1]: 'fedn @ https://example.com/fedn.whl' "
     "is a direct reference (name @ URL); only requirement specifiers by name"),
    ("git+https://github.com/scaleoutsystems/fedn", "dependencies[1]: 'git+https://github.com/sc"
     "aleoutsystems/f' is a version-control URL"),
    ("./vendor/fedn", "is a local path"),
    ("--extra-index-url http://evil.example", "is a pip option"),
    ("{pip: [fedn]}", "dependencies[1] is a mapping ('pip'); FEDn's python_env lists pip "
     "requirement lines only"),
    ("-r ../outside.txt", "is not a file in the package"),
])
def test_a_python_env_yaml_line_fedray_refuses_names_the_file_and_line(tmp_path, line, needle):
    root = fedn_package(tmp_path / "client", **{
        "fedn.yaml": "python_env: python_env.yaml\n" + FEDN_YAML,
        "python_env.yaml": f"name: x\ndependencies:\n  - numpy\n  - {line}\n"})
    with pytest.raises(PackageError) as err:
        load_package(root)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "python_env.yaml" in str(err.value) or "outside.txt" in str(err.value)


def test_a_python_env_yaml_outside_the_package_or_with_unknown_fields_is_refused(tmp_path):
    root = fedn_package(tmp_path / "client", **{
        "fedn.yaml": "python_env: ../python_env.yaml\n" + FEDN_YAML})
    with pytest.raises(PackageError, match="python_env must name a file in the package"):
        load_package(root)
    (root / "fedn.yaml").write_text("python_env: python_env.yaml\n" + FEDN_YAML)
    (root / "python_env.yaml").write_text("name: x\nchannels: [conda-forge]\n")
    with pytest.raises(PackageError, match="field 'channels' is unknown"):
        load_package(root)


def test_environment_markers_are_honoured_when_the_venv_is_built(tmp_path, monkeypatch):
    make_wheel(tmp_path / "wheels")
    offline_pip(monkeypatch, tmp_path / "wheels")
    root = fedn_package(tmp_path / "client", **{
        "fedn.yaml": "python_env: python_env.yaml\n" + FEDN_YAML,
        "python_env.yaml": "name: .markers\ndependencies:\n  - fedray-envprobe==0.1\n"
                           '  - fedray-nosuch==1.0; sys_platform == "nonesuch"\n'
                           '  - fedray-nosuch==2.0; python_version < "3"\n'})
    lines: list[str] = []
    package = load_package(root).with_env(tmp_path / "cache", say=lines.append)
    import subprocess

    out = subprocess.run([str(package.env.python), "-c",
                          "import fedray_envprobe, importlib.util as u; "
                          "print(fedray_envprobe.VALUE, u.find_spec('fedray_nosuch'))"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["42", "None"], out.stderr
    assert "built the python env of package 'markers'" in lines[-1]


# ------------------------------------------------------------------------------ calls


def test_train_and_validate_run_with_fedns_convention(tmp_path):
    package = load_package(fedn_package(tmp_path / "client"))
    data = str(tmp_path / "data.npz")
    new, examples, metrics = package.train(encode(SEED), {"lr": 0.25, "epochs": 2}, data)
    assert examples == 7
    assert metrics == {"loss": 0.5, "lr": 0.25, "data_seen": 1}  # text is no metric
    got = decode(new)
    assert list(got) == list(decode(encode(SEED)))
    for key, array in SEED.items():
        assert got[key].dtype == array.dtype
        np.testing.assert_array_equal(got[key], array + 1)
    assert package.validate(new, {}, data) == (0, {"accuracy": 0.9, "n_arrays": 3})


@pytest.mark.parametrize("mode, needle", [
    ("no_metadata", r"train: wrote no .*/out\.npz-metadata \(expected JSON with 'num_examples': "
                    r"FEDn's save_metadata\(\{'num_examples': n\}, out_model_path\)\)"),
    ("no_num_examples", r"train: .*/out\.npz-metadata has no 'num_examples' \(expected a "
                        r"positive integer, the examples trained on"),
    ("wrong_keys", r"train: .*/out\.npz holds arrays '0', '1', the global model '0', '1', '2' "
                   r"\(expected one array per array of in_model, in the same order\)"),
    ("wrong_shape", r"train: .*/out\.npz: array 0 has shape \(5, 5\), the global model's \(2, 3\)"),
    ("no_model", r"train: wrote no model to .*/out\.npz \(expected the numpy helper's npz"),
])
def test_what_a_fedn_train_got_wrong_is_one_line(tmp_path, mode, needle):
    package = load_package(fedn_package(tmp_path / "client"))
    with pytest.raises(PackageError) as err:
        package.train(encode(SEED), {"mode": mode}, "")
    assert str(err.value).startswith("package 'fedn-package' train: ")
    assert "\n" not in str(err.value)
    import re

    assert re.search(needle, str(err.value)), str(err.value)


def test_a_model_with_named_tensors_is_refused_before_the_package_runs(tmp_path):
    package = load_package(fedn_package(tmp_path / "client"))
    with pytest.raises(PackageError, match="the global model's tensors are named 'w', not "
                                           "'0', '1', ...: a FEDn package takes the numpy "
                                           "helper's arrays by position"):
        package.train(encode({"w": np.zeros(2, np.float32)}), {}, "")


def test_startup_runs_once_before_the_first_task(tmp_path, monkeypatch):
    from fedray.edge.workers import PackageWorker

    monkeypatch.setenv("COUNT_DIR", str(tmp_path))
    worker = PackageWorker(load_package(fedn_package(tmp_path / "client")))
    lines: list[str] = []
    worker.prepare(lines.append)
    worker.prepare(lines.append)
    assert (tmp_path / "startups").read_text() == "x"
    assert lines == [lines[0]] and "ran the startup entry point of package 'fedn-package'" \
        in lines[0]
    broken = PackageWorker(load_package(fedn_package(tmp_path / "other", **{
        "data.py": "import sys; sys.exit('no data here')\n"})))
    with pytest.raises(PackageError, match=r"^package 'fedn-package' startup: exited with code "
                                           r"1\nno data here"):
        broken.prepare(lines.append)


# ------------------------------------------------------------------------------ archives


def test_fednignore_leaves_files_out_and_a_fedn_tgz_loads_as_a_fedn_package(tmp_path):
    root = fedn_package(tmp_path / "client", **{
        ".fednignore": "# FEDn's own\n__pycache__\n.venv-name\ndata\n*.tgz\nsub/secret.txt\n",
        "data/clients/1/big.npz": "x", ".venv-name/bin/python": "x", "old.tgz": "x",
        "sub/secret.txt": "x", "sub/kept.txt": "x"})
    archive = tmp_path / "package.tgz"
    sha = build_package(root, archive)
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    assert names == sorted([".fednignore", "data.py", "fedn.yaml", "helper.py", "model.py",
                            "sub", "sub/kept.txt", "train.py", "validate.py"])
    package = load_package(archive, cache_dir=tmp_path / "cache", expected_sha256=sha)
    assert package.is_fedn and package.train(encode(SEED), {}, "")[1] == 7


def test_an_archive_as_fedn_package_create_writes_it_loads(tmp_path):
    """Files only, no folder entries, names relative to the package folder."""
    root = fedn_package(tmp_path / "client", **{"lib/util.py": "X = 1\n"})
    archive = tmp_path / "package.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            tar.add(path, arcname=str(path.relative_to(root)))
    package = load_package(archive, cache_dir=tmp_path / "cache")
    assert package.is_fedn and (package.root / "lib" / "util.py").is_file()
    assert package.train(encode(SEED), {}, "")[1] == 7


def test_a_tgz_of_the_client_folder_itself_loads_from_that_folder(tmp_path):
    """``tar -czf package.tgz client``, as FEDn's older quick starts packed it."""
    root = fedn_package(tmp_path / "client")
    archive = tmp_path / "package.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="client")
    package = load_package(archive, cache_dir=tmp_path / "cache")
    assert package.root.name == "client" and package.is_fedn
    assert package.validate(encode(SEED), {}, "")[1]["n_arrays"] == 3
    with tarfile.open(tmp_path / "evil.tgz", "w:gz") as tar:
        tar.add(root / "fedn.yaml", arcname="client/fedn.yaml")
        info = tarfile.TarInfo("client/../../escape.py")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(PackageError, match="has a '..' component"):
        load_package(tmp_path / "evil.tgz", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------ seeds, models


def test_the_numpy_helper_npz_maps_positions_to_names_both_ways_bit_exactly(tmp_path):
    many = {str(i): np.random.default_rng(i).normal(size=(i % 3 + 1, 2)).astype(
        [np.float32, np.float64, np.float16][i % 3]) for i in range(12)}
    many["11"] = np.arange(4, dtype=np.int64)
    npz = encode_fedn_npz(many)
    with np.load(io.BytesIO(npz)) as loaded:  # FEDn's helper.load, in numpy
        weights = [loaded[str(i)] for i in range(len(loaded.files))]
    assert [w.tobytes() for w in weights] == [many[str(i)].tobytes() for i in range(12)]
    assert [w.dtype for w in weights] == [many[str(i)].dtype for i in range(12)]
    assert encode(decode_npz(npz)) == encode(many)
    with pytest.raises(SerializationError, match="tensors named 'w' are not the positions"):
        encode_fedn_npz({"w": np.zeros(1)})
    objects = io.BytesIO()
    np.savez(objects, **{"0": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(SerializationError, match="without pickle"):
        decode_npz(objects.getvalue())
    with pytest.raises(SerializationError, match="not an npz file"):
        decode_npz(b"not a zip")


def test_seed_model_npz_starts_from_its_arrays(tmp_path):
    from fedray.deploy.seeds import load_seed

    path = tmp_path / "seed.npz"
    np.savez_compressed(path, **SEED)
    assert load_seed(str(path)) == encode(SEED)
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"seed_model: .*bad\.npz: not an npz file"):
        load_seed(str(tmp_path / "bad.npz"))


def test_models_get_format_fedn_writes_the_numpy_helper_file(tmp_path):
    from fedray.storage import FileModelStore

    store = FileModelStore(tmp_path / "store")
    model_id, named_id = store.put(encode(SEED)), store.put(encode({"w": np.zeros(2)}))
    out = tmp_path / "m.npz"
    args = ["--storage", store.root.as_uri(), "--format", "fedn", "-o", str(out)]
    result = CliRunner().invoke(main, ["models", "get", model_id, *args])
    assert result.exit_code == 0, result.output
    assert encode(decode_npz(str(out))) == encode(SEED)
    result = CliRunner().invoke(main, ["models", "get", named_id, *args[:-1], str(tmp_path / "n")])
    assert result.exit_code == 2 and "--format fedn: tensors named 'w' are not the positions" \
        in result.output and not (tmp_path / "n").exists()


def test_package_seed_runs_build_and_reports_the_seed_it_wrote(tmp_path, monkeypatch):
    monkeypatch.setenv("COUNT_DIR", str(tmp_path))
    root = fedn_package(tmp_path / "proj" / "client")
    result = CliRunner().invoke(main, ["package", "seed", str(root)])
    assert result.exit_code == 0, result.output
    seed = tmp_path / "proj" / "seed.npz"
    assert result.output.strip() == (f"package 'fedn-package' build wrote ../seed.npz ({seed}; "
                                     "numpy-helper npz, 3 arrays, 52 bytes) in "
                                     f"{result.output.split(' in ')[-1].strip()}")
    assert encode(decode_npz(str(seed))) == encode(SEED)
    (root / "fedn.yaml").write_text(FEDN_YAML.replace("python model.py", "python -c pass"))
    result = CliRunner().invoke(main, ["package", "seed", str(root)])
    assert result.exit_code == 4 and "build ran but wrote no file in" in result.output
    (root / "fedn.yaml").write_text(FEDN_YAML.split("  startup")[0].replace(
        "build", "train"))
    result = CliRunner().invoke(main, ["package", "seed", str(root)])
    assert result.exit_code == 4 and "has no 'build' entry point" in result.output


def test_python_is_this_interpreter_for_a_package_without_python_env(tmp_path):
    package = load_package(fedn_package(tmp_path / "client"))
    assert package.argv("train", {"in_model": "a", "out_model": "b"}) == [
        sys.executable, "train.py", "a", "b"]
    assert json.loads(json.dumps(package.manifest.command("build"))) == ["python", "model.py"]


# ------------------------------------------------------------------------------ federation


@pytest.mark.integration
def test_a_federation_serves_a_fedn_package_and_a_broken_one_fails_only_its_task(
        ray_session, tracking_uri, fleet, tmp_path):
    """The config's ``package:`` is a FEDn folder; two clients download it, and a third
    runs a local copy whose train writes no -metadata: its task is settled as failed with
    one line, and the round commits the other two updates."""
    from fedray.deploy.config_file import config_from_dict
    from fedray.deploy.federation import Federation
    from fedray.deploy.seeds import load_seed, session_package
    from fedray.edge.workers import PackageWorker, RemotePackageWorker
    from fedray.storage import open_model_store
    from fedray.tracking.store import TrackingStore
    from tests.waiting import wait_connected

    seed = tmp_path / "seed.npz"
    np.savez_compressed(seed, **SEED)
    config = config_from_dict({
        "federation": "fedn-served", "seed_model": str(seed), "data_dir": str(tmp_path / "fed"),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 1, "host": "127.0.0.1", "base_port": 0,
                      "heartbeat_interval_s": 0.5},
        "tracking": {"database": "t_fedn_served"},
        "session": {"rounds": 1, "min_clients": 2, "round_timeout_s": 60, "validate": True,
                    "wait_for_clients_s": 60}})
    sha, archive, name = session_package(str(fedn_package(tmp_path / "client")), tmp_path)
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(load_seed(config.seed_model))
    broken = load_package(fedn_package(tmp_path / "broken", **{
        "train.py": TRAIN.replace('mode = settings.get("mode", "ok")', 'mode = "no_metadata"')}))
    fed = Federation(config, None, tracking_uri).deploy((sha, archive))
    try:
        for client, worker in [("site-a", RemotePackageWorker(cache_dir=tmp_path / "c-a")),
                               ("site-b", RemotePackageWorker(cache_dir=tmp_path / "c-b")),
                               ("broken", PackageWorker(broken))]:
            fleet.add(client, worker, fed.gateway)
        wait_connected(fleet, 3)
        session_id = fed.start_session(seed_id, sha, package_size=len(archive))
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()
    assert name == "fedn-package" and status["state"] == "finished", (status, fleet.lines)
    failed = [line for line in fleet.lines if "FAILED" in line]
    assert len(failed) == 1 and failed[0].startswith(
        "[broken] round 1 train FAILED: PackageError: package 'fedn-package' train: wrote no "), \
        fleet.lines
    assert "out.npz-metadata (expected JSON with 'num_examples'" in failed[0]
    assert sum("installed compute package 'fedn-package'" in line for line in fleet.lines) == 2
    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    try:
        (round_,) = tracking.find("rounds", {"session_id": session_id})
    finally:
        tracking.close()
    assert round_["status"] == "finished" and round_["updates"] == 2
    assert round_["combiners"]["combiner-0"]["failed"] == 1
    assert round_["train_metrics"]["loss"] == 0.5
    assert round_["validation_metrics"]["accuracy"] == pytest.approx(0.9)
    committed = decode(store.get(round_["model_id"]))
    for key, array in SEED.items():
        np.testing.assert_array_equal(committed[key], array + 1)


def test_a_python_env_yaml_pip_cannot_install_is_pips_line_naming_the_file(tmp_path,
                                                                          monkeypatch):
    from fedray.edge.workers import PackageWorker
    from fedray.errors import PythonEnvError

    make_wheel(tmp_path / "wheels")
    offline_pip(monkeypatch, tmp_path / "wheels")
    root = fedn_package(tmp_path / "client", **{
        "fedn.yaml": "python_env: python_env.yaml\n" + FEDN_YAML,
        "python_env.yaml": "name: .unbuildable\ndependencies:\n  - fedray-envprobe==9.9\n"})
    worker = PackageWorker(load_package(root), cache_dir=tmp_path / "cache")
    with pytest.raises(PythonEnvError) as err:
        worker.prepare(lambda line: None)
    assert str(err.value).splitlines()[0] == (
        "pip install for package 'unbuildable' from python_env.yaml failed: ERROR: No matching "
        "distribution found for fedray-envprobe==9.9")
