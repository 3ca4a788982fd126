"""How an edge client runs user code: a Python callback or a compute package.

Both take and give model bytes, so the connection loop does not care which one it has.
Callbacks get writable numpy copies and must return arrays with the same names; what they
return is checked here so that a mistake is reported at the client, with a clear message,
instead of as a rejected update at the combiner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedray.errors import ConfigError, FedrayError, PackageError
from fedray.packages.archive import is_sha256
from fedray.packages.env import RETRY_AFTER_S
from fedray.serialization import (
    Buffer,
    copy_model,
    decode,
    encode,
    serialized_in_place,
    writable_copy,
)

TrainFn = Callable[[dict[str, np.ndarray], dict[str, Any]], tuple[Mapping[str, np.ndarray], int, dict]]
ValidateFn = Callable[[dict[str, np.ndarray], dict[str, Any]], tuple[int, dict]]


class Worker(Protocol):
    """``model`` is the global model's bytes (read-only: the client caches them)."""

    def train(self, model: Buffer, config: dict[str, Any]) -> tuple[bytes, int, dict]: ...
    def validate(self, model: Buffer, config: dict[str, Any]) -> tuple[int, dict]: ...


class CallbackWorker:
    def __init__(self, train: TrainFn, validate: ValidateFn | None = None) -> None:
        if not callable(train):
            raise TypeError("train must be a callable (params, config) -> (params, n, metrics)")
        self._train = train
        self._validate = validate

    def train(self, model: Buffer, config: dict[str, Any]) -> tuple[Buffer, int, dict]:
        buf, params = writable_copy(model)
        result = self._train(params, dict(config))
        if not (isinstance(result, tuple) and len(result) == 3):
            raise FedrayError("train must return (params, num_examples, metrics)")
        new, examples, metrics = result
        if not isinstance(new, Mapping) or set(new) != set(params):
            raise FedrayError(f"train must return the same tensor names as it got: {sorted(params)[:5]}")
        data = serialized_in_place(buf, params, new)  # trained in place: already encoded
        if data is None:  # new arrays: encode them
            data = encode({k: np.asarray(v, dtype=params[k].dtype) for k, v in new.items()})
        return data, _count(examples), dict(metrics or {})

    def validate(self, model: Buffer, config: dict[str, Any]) -> tuple[int, dict]:
        if self._validate is None:
            raise FedrayError("this client has no validate function")
        result = self._validate(copy_model(decode(model)), dict(config))
        if not (isinstance(result, tuple) and len(result) == 2):
            raise FedrayError("validate must return (num_examples, metrics)")
        return _count(result[0]), dict(result[1] or {})


class PackageWorker:
    """Runs a compute package's entrypoints on files, with the client's data path.

    ``secrets`` (the client's token) are kept out of the package's environment, under
    whatever variable name they sit. A package with a ``python_env`` runs in its own venv,
    which ``prepare`` builds or finds (once per worker) before the first task; with
    ``use_env=False`` (``--no-env``) it runs in this environment instead.
    """

    def __init__(self, package, data: str = "", secrets: tuple[str, ...] = (),
                 use_env: bool = True, cache_dir: Path | None = None) -> None:
        self.package = package
        self.data = data
        self.secrets = secrets
        self.use_env = use_env
        self.cache_dir = cache_dir
        self._prepared = False
        self._failed: tuple[float, PackageError] | None = None

    def prepare(self, say: Callable[[str], None]) -> None:
        """Make the package's python env ready, then run its ``startup`` entrypoint (FEDn's:
        once per worker), blocking: call it from a worker thread.

        A failed build or startup is raised again, without running pip or the startup,
        for ``RETRY_AFTER_S``."""
        if self._prepared:
            return
        if self._failed is not None and time.monotonic() - self._failed[0] < RETRY_AFTER_S:
            raise self._failed[1]
        try:
            self._prepare(say)
        except PackageError as exc:
            self._failed = (time.monotonic(), exc)
            raise
        self._failed = None
        self._prepared = True

    def _prepare(self, say: Callable[[str], None]) -> None:
        manifest = self.package.manifest
        if manifest.python_env is not None and not self.use_env:
            say(f"package {manifest.name!r} declares a python_env; running it in this "
                "environment (--no-env)")
        elif manifest.python_env is not None and self.package.env is None:
            self.package = self.package.with_env(self.cache_dir, self.secrets, say)
        if self.package.is_fedn and manifest.has("startup"):
            started = time.monotonic()
            self.package.run_alone("startup", self.data, secrets=self.secrets)
            say(f"ran the startup entry point of package {manifest.name!r} in "
                f"{time.monotonic() - started:.1f}s")

    def train(self, model: Buffer, config: dict[str, Any]) -> tuple[bytes, int, dict]:
        return self.package.train(model, config, self.data, secrets=self.secrets)

    def validate(self, model: Buffer, config: dict[str, Any]) -> tuple[int, dict]:
        return self.package.validate(model, config, self.data, secrets=self.secrets)


class RemotePackageWorker:
    """Runs the compute package the federation serves, fetched and verified per session.

    The connection loop calls ``install`` with the task's package sha256 before the task
    runs; the package is downloaded once per sha256, checked against it, unpacked safely
    into the package cache, and reused while the federation keeps serving it. With
    ``pinned_sha256`` it installs and runs that package only: a federation (or whoever
    sits on a plaintext path to it) that serves another gets a refusal, not a download.
    """

    def __init__(self, data: str = "", cache_dir: Path | None = None,
                 pinned_sha256: str | None = None, secrets: tuple[str, ...] = (),
                 use_env: bool = True) -> None:
        if pinned_sha256 is not None and not is_sha256(pinned_sha256):
            raise ConfigError(f"pinned_sha256 {pinned_sha256!r} is not a sha256 "
                              "(64 lowercase hex characters)")
        self.data = data
        self.cache_dir = cache_dir
        self.pinned_sha256 = pinned_sha256
        self.secrets = secrets
        self.use_env = use_env
        self.sha256 = ""
        self._current: PackageWorker | None = None

    def allow(self, sha256: str) -> None:
        """Refuse a package this client is not pinned to, before it is downloaded."""
        if self.pinned_sha256 is not None and sha256 != self.pinned_sha256:
            raise PackageError(f"the federation serves package {sha256[:12]}, but this client "
                               f"is pinned to {self.pinned_sha256[:12]} (--package-sha256) "
                               "and runs nothing else")

    def install(self, sha256: str, archive: Path) -> str:
        from fedray.packages import load_package

        self.allow(sha256)
        package = load_package(archive, cache_dir=self.cache_dir, expected_sha256=sha256)
        self._current = PackageWorker(package, self.data, self.secrets, self.use_env,
                                      self.cache_dir)
        self.sha256 = sha256
        return package.manifest.name

    def prepare(self, say: Callable[[str], None]) -> None:
        if self._current is not None:
            self._current.prepare(say)

    def _worker(self) -> PackageWorker:
        if self._current is None:
            raise FedrayError("the federation serves no compute package; start this client "
                              "with --app MODULE or --package PATH")
        return self._current

    def train(self, model: Buffer, config: dict[str, Any]) -> tuple[bytes, int, dict]:
        return self._worker().train(model, config)

    def validate(self, model: Buffer, config: dict[str, Any]) -> tuple[int, dict]:
        return self._worker().validate(model, config)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise FedrayError(f"num_examples must be a positive integer, got {value!r}")
    return int(value)
