"""The model store interface: content-addressed bytes, keyed by their sha256.

Every backend (a local folder now, S3/MinIO later) implements the same four methods, so
the controller, the combiners and the CLI never care where model bytes live. A model id
is the sha256 hex digest of the bytes: writes are idempotent, reads are verified, and an
id is validated before it is turned into a path or an object key, so a crafted id can
never name anything outside the store.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod

from fedray.errors import StorageError

ModelBytes = bytes | bytearray | memoryview

_MODEL_ID = re.compile(r"[0-9a-f]{64}")
LATEST = "latest"
MIN_PREFIX = 6
_MODEL_REF = re.compile(f"[0-9a-f]{{{MIN_PREFIX},64}}")


def is_model_ref(ref: str) -> bool:
    """How a person names a committed model: ``latest``, an id, or a prefix of one (6 or
    more lowercase hex characters); tracking resolves all but a full id."""
    return ref == LATEST or _MODEL_REF.fullmatch(ref) is not None


def check_model_id(model_id: object) -> str:
    """Return ``model_id`` if it is 64 lowercase hex characters, else raise StorageError."""
    if not isinstance(model_id, str) or _MODEL_ID.fullmatch(model_id) is None:
        raise StorageError(
            f"invalid model id {model_id!r}: expected a sha256 hex digest "
            "(64 lowercase hex characters)"
        )
    return model_id


def sha256_hex(data: ModelBytes) -> str:
    """The model id of ``data`` (works on any contiguous buffer without copying it)."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return hashlib.sha256(view).hexdigest()


class ModelStore(ABC):
    """Content-addressed storage for serialized models (safetensors bytes)."""

    @abstractmethod
    def put(self, data: ModelBytes) -> str:
        """Store ``data`` and return its model id; storing the same bytes again is a no-op."""

    @abstractmethod
    def get(self, model_id: str) -> bytes:
        """Return the bytes of ``model_id``, verified against the id.

        Raises StorageError when the id is invalid, the model is missing, or the stored
        bytes do not hash to the id.
        """

    @abstractmethod
    def exists(self, model_id: str) -> bool:
        """Whether ``model_id`` is stored (without reading or verifying it)."""

    @abstractmethod
    def uri(self, model_id: str) -> str:
        """Where ``model_id`` lives (or would live), as recorded in tracking."""

    def verify(self, model_id: str, data: ModelBytes) -> bytes:
        """Return ``data`` as bytes if it hashes to ``model_id``, else raise StorageError."""
        actual = sha256_hex(data)
        if actual != model_id:
            raise StorageError(
                f"model {model_id} in {self.uri(model_id)} is corrupt: its bytes hash to {actual}"
            )
        return data if isinstance(data, bytes) else bytes(data)
