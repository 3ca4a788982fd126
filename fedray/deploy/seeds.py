"""What a session starts from: the seed model and the compute package, checked before
anything starts.

``seed_model`` is a ``.safetensors`` file, an ``.npz`` (FEDn's numpy-helper ``seed.npz``:
its arrays keep their keys ``"0"``, ``"1"``, ... as names), a ``module:function`` returning
arrays, or ``model:REF`` (a committed model: an id, a prefix of one, or ``latest``, looked
up in tracking); ``package`` a compute package folder or ``.tgz`` (fedray's or FEDn's),
refused now if unsafe.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from fedray.config import FederationConfig
from fedray.errors import ConfigError, SerializationError
from fedray.serialization import decode_npz, encode, read_layout
from fedray.storage.base import ModelStore, is_model_ref

MODEL_SEED = "model:"


def committed_seed_ref(spec: str) -> str | None:
    """The model reference of ``seed_model: model:REF`` (an id, a prefix of 6+ hex
    characters, or ``latest``), else None (``model:name`` stays a module:function)."""
    if not spec.startswith(MODEL_SEED):
        return None
    ref = spec[len(MODEL_SEED):].strip().lower()
    return ref if is_model_ref(ref) else None


def load_seed(spec: str, store: ModelStore | None = None,
              resolve: Callable[[str], str] | None = None) -> bytes:
    """Seed model bytes from a ``.safetensors`` file, a ``module:function`` returning arrays,
    or ``model:REF``, a committed model in ``store`` (``resolve`` turns ``latest`` or an id
    prefix into an id, through tracking)."""
    ref = committed_seed_ref(spec)
    if ref is not None:
        return _committed_seed(spec, ref, store, resolve)
    path = Path(spec)
    if path.suffix == ".npz":
        try:
            return encode(decode_npz(str(path)))
        except SerializationError as exc:
            raise ConfigError(f"seed_model: {spec}: {exc}") from None
    if path.suffix == ".safetensors" or path.exists():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"seed_model: cannot read {spec} ({exc.strerror})") from None
        try:
            read_layout(data)
        except SerializationError as exc:
            raise ConfigError(f"seed_model: {spec} is not a safetensors model ({exc})") from None
        return data
    if ":" not in spec:
        raise ConfigError(f"seed_model: {spec!r} is neither a .safetensors or .npz file nor "
                          "module:function")
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        return encode(factory())
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"seed_model: cannot load {spec!r} ({exc})") from None


def _committed_seed(spec: str, ref: str, store: ModelStore | None,
                    resolve: Callable[[str], str] | None) -> bytes:
    if store is None:
        raise ConfigError(f"seed_model: {spec} needs the federation's model store")
    if len(ref) != 64:
        if resolve is None:
            raise ConfigError(f"seed_model: {spec} needs tracking to find that model")
        ref = resolve(ref)
    if not store.exists(ref):
        raise ConfigError(f"seed_model: {spec}: no model {ref} in {store.uri(ref)}")
    return store.get(ref)  # checks the bytes against the id: StorageError if corrupt


def resolve_seed(tracking_uri: str, config: FederationConfig, ref: str) -> str:
    """``latest`` (this federation's) or an id prefix, as a model id from tracking."""
    from fedray.tracking.models import resolve_model
    from fedray.tracking.store import TrackingStore

    store = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    try:
        return resolve_model(store, ref, federation=config.federation,
                             what=f"{config.source}: seed_model: model:{ref}").model_id
    finally:
        store.close()


def session_package(spec: str | None, data_dir: Path) -> tuple[str, bytes, str] | None:
    """The config's compute package as (sha256, .tgz bytes, name), checked before serving."""
    if not spec:
        return None
    from fedray.packages import build_package, load_package, sha256_file

    src = Path(spec)
    if src.is_dir():
        archive = data_dir / "packages" / f"{src.resolve().name}.tgz"
        archive.parent.mkdir(parents=True, exist_ok=True)
        sha = build_package(src, archive)
    elif src.is_file():
        archive, sha = src, sha256_file(src)
    else:
        raise ConfigError(f"package: {spec} is neither a folder nor a .tgz file")
    package = load_package(archive, expected_sha256=sha)  # refuses unsafe archives now
    return sha, archive.read_bytes(), package.manifest.name
