"""Committed models out and back in: `fedray models get` (checksum verified, as
safetensors, npz or through a framework module) and `seed_model: model:REF`, a session
that starts from a committed model."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from fedray.cli.main import main
from fedray.serialization import decode, encode
from fedray.storage import FileModelStore, open_model_store

MODEL = {"layer/0.w": np.arange(6, dtype=np.float32).reshape(2, 3),
         "file": np.array([1, 2], np.int64)}  # a name np.savez's keywords would clash with


def _import_keras(monkeypatch):
    """Keras 3 on the torch backend (what fedray[keras] installs), or skip."""
    pytest.importorskip("torch", reason="PyTorch is not installed: pip install 'fedray[keras]'")
    monkeypatch.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "torch"))
    return pytest.importorskip("keras", minversion="3",
                               reason="Keras 3 is not installed: pip install 'fedray[keras]'")


def _get(*args: str):
    return CliRunner().invoke(main, ["models", "get", *args])


@pytest.fixture
def stored(tmp_path) -> tuple[FileModelStore, str]:
    store = FileModelStore(tmp_path / "store")
    return store, store.put(encode(MODEL))


def test_a_model_by_id_is_its_very_bytes(stored, tmp_path):
    store, model_id = stored
    out = tmp_path / "m.safetensors"
    result = _get(model_id, "-o", str(out), "--storage", store.root.as_uri())
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == model_id
    assert f"model {model_id}" in result.output and "sha256 verified" in result.output


def test_npz_holds_the_same_arrays_for_numpy_alone(stored, tmp_path):
    store, model_id = stored
    out = tmp_path / "m.npz"
    assert _get(model_id, "-o", str(out), "--storage", store.root.as_uri()).exit_code == 0
    with np.load(out, allow_pickle=False) as loaded:
        assert sorted(loaded.files) == sorted(MODEL)
        for name, array in MODEL.items():
            np.testing.assert_array_equal(loaded[name], array)
            assert loaded[name].dtype == array.dtype


def test_a_corrupted_stored_model_is_refused_and_nothing_is_written(stored, tmp_path):
    store, model_id = stored
    path = store.path(model_id)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    out = tmp_path / "m.safetensors"
    result = _get(model_id, "-o", str(out), "--storage", store.root.as_uri())
    assert result.exit_code == 5, result.output
    assert "is corrupt" in result.output and result.output.count("\n") == 1
    assert not out.exists() and list(tmp_path.glob(".m*")) == []


def test_torch_and_keras_go_through_their_framework_module(stored, tmp_path, monkeypatch):
    import fedray.frameworks.formats as formats

    store, model_id = stored
    real = formats.importlib.import_module

    def missing(name, *args):
        if name.startswith("fedray.frameworks"):
            raise ModuleNotFoundError(f"No module named {name!r}", name="fedray.frameworks")
        return real(name, *args)

    monkeypatch.setattr(formats.importlib, "import_module", missing)
    result = _get(model_id, "-o", str(tmp_path / "m.pt"), "--format", "torch", "--storage",
                  store.root.as_uri())
    assert (result.exit_code, result.output) == (
        2, "fedray: error: --format torch: this fedray has no fedray.frameworks.torch; use "
           "--format safetensors or npz\n")
    monkeypatch.setattr(formats.importlib, "import_module", real)

    saved = {}
    fake = types.ModuleType("fedray.frameworks.keras")
    fake.save_model_file = lambda arrays, path, build: (saved.update(arrays),
                                                        path.write_bytes(b"k"))
    monkeypatch.setitem(sys.modules, "fedray.frameworks.keras", fake)
    out = tmp_path / "m.keras"
    result = _get(model_id, "-o", str(out), "--format", "keras", "--storage",
                  store.root.as_uri())
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b"k" and sorted(saved) == sorted(MODEL)


@pytest.mark.parametrize("fmt, hidden, line", [
    ("torch", "torch", "fedray: error: --format torch needs PyTorch: pip install 'fedray[torch]'"),
    ("keras", "keras", "fedray: error: --format keras needs Keras 3 with PyTorch: "
                       "pip install 'fedray[keras]'"),
    ("keras", "torch", "fedray: error: --format keras needs Keras 3 with PyTorch: "
                       "pip install 'fedray[keras]'"),
])
def test_a_missing_framework_is_one_line_naming_the_extra(stored, tmp_path, fmt, hidden, line):
    store, model_id = stored
    out = tmp_path / f"m.{'keras' if fmt == 'keras' else 'safetensors'}"
    block = f"import sys; sys.modules[{hidden!r}] = None; "  # as if it were not installed
    result = subprocess.run(
        [sys.executable, "-c", block + "from fedray.cli.main import main; main()", "models", "get",
         model_id, "-o", str(out), "--format", fmt, "--storage", store.root.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, line + "\n"), result.stdout
    assert not out.exists()


@pytest.mark.parametrize("name", ["m.keras", "m.pt", "m.pth", "M.PT"])
def test_a_framework_suffix_without_format_is_refused_not_written_as_safetensors(
        stored, tmp_path, name):
    store, model_id = stored
    out = tmp_path / name
    result = _get(model_id, "-o", str(out), "--storage", store.root.as_uri())
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "--format" in result.output and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["-o", "m.keras"], "--format keras needs --model"),
    (["-o", "m.h5", "--model", "examples.digits_keras.client.model:build_model"],
     "Keras saves whole models to a .keras file; name it m.keras"),
])
def test_keras_refuses_what_it_cannot_write_before_fetching(stored, tmp_path, monkeypatch,
                                                            args, message):
    _import_keras(monkeypatch)
    store, model_id = stored

    def fetched(self, model_id):
        raise AssertionError("the model was fetched before the refusal")

    monkeypatch.setattr(FileModelStore, "get", fetched)
    monkeypatch.chdir(tmp_path)
    result = _get(model_id, "--format", "keras", "--storage", store.root.as_uri(), *args)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert message in result.output and list(tmp_path.glob("m*")) == []


def test_a_reference_that_names_no_model_is_a_usage_error(tmp_path):
    result = _get("not-an-id", "-o", str(tmp_path / "m"), "--tracking",
                  "mongodb://127.0.0.1:1/x")
    assert result.exit_code == 2 and "is not a model id" in result.output, result.output


# ------------------------------------------------------------------------------ federation


class AddOne:
    def __init__(self, step: float) -> None:
        self.step = step

    def train(self, model, config):
        return encode({k: v + self.step for k, v in decode(model).items()}), 10, {}

    def validate(self, model, config):
        return 10, {}


@pytest.mark.integration
def test_a_session_starts_from_a_committed_model_and_models_get_fetches_the_latest(
        ray_session, tracking_uri, fleet, tmp_path):
    from fedray.deploy.config_file import config_from_dict
    from fedray.deploy.runner import run_federation
    from fedray.deploy.seeds import resolve_seed
    from fedray.tracking.store import TrackingStore

    seed_file = tmp_path / "seed.safetensors"
    seed_file.write_bytes(encode({"w": np.zeros(4, np.float32)}))
    database = "t_models_seed"

    def run(seed_model: str, names: list[str]):
        config = config_from_dict({
            "federation": "models-seed", "seed_model": seed_model,
            "data_dir": str(tmp_path / "fed"),
            "controller": {"host": "127.0.0.1", "port": 0},
            "combiners": {"count": 1, "host": "127.0.0.1", "base_port": 0,
                          "heartbeat_interval_s": 0.5},
            "tracking": {"uri": tracking_uri, "database": database},
            "session": {"rounds": 1, "min_clients": 2, "round_timeout_s": 30,
                        "validate": False, "wait_for_clients_s": 30},
        })

        def ready(gateway: str) -> None:
            for i, name in enumerate(names):
                fleet.add(name, AddOne(1.0 + i), gateway)

        try:
            result = run_federation(config, console=Console(file=io.StringIO()),
                                    on_ready=ready)
        finally:
            for name in names:
                fleet.stop(name)
        assert result.ok, result.status
        return config, result.status

    _, first = run(str(seed_file), ["a-1", "a-2"])
    committed = first["model_id"]
    config, second = run(f"model:{committed}", ["b-1", "b-2"])

    tracking = TrackingStore.from_uri(tracking_uri, database)
    try:
        session = tracking.get_session(second["session_id"])
        (round_,) = tracking.find("rounds", {"session_id": second["session_id"]})
        trail = tracking.find("models", {"session_id": second["session_id"]})
    finally:
        tracking.close()
    assert session["seed_model_id"] == committed
    assert round_["parent_model_id"] == committed and round_["model_id"] == second["model_id"]
    assert [(m["round"], m["parent_id"]) for m in trail] == [(1, committed)]
    store = open_model_store("file", tmp_path / "fed")
    np.testing.assert_allclose(decode(store.get(second["model_id"]))["w"], 3.0)  # 1.5 twice

    uri = f"{tracking_uri.rstrip('/')}/{database}"
    out = tmp_path / "m.safetensors"
    result = _get("latest", "-o", str(out), "--tracking", uri)
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == second["model_id"]
    result = _get("latest", "--session", first["session_id"][:8], "-o", str(out),
                  "--tracking", uri)
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == committed
    assert resolve_seed(tracking_uri, config, "latest") == second["model_id"]
    assert resolve_seed(tracking_uri, config, committed[:8]) == committed


def test_seed_model_names_a_committed_model_by_id_or_reference(stored):
    from fedray.deploy.seeds import committed_seed_ref, load_seed
    from fedray.errors import ConfigError, StorageError

    store, model_id = stored
    assert [committed_seed_ref(s) for s in ("model:latest", "model:ABCDEF12", "model:init",
                                            "pkg.mod:model", "model:abc")] == \
        ["latest", "abcdef12", None, None, None]  # model:NAME is still a module:function
    assert load_seed(f"model:{model_id}", store) == store.get(model_id)
    assert load_seed(f"model:{model_id[:8]}", store, lambda ref: model_id) == store.get(model_id)
    with pytest.raises(ConfigError, match="seed_model: model:latest needs tracking"):
        load_seed("model:latest", store)
    with pytest.raises(ConfigError, match=f"seed_model: model:{'0' * 64}: no model"):
        load_seed(f"model:{'0' * 64}", store)
    path = store.path(model_id)
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(StorageError, match="is corrupt"):
        load_seed(f"model:{model_id}", store)


def test_a_torch_model_comes_out_loadable_and_bit_exact(tmp_path):
    pytest.importorskip("torch", reason="PyTorch is not installed: pip install 'fedray[torch]'")
    from examples.digits_torch.client.model import build_model
    from fedray.frameworks.formats import writer
    from fedray.frameworks.torch import get_arrays, load_model_file
    from fedray.serialization import encode

    arrays = get_arrays(build_model(seed=3))
    out = tmp_path / "m.safetensors"
    writer("torch", lambda: build_model(seed=0))(encode(arrays), out)
    fresh = build_model(seed=7)
    load_model_file(fresh, out)
    for name, value in get_arrays(fresh).items():
        assert value.dtype == arrays[name].dtype and value.tobytes() == arrays[name].tobytes()


def test_a_keras_model_comes_out_as_a_whole_keras_file(tmp_path, monkeypatch):
    keras = _import_keras(monkeypatch)

    from examples.digits_keras.client.model import build_model
    from fedray.errors import ConfigError
    from fedray.frameworks.formats import writer
    from fedray.frameworks.keras import get_arrays
    from fedray.serialization import encode

    arrays = get_arrays(build_model(seed=3))
    out = tmp_path / "m.keras"
    writer("keras", lambda: build_model(seed=0))(encode(arrays), out)
    loaded = keras.models.load_model(out)  # no fedray needed to read it
    for name, value in get_arrays(loaded).items():
        np.testing.assert_array_equal(value, arrays[name])
    with pytest.raises(ConfigError, match="needs --model"):
        writer("keras")(encode(arrays), tmp_path / "x.keras")
