"""Model store contract tests, run against every store implementation.

The ``store_case`` fixture is parametrized by backend: a new store (S3/MinIO) joins by
adding a parameter that yields a ``StoreCase`` with its store and a way to damage a
stored model behind the store's back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedray.errors import ConfigError, StorageError
from fedray.serialization import encode
from fedray.storage import FileModelStore, ModelStore, open_model_store


@dataclass
class StoreCase:
    store: ModelStore
    corrupt: Callable[[str], None]  # damage the stored bytes of a model id


def _flip_first_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(params=["file"])
def store_case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreCase]:
    if request.param == "file":
        store = FileModelStore(tmp_path / "models")
        yield StoreCase(store, lambda model_id: _flip_first_byte(store.path(model_id)))


@pytest.fixture
def store(store_case: StoreCase) -> ModelStore:
    return store_case.store


def _model_bytes(seed: int = 0, size: int = 1000) -> bytes:
    rng = np.random.default_rng(seed)
    return encode({"w": rng.standard_normal(size).astype(np.float32), "b": np.arange(3)})


def test_round_trip(store: ModelStore) -> None:
    data = _model_bytes()

    model_id = store.put(data)

    assert model_id == hashlib.sha256(data).hexdigest()
    assert store.exists(model_id)
    assert store.get(model_id) == data
    assert model_id in store.uri(model_id)


def test_put_accepts_buffers(store: ModelStore) -> None:
    data = _model_bytes(1)

    ids = {store.put(memoryview(data)), store.put(bytearray(data))}

    assert ids == {hashlib.sha256(data).hexdigest()}
    assert store.get(ids.pop()) == data


def test_put_is_idempotent(store: ModelStore) -> None:
    data = _model_bytes(2)

    first = store.put(data)
    second = store.put(data)

    assert first == second
    assert store.get(first) == data


def test_corrupt_model_is_detected_on_get(store_case: StoreCase) -> None:
    model_id = store_case.store.put(_model_bytes(3))
    store_case.corrupt(model_id)

    with pytest.raises(StorageError, match="corrupt"):
        store_case.store.get(model_id)


def test_missing_model(store: ModelStore) -> None:
    model_id = hashlib.sha256(b"never stored").hexdigest()

    assert not store.exists(model_id)
    with pytest.raises(StorageError, match="not found"):
        store.get(model_id)


@pytest.mark.parametrize(
    "bad_id",
    [
        "../../../etc/passwd",
        "0" * 63,
        "0" * 65,
        "A" * 64,
        "g" * 64,
        "/" + "0" * 63,
        "00/../" + "0" * 58,
        "",
        None,
    ],
)
def test_bad_model_id_is_rejected(store: ModelStore, bad_id: str) -> None:
    for call in (store.get, store.exists, store.uri):
        with pytest.raises(StorageError, match="invalid model id"):
            call(bad_id)


def test_concurrent_puts_of_the_same_bytes(store: ModelStore) -> None:
    data = _model_bytes(4, size=1_000_000)

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = set(pool.map(lambda _: store.put(data), range(16)))

    assert ids == {hashlib.sha256(data).hexdigest()}
    assert store.get(ids.pop()) == data


# file store specifics


def test_file_layout_and_no_leftovers(tmp_path: Path) -> None:
    store = FileModelStore(tmp_path)
    data = _model_bytes(5)

    model_id = store.put(data)

    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()] == [
        Path(model_id[:2]) / f"{model_id}.safetensors"
    ]
    assert store.uri(model_id) == (tmp_path / model_id[:2] / f"{model_id}.safetensors").as_uri()


def test_file_put_repairs_a_corrupt_copy(tmp_path: Path) -> None:
    store = FileModelStore(tmp_path)
    data = _model_bytes(6)
    model_id = store.put(data)
    _flip_first_byte(store.path(model_id))

    assert store.put(data) == model_id

    assert store.get(model_id) == data


def test_open_model_store_default_and_file_uri(tmp_path: Path) -> None:
    default = open_model_store("file", tmp_path)
    explicit = open_model_store((tmp_path / "elsewhere").as_uri(), tmp_path)

    assert isinstance(default, FileModelStore)
    assert default.root == (tmp_path / "models").resolve()
    assert isinstance(explicit, FileModelStore)
    assert explicit.root == (tmp_path / "elsewhere").resolve()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://fedray-models?endpoint=localhost:9000", "S3 model stores are not supported yet"),
        ("file://relative/path", "not an absolute file URI"),
        ("ftp://host/models", "unsupported model store"),
    ],
)
def test_open_model_store_rejects(tmp_path: Path, uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        open_model_store(uri, tmp_path)

    assert "storage.uri" in str(info.value)
