"""Running a compute package's entrypoints on model files, and loading packages.

Commands are split with shlex and placeholders substituted per argument, never through a
shell; a leading ``python`` is this interpreter, or the package's own venv when its
manifest declares a ``python_env`` (``Package.with_env``, see ``fedray.packages.env``).
They run in the package directory with a timeout, in this process's environment minus the
client's token (the package is the federation's code, not the site's); a failure raises
``PackageError`` with the exit code and the tail of stderr. A FEDn package (``fedn.yaml``)
keeps FEDn's calling convention and files; ``fedray.packages.fedn`` converts at the edge.
This module runs on edge machines: it must never import ray, pymongo or minio.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from fedray.errors import PackageError, SerializationError
from fedray.packages import fedn
from fedray.packages.archive import sha256_file, unpack_package
from fedray.packages.env import PackageEnv, Say, ensure_env
from fedray.packages.manifest import (
    _PLACEHOLDER_RE,
    MAX_TOTAL_BYTES,
    STDERR_TAIL_LINES,
    Manifest,
)
from fedray.serialization import Buffer, read_layout

SECRET_ENV = ("FEDRAY_TOKEN",)  # never passed on to a package


def child_env(data: str, secrets: Collection[str] = ()) -> dict[str, str]:
    """The environment an entrypoint runs in: ours, without ``SECRET_ENV`` and without any
    variable that holds one of ``secrets`` (a token kept under another name)."""
    hidden = {value for value in secrets if value}
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV and v not in hidden}
    return env | {"PYTHONDONTWRITEBYTECODE": "1", "FEDRAY_DATA": data}


def default_cache_dir() -> Path:
    if env := os.environ.get("FEDRAY_PACKAGE_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedray" / "packages"


def load_package(
    path: Path | str,
    cache_dir: Path | str | None = None,
    expected_sha256: str | None = None,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> Package:
    """A package from a directory, or from a ``.tgz`` unpacked once per sha256 into a cache.

    A cache entry is trusted once written: only ``unpack_package`` creates it, atomically.
    """
    path = Path(path)
    if path.is_dir():
        return Package(path.resolve(), fedn.read_package_manifest(path))
    if not path.is_file():
        raise PackageError(f"{path}: no such package (a directory or .tgz is expected)")
    sha = sha256_file(path)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise PackageError(f"{path}: checksum mismatch (expected {expected_sha256}, got {sha})")
    dest = Path(cache_dir if cache_dir is not None else default_cache_dir()) / sha
    if not dest.is_dir():
        try:
            unpack_package(path, dest, max_total_bytes=max_total_bytes)
        except PackageError:
            if not dest.is_dir():  # else a concurrent unpack of it won
                raise
    root = fedn.package_root(dest)
    return Package(root, fedn.read_package_manifest(root), sha)


@dataclass(frozen=True, slots=True)
class Package:
    """An unpacked package; ``train``/``validate`` run its entrypoints in a temp dir."""

    root: Path
    manifest: Manifest
    sha256: str | None = None
    env: PackageEnv | None = None  # the venv its entrypoints run in (with_env)

    @property
    def identity(self) -> str:
        """What its python env is built for: the archive's sha256, or the local folder."""
        return self.sha256 or f"dir:{self.root}"

    def with_env(self, cache_dir: Path | str | None = None, secrets: Collection[str] = (),
                 say: Say = lambda line: None) -> Package:
        """This package running in its ``python_env``'s venv, built first if needed (a
        package without one is returned as it is)."""
        spec = self.manifest.python_env
        if spec is None or self.env is not None:
            return self
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        label = f"package {self.manifest.name!r}" + \
            (f" from {spec.requirements_file}" if self.is_fedn and spec.requirements_file else "")
        env = ensure_env(self.identity, spec.requirements, cache, label=label, cwd=self.root,
                         environ=child_env("", secrets), say=say)
        return replace(self, env=env)

    @property
    def is_fedn(self) -> bool:
        return self.manifest.format == fedn.FEDN

    def train(
        self, model_bytes: Buffer, config: Mapping, data: str, timeout_s: float | None = None,
        secrets: Collection[str] = (),
    ) -> tuple[bytes, int, dict]:
        """Run ``train``; returns (new model bytes, num_examples, metrics)."""
        with tempfile.TemporaryDirectory(prefix="fedray-train-") as tmp:
            work = Path(tmp)
            if self.is_fedn:  # FEDn's convention: npz files and -metadata beside them
                where = f"package {self.manifest.name!r} train"
                values = fedn.write_inputs(work, model_bytes, config, where)
                self.run("train", values | {"data": data or ""}, work, timeout_s, secrets)
                return fedn.read_update(work, model_bytes, where)
            num_examples, metrics = self._call("train", work, model_bytes, config, data,
                                               timeout_s, secrets)
            where = f"package {self.manifest.name!r} train"
            try:
                new_model = (work / "out.safetensors").read_bytes()
                read_layout(new_model)
            except FileNotFoundError:
                raise PackageError(f"{where}: wrote no model to {{out_model}}") from None
            except SerializationError as exc:
                raise PackageError(f"{where}: wrote an invalid model ({exc})") from None
        return new_model, num_examples, metrics

    def validate(
        self, model_bytes: Buffer, config: Mapping, data: str, timeout_s: float | None = None,
        secrets: Collection[str] = (),
    ) -> tuple[int, dict]:
        """Run ``validate``; returns (num_examples, metrics)."""
        with tempfile.TemporaryDirectory(prefix="fedray-validate-") as tmp:
            if self.is_fedn:
                where = f"package {self.manifest.name!r} validate"
                values = fedn.write_inputs(Path(tmp), model_bytes, config, where)
                self.run("validate", values | {"data": data or ""}, Path(tmp), timeout_s,
                         secrets)
                return fedn.read_metrics(Path(tmp), where)
            return self._call("validate", Path(tmp), model_bytes, config, data, timeout_s,
                              secrets)

    def run_alone(self, entrypoint: str, data: str = "", timeout_s: float | None = None,
                  secrets: Collection[str] = ()) -> None:
        """Run an entrypoint that takes no model (FEDn's ``build`` and ``startup``), in the
        package folder; its output is kept only for an error."""
        with tempfile.TemporaryDirectory(prefix=f"fedray-{entrypoint}-") as tmp:
            self.run(entrypoint, {"data": data}, Path(tmp), timeout_s, secrets)

    def argv(self, entrypoint: str, values: Mapping[str, str]) -> list[str]:
        """The entrypoint's command with placeholders filled, argument by argument."""
        argv = [
            _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), arg)
            for arg in self.manifest.command(entrypoint)
        ]
        if argv[0] in ("python", "python3"):
            argv[0] = str(self.env.python) if self.env is not None else sys.executable
        return argv

    def _call(
        self,
        entrypoint: str,
        work: Path,
        model: Buffer,
        config: Mapping,
        data: str,
        timeout_s: float | None,
        secrets: Collection[str] = (),
    ) -> tuple[int, dict]:
        (work / "in.safetensors").write_bytes(model)
        try:
            (work / "config.json").write_text(json.dumps(dict(config)), encoding="utf-8")
        except (TypeError, ValueError) as exc:
            raise PackageError(f"the round config is not JSON-serializable ({exc})") from None
        names = {
            "in_model": "in.safetensors",
            "out_model": "out.safetensors",
            "out_meta": "out.json",
            "config": "config.json",
        }
        values = {key: str(work / name) for key, name in names.items()} | {"data": data or ""}
        self.run(entrypoint, values, work, timeout_s, secrets)
        return self._read_meta(work / "out.json", entrypoint)

    def run(
        self, entrypoint: str, values: Mapping[str, str], work: Path,
        timeout_s: float | None = None, secrets: Collection[str] = (),
    ) -> None:
        """Run an entrypoint in the package directory; stdout and stderr are kept in ``work``."""
        argv = self.argv(entrypoint, values)
        timeout = timeout_s if timeout_s is not None else self.manifest.timeout_s
        env = child_env(values.get("data", ""), secrets)
        if self.is_fedn:
            env = fedn.environ(env, values.get("data", ""))
        if self.env is not None:
            env = self.env.environ(env)
        where = f"package {self.manifest.name!r} {entrypoint}"
        with open(work / "stdout.log", "wb") as out, open(work / "stderr.log", "wb") as err:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise PackageError(f"{where}: cannot start {argv[0]!r} ({exc})") from None
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                msg = f"{where}: timed out after {timeout:g} s\n{_tail(work)}"
                raise PackageError(msg) from None
            except BaseException:
                _kill_group(proc)
                raise
        if code != 0:
            raise PackageError(f"{where}: exited with code {code}\n{_tail(work)}".rstrip())

    def _read_meta(self, path: Path, entrypoint: str) -> tuple[int, dict]:
        where = f"package {self.manifest.name!r} {entrypoint}"
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PackageError(f"{where}: wrote no metadata to {{out_meta}}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise PackageError(f"{where}: metadata is not valid JSON ({exc})") from None
        num = meta.get("num_examples") if isinstance(meta, dict) else None
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise PackageError(f"{where}: metadata needs 'num_examples', an integer >= 0")
        metrics = meta.get("metrics", {})
        if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in metrics.items()
        ):
            raise PackageError(f"{where}: metadata 'metrics' must map names to numbers")
        return num, metrics


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _tail(work: Path, lines: int = STDERR_TAIL_LINES, max_bytes: int = 64 * 1024) -> str:
    with open(work / "stderr.log", "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])
