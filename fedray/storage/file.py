"""A model store in a local folder: ``root/<id[:2]>/<id>.safetensors``.

This is the default store, under the federation's data directory. Writes go to a
uniquely named temporary file in the target folder, are fsynced, then atomically renamed
into place (and the folder is fsynced), so a reader never sees a partial model and any
number of processes may put the same model at once: they all rename identical bytes onto
the same name. Reads hash the file and refuse bytes that do not match their id.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from fedray.errors import StorageError
from fedray.storage.base import ModelBytes, ModelStore, check_model_id, sha256_hex

SUFFIX = ".safetensors"


class FileModelStore(ModelStore):
    """Content-addressed model bytes in a folder on the local file system."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create model store folder {self.root}: {exc}") from exc

    def __repr__(self) -> str:
        return f"FileModelStore({str(self.root)!r})"

    def path(self, model_id: str) -> Path:
        """The file that holds ``model_id`` (validated, always inside ``root``)."""
        check_model_id(model_id)
        return self.root / model_id[:2] / f"{model_id}{SUFFIX}"

    def put(self, data: ModelBytes) -> str:
        model_id = sha256_hex(data)
        target = self.path(model_id)
        if self._holds(target, model_id, memoryview(data).nbytes):
            return model_id
        tmp = target.parent / f".{model_id}.{uuid.uuid4().hex}.tmp"
        try:
            target.parent.mkdir(exist_ok=True)
            with open(tmp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageError(f"cannot write model {model_id} to {target}: {exc}") from exc
        return model_id

    def get(self, model_id: str) -> bytes:
        target = self.path(model_id)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise StorageError(f"model {model_id} not found in {self.root}") from None
        except OSError as exc:
            raise StorageError(f"cannot read model {model_id} from {target}: {exc}") from exc
        return self.verify(model_id, data)

    def exists(self, model_id: str) -> bool:
        return self.path(model_id).is_file()

    def uri(self, model_id: str) -> str:
        return self.path(model_id).as_uri()

    def _holds(self, target: Path, model_id: str, size: int) -> bool:
        """Whether ``target`` already holds intact bytes for ``model_id`` (so put can skip)."""
        try:
            if target.stat().st_size != size:
                return False
            return sha256_hex(target.read_bytes()) == model_id
        except OSError:
            return False


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (best effort where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
