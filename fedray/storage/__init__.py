"""Model stores: where committed models live, addressed by the sha256 of their bytes.

``open_model_store`` turns the ``storage.uri`` config value into a store: ``file`` (the
default, ``<data_dir>/models``), ``file:///absolute/path``, or
``s3://BUCKET?endpoint=HOST:PORT&secure=false`` (S3/MinIO, see ``fedray.storage.s3``; imported
only when used, so the edge side never loads minio).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from fedray.errors import ConfigError
from fedray.storage.base import ModelBytes, ModelStore, check_model_id, sha256_hex
from fedray.storage.file import FileModelStore

__all__ = [
    "FileModelStore",
    "ModelBytes",
    "ModelStore",
    "check_model_id",
    "open_model_store",
    "sha256_hex",
]


def open_model_store(uri: str, data_dir: Path) -> ModelStore:
    """The model store named by ``uri`` (the ``storage.uri`` config field)."""
    uri = (uri or "file").strip()
    if uri == "file":
        return FileModelStore(Path(data_dir) / "models")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = unquote(parsed.path)
        if parsed.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ConfigError(
                f"storage.uri: {uri!r} is not an absolute file URI; "
                "use 'file' or 'file:///absolute/path'"
            )
        return FileModelStore(Path(path))
    if parsed.scheme == "s3":
        from fedray.storage.s3 import S3ModelStore

        return S3ModelStore.from_uri(uri)
    raise ConfigError(
        f"storage.uri: unsupported model store {uri.split('?', 1)[0]!r}; use 'file', "
        "'file:///absolute/path' or 's3://BUCKET?endpoint=HOST:PORT'"
    )
