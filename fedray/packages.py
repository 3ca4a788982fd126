"""Compute packages: build, safely unpack, and run a client's training code.

A compute package is a directory (or a deterministic ``.tgz`` of one) with ``fedray.yaml``
at its root naming entrypoints as commands with placeholders::

    name: digits
    entrypoints:
      train: python entrypoint.py train {in_model} {out_model} {out_meta} {data} {config}
      validate: python entrypoint.py validate {in_model} {out_meta} {data} {config}

The contract: ``{in_model}`` is a safetensors file with the global model; ``train`` writes
the updated model (safetensors) to ``{out_model}``; both write ``{out_meta}``, a JSON object
``{"num_examples": int, "metrics": {name: number}}``; ``{config}`` is a JSON file with the
round's settings; ``{data}`` is the client's data path (possibly empty, also exported as
``FEDRAY_DATA``). Commands are split with shlex and placeholders substituted per argument,
never through a shell; a leading ``python`` is this interpreter. They run in the package
directory with a timeout; a failure raises ``PackageError`` with the exit code and the tail
of stderr.

Archives come from the network, so ``unpack_package`` checks every member before writing
anything (no absolute paths, ``..``, escaping links, devices, duplicates; bounded sizes;
checksum; a valid manifest), then extracts by hand into a temp folder renamed into place.
We do not rely on tarfile's extraction filters (the 3.11 ones have known link escapes).
This module runs on edge machines: it must never import ray, pymongo or minio.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from fedray.errors import PackageError, SerializationError
from fedray.serialization import read_layout

MANIFEST = "fedray.yaml"
MAX_TOTAL_BYTES = 256 * 1024 * 1024
MAX_MEMBERS = 10_000
MAX_MANIFEST_BYTES = 64 * 1024
DEFAULT_TIMEOUT_S = 3600.0
STDERR_TAIL_LINES = 20
PLACEHOLDERS = frozenset({"in_model", "out_model", "out_meta", "data", "config"})
REQUIRED = {"train": ("out_model", "out_meta"), "validate": ("out_meta",)}
_FIELDS = ("name", "version", "timeout_s", "entrypoints")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SKIP = frozenset({"__pycache__", ".git", ".hg", ".svn", ".DS_Store"})


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ manifest


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed ``fedray.yaml``; ``entrypoints`` pairs each name with its command's argv."""

    name: str
    entrypoints: tuple[tuple[str, tuple[str, ...]], ...]
    version: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S

    def command(self, entrypoint: str) -> tuple[str, ...]:
        for name, argv in self.entrypoints:
            if name == entrypoint:
                return argv
        raise PackageError(f"package {self.name!r} has no {entrypoint!r} entrypoint")


def parse_manifest(text: str | bytes, source: str = MANIFEST) -> Manifest:
    """Validate a manifest; every error names the field and ``source`` (the file)."""

    def bad(field: str, why: str) -> PackageError:
        return PackageError(f"{source}: field {field!r} {why}")

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PackageError(f"{source}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise PackageError(f"{source}: must be a mapping with 'name' and 'entrypoints'")
    for key in raw:
        if key not in _FIELDS:
            raise bad(str(key), f"is unknown (allowed: {', '.join(_FIELDS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise bad("name", "must be 1-64 letters, digits, '.', '_' or '-'")
    version = raw.get("version", "")
    if isinstance(version, bool) or not isinstance(version, str | int | float):
        raise bad("version", "must be a string")
    timeout = raw.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < 1e9:
        raise bad("timeout_s", "must be a positive number of seconds")
    entries = raw.get("entrypoints")
    if not isinstance(entries, dict) or not entries:
        raise bad("entrypoints", "must be a non-empty mapping of name to command")
    parsed = []
    for ep, command in entries.items():
        field = f"entrypoints.{ep}"
        if not isinstance(ep, str) or not _NAME_RE.match(ep):
            raise bad(field, "is not a valid entrypoint name")
        if not isinstance(command, str) or not command.strip():
            raise bad(field, "must be a non-empty command string")
        try:
            argv = tuple(shlex.split(command))
        except ValueError as exc:
            raise bad(field, f"is not a valid command ({exc})") from None
        used = {p for arg in argv for p in _PLACEHOLDER_RE.findall(arg)}
        for unknown in sorted(used - PLACEHOLDERS):
            known = ", ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS))
            raise bad(field, f"uses unknown placeholder {{{unknown}}} (known: {known})")
        for needed in REQUIRED.get(ep, ()):
            if needed not in used:
                raise bad(field, f"must use the {{{needed}}} placeholder")
        parsed.append((ep, argv))
    return Manifest(name, tuple(sorted(parsed)), str(version), float(timeout))


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not path.is_file():
        raise PackageError(f"{root}: no {MANIFEST} at the package root")
    return parse_manifest(path.read_bytes(), str(path))


# ------------------------------------------------------------------------------ build


def build_package(src_dir: Path | str, out: Path | str) -> str:
    """Write a deterministic ``.tgz`` of ``src_dir`` to ``out`` and return its sha256.

    Entries are sorted, with mtime 0, owner 0:0 and modes 0o755 (directories, executables)
    or 0o644; ``__pycache__``, VCS folders and ``*.pyc`` are skipped. Symlinks are kept as
    symlinks and must obey the rule ``unpack_package`` enforces.
    """
    src, out = Path(src_dir), Path(out)
    read_manifest(src)
    skip_out = out.resolve()
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if d not in _SKIP]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if name in _SKIP or name.endswith(".pyc") or path.resolve() == skip_out:
                continue
            arcname = path.relative_to(src).as_posix()
            if path.is_symlink() and not _link_stays_inside(os.readlink(path)):
                raise PackageError(f"{path}: symlink {os.readlink(path)!r} may leave the package")
            entries.append((arcname, path))
    entries.sort()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fedray-build-", dir=out.parent)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for arcname, path in entries:
                info = tarfile.TarInfo(arcname)
                info.mode = 0o755
                if path.is_symlink():
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
                    tar.addfile(info)
                elif path.is_dir():
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif path.is_file():
                    info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
                    info.size = path.stat().st_size
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    raise PackageError(f"{path}: only files, folders and symlinks can be packaged")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256_file(out)


def _link_stays_inside(target: str) -> bool:
    """Relative, without ``..``: such links can only ever point into the package."""
    path = PurePosixPath(target)
    return bool(target) and not path.is_absolute() and ".." not in path.parts


# ------------------------------------------------------------------------------ unpack


def unpack_package(
    archive: Path | str,
    dest: Path | str,
    expected_sha256: str | None = None,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_members: int = MAX_MEMBERS,
) -> Path:
    """Check every member of ``archive``, then extract it to ``dest`` and return ``dest``.

    ``dest`` must not exist or be an empty directory. Any refusal raises ``PackageError``
    before a byte is extracted. Symlinks must be relative without ``..`` (so no chain of
    them can leave the package); hard links must name an earlier regular file and are
    extracted as copies; devices, fifos and duplicate names are refused.
    """
    archive, dest = Path(archive), Path(dest)
    if expected_sha256 is not None:
        actual = sha256_file(archive)
        if actual != expected_sha256.lower():
            raise PackageError(
                f"{archive}: checksum mismatch (expected {expected_sha256}, got {actual})"
            )
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PackageError(f"{dest}: destination exists and is not an empty directory")
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = _check_members(tar, archive, max_total_bytes, max_members)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".fedray-unpack-", dir=dest.parent))
            try:
                _extract(tar, members, tmp)
                tmp.chmod(0o755)
                os.replace(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as exc:
        raise PackageError(f"{archive}: cannot unpack ({exc})") from None
    return dest


def _norm(name: str, archive: Path, what: str) -> str:
    """A member path as clean relative POSIX parts ("" for the root), or a refusal."""
    if "\x00" in name or "\\" in name:
        raise PackageError(f"{archive}: {what} {name!r} has an invalid name")
    if PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise PackageError(f"{archive}: {what} {name!r} is an absolute path")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise PackageError(f"{archive}: {what} {name!r} has a '..' component")
    return "/".join(parts)


def _check_members(
    tar: tarfile.TarFile, archive: Path, max_total_bytes: int, max_members: int
) -> list[tuple[tarfile.TarInfo, str]]:
    members: list[tuple[tarfile.TarInfo, str]] = []
    seen: dict[str, tarfile.TarInfo] = {}
    total = 0
    for member in tar:
        if len(members) >= max_members:
            raise PackageError(f"{archive}: more than {max_members} members")
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise PackageError(f"{archive}: {member.name!r} is a device, fifo or special file")
        path = _norm(member.name, archive, "member")
        if not path:
            if member.isdir():
                continue  # the archive's own root, as `tar -C dir .` writes it
            raise PackageError(f"{archive}: member {member.name!r} has an empty path")
        if path in seen:
            raise PackageError(f"{archive}: member {path!r} appears twice")
        for parent in PurePosixPath(path).parents:
            kind = seen.get(parent.as_posix())
            if kind is not None and not kind.isdir():
                raise PackageError(f"{archive}: member {path!r} goes through a non-directory")
        if member.issym() and not _link_stays_inside(member.linkname):
            link = f"symlink {path!r} -> {member.linkname!r}"
            raise PackageError(f"{archive}: {link} may point outside (must be relative, no '..')")
        if member.islnk():
            target = seen.get(_norm(member.linkname, archive, f"hard link {path!r} ->"))
            if target is None or not target.isfile():
                link = f"hard link {path!r} -> {member.linkname!r}"
                raise PackageError(f"{archive}: {link} does not name an earlier file")
            total += target.size
        elif member.isfile():
            total += member.size
        if total > max_total_bytes:
            raise PackageError(f"{archive}: unpacked size exceeds {max_total_bytes} bytes")
        seen[path] = member
        members.append((member, path))
    manifest = seen.get(MANIFEST)
    if manifest is None or not manifest.isfile():
        raise PackageError(f"{archive}: no {MANIFEST} at the package root")
    if manifest.size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{archive}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    f = tar.extractfile(manifest)
    assert f is not None
    parse_manifest(f.read(), f"{archive}:{MANIFEST}")
    return members


def _extract(tar: tarfile.TarFile, members: list[tuple[tarfile.TarInfo, str]], dest: Path) -> None:
    """Write checked members; symlinks last, so nothing is ever written through one."""
    links: list[tuple[Path, str]] = []
    for member, path in members:
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if member.isdir():
            target.mkdir(exist_ok=True)
        elif member.islnk():
            source = dest / _norm(member.linkname, Path(), "")
            shutil.copyfile(source, target, follow_symlinks=False)
            shutil.copymode(source, target)
        elif member.isfile():
            src = tar.extractfile(member)
            assert src is not None
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            mode = 0o755 if member.mode & 0o111 else 0o644
            with os.fdopen(os.open(target, flags, mode), "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        else:
            links.append((target, member.linkname))
    for target, linkname in links:
        os.symlink(linkname, target)


# ------------------------------------------------------------------------------ load and run


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
        return Package(path.resolve(), read_manifest(path))
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
            if not (dest / MANIFEST).is_file():  # else a concurrent unpack of it won
                raise
    return Package(dest, read_manifest(dest), sha)


@dataclass(frozen=True, slots=True)
class Package:
    """An unpacked package; ``train``/``validate`` run its entrypoints in a temp dir."""

    root: Path
    manifest: Manifest
    sha256: str | None = None

    def train(
        self, model_bytes: bytes, config: Mapping, data: str, timeout_s: float | None = None
    ) -> tuple[bytes, int, dict]:
        """Run ``train``; returns (new model bytes, num_examples, metrics)."""
        with tempfile.TemporaryDirectory(prefix="fedray-train-") as tmp:
            work = Path(tmp)
            num_examples, metrics = self._call("train", work, model_bytes, config, data, timeout_s)
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
        self, model_bytes: bytes, config: Mapping, data: str, timeout_s: float | None = None
    ) -> tuple[int, dict]:
        """Run ``validate``; returns (num_examples, metrics)."""
        with tempfile.TemporaryDirectory(prefix="fedray-validate-") as tmp:
            return self._call("validate", Path(tmp), model_bytes, config, data, timeout_s)

    def argv(self, entrypoint: str, values: Mapping[str, str]) -> list[str]:
        """The entrypoint's command with placeholders filled, argument by argument."""
        argv = [
            _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), arg)
            for arg in self.manifest.command(entrypoint)
        ]
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        return argv

    def _call(
        self,
        entrypoint: str,
        work: Path,
        model: bytes,
        config: Mapping,
        data: str,
        timeout_s: float | None,
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
        self.run(entrypoint, values, work, timeout_s)
        return self._read_meta(work / "out.json", entrypoint)

    def run(
        self, entrypoint: str, values: Mapping[str, str], work: Path, timeout_s: float | None = None
    ) -> None:
        """Run an entrypoint in the package directory; stdout and stderr are kept in ``work``."""
        argv = self.argv(entrypoint, values)
        timeout = timeout_s if timeout_s is not None else self.manifest.timeout_s
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", FEDRAY_DATA=values.get("data", ""))
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
