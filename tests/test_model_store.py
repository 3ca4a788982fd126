"""Model store contract tests, run against every store implementation.

The ``store_case`` fixture is parametrized by backend (a local folder, and S3 on a real
SeaweedFS started once per session by ``tests/conftest.py``, one bucket per test): each
yields a ``StoreCase`` with its store and a way to damage a stored model behind the
store's back. S3 specifics (metadata, keys, dead endpoints, multipart) follow at the end.
"""

from __future__ import annotations

import hashlib
import io
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedray.errors import ConfigError, StorageError
from fedray.serialization import encode
from fedray.storage import FileModelStore, ModelStore, open_model_store
from fedray.storage.s3 import S3ModelStore


@dataclass
class StoreCase:
    store: ModelStore
    corrupt: Callable[[str], None]  # damage the stored bytes of a model id


def _flip_first_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def _overwrite_object(s3, store: S3ModelStore, model_id: str) -> None:
    """Replace the object's bytes behind the store's back, keeping its sha256 metadata."""
    key = store.key(model_id)
    data = bytearray(s3.client().get_object(store.bucket, key).read())
    data[0] ^= 0xFF
    s3.client().put_object(store.bucket, key, io.BytesIO(bytes(data)), len(data),
                           metadata={"sha256": model_id})


@pytest.fixture(params=["file", "s3"])
def store_case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreCase]:
    if request.param == "file":
        store = FileModelStore(tmp_path / "models")
        yield StoreCase(store, lambda model_id: _flip_first_byte(store.path(model_id)))
    else:
        s3 = request.getfixturevalue("seaweedfs")
        s3_store = S3ModelStore.from_uri(s3.uri(s3.new_bucket()))
        yield StoreCase(s3_store, lambda model_id: _overwrite_object(s3, s3_store, model_id))


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
        ("file://relative/path", "not an absolute file URI"),
        ("s3://?endpoint=localhost:9000", "not a valid bucket name"),
        ("s3://Bad_Bucket?endpoint=localhost:9000", "not a valid bucket name"),
        ("s3://models?endpoint=localhost:9000&secure=maybe", "secure must be true or false"),
        ("s3://models?endpoint=localhost:9000&colour=blue", "unknown parameter 'colour'"),
        ("s3://models?endpoint=localhost:9000&access_key=k", "must be given together"),
        ("s3://models?endpoint=https://h:9000&secure=false", "contradicts secure=false"),
        ("s3://models/p?endpoint=h:9000&prefix=q", "either as a path or as prefix="),
        ("s3://k:s@models?endpoint=h:9000", "not before '@'"),
        ("ftp://host/models", "unsupported model store"),
    ],
)
def test_open_model_store_rejects(tmp_path: Path, uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        open_model_store(uri, tmp_path)

    assert "storage.uri" in str(info.value)


# S3 specifics (a real SeaweedFS)


@pytest.fixture
def s3_store(seaweedfs) -> S3ModelStore:
    return S3ModelStore.from_uri(seaweedfs.uri(seaweedfs.new_bucket()))


def test_s3_object_name_uri_and_sha256_metadata(seaweedfs, s3_store: S3ModelStore) -> None:
    data = _model_bytes(7)

    model_id = s3_store.put(data)

    key = f"models/{model_id[:2]}/{model_id}.safetensors"
    assert s3_store.uri(model_id) == f"s3://{s3_store.bucket}/{key}"
    stat = seaweedfs.client().stat_object(s3_store.bucket, key)
    assert stat.metadata["x-amz-meta-sha256"] == model_id
    assert stat.size == len(data)


def test_s3_prefix_and_keys_from_the_environment(seaweedfs, monkeypatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MINIO_ROOT_USER", seaweedfs.access_key)
    monkeypatch.setenv("MINIO_ROOT_PASSWORD", seaweedfs.secret_key)
    bucket = seaweedfs.new_bucket()

    store = open_model_store(seaweedfs.uri(bucket, keys=False, prefix="runs/a"), tmp_path)
    model_id = store.put(_model_bytes(8))

    assert isinstance(store, S3ModelStore)
    assert store.uri(model_id) == f"s3://{bucket}/runs/a/models/{model_id[:2]}/{model_id}.safetensors"
    names = [o.object_name for o in seaweedfs.client().list_objects(bucket, recursive=True)]
    assert names == [f"runs/a/models/{model_id[:2]}/{model_id}.safetensors"]


def test_s3_keys_stay_out_of_repr_and_messages(seaweedfs) -> None:
    store = S3ModelStore.from_uri(seaweedfs.uri(seaweedfs.new_bucket(), secret_key="wrong"))

    with pytest.raises(StorageError) as info:
        store.put(_model_bytes(9))

    assert "wrong" not in repr(store) and seaweedfs.access_key not in repr(store)
    assert "SignatureDoesNotMatch" in str(info.value) and "check the keys" in str(info.value)
    assert "wrong" not in str(info.value)


def test_s3_unknown_access_key_is_a_storage_error(seaweedfs) -> None:
    store = S3ModelStore.from_uri(
        seaweedfs.uri(seaweedfs.new_bucket(), access_key="nobody", secret_key="nothing"))

    for call in (lambda: store.put(_model_bytes(10)), lambda: store.get("0" * 64),
                 lambda: store.exists("0" * 64)):
        with pytest.raises(StorageError, match="check the keys"):
            call()


def test_s3_unreachable_endpoint_fails_within_seconds() -> None:
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3ModelStore.from_uri(f"s3://models?endpoint=127.0.0.1:{port}&secure=false"
                                  "&access_key=k&secret_key=s")

    started = time.monotonic()
    with pytest.raises(StorageError, match=f"127.0.0.1:{port} is unreachable"):
        store.put(_model_bytes(11))

    assert time.monotonic() - started < 10


def test_s3_put_skips_an_object_that_is_already_there(s3_store: S3ModelStore, monkeypatch) -> None:
    data = _model_bytes(12)
    model_id = s3_store.put(data)
    uploads = []
    monkeypatch.setattr(s3_store.client, "put_object", lambda *a, **k: uploads.append(a))

    assert s3_store.put(data) == model_id

    assert uploads == []


def test_s3_object_without_the_sha256_metadata_is_rewritten(seaweedfs, s3_store) -> None:
    data = _model_bytes(13)
    model_id = hashlib.sha256(data).hexdigest()
    s3_store.put(b"\0")  # creates the bucket
    seaweedfs.client().put_object(s3_store.bucket, s3_store.key(model_id), io.BytesIO(b"junk"), 4)

    assert s3_store.put(data) == model_id

    assert s3_store.get(model_id) == data


def test_s3_multipart_round_trip_of_a_20_mb_model(seaweedfs, s3_store: S3ModelStore) -> None:
    data = _model_bytes(14, size=5_000_000)  # 20 MB of float32: two 16 MiB parts
    assert len(data) > 20_000_000

    model_id = s3_store.put(memoryview(data))

    stat = seaweedfs.client().stat_object(s3_store.bucket, s3_store.key(model_id))
    assert stat.etag.endswith("-2")  # a multipart ETag, not an MD5 of the content
    assert stat.metadata["x-amz-meta-sha256"] == model_id
    assert s3_store.get(model_id) == data
