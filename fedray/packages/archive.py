"""Compute package archives: deterministic builds and a paranoid unpacker.

Archives come from the network, so ``unpack_package`` checks every member before writing
anything (no absolute paths, ``..``, escaping links, devices, duplicates; bounded sizes;
checksum; a valid manifest), then extracts by hand into a temp folder renamed into place.
We do not rely on tarfile's extraction filters (the 3.11 ones have known link escapes).
Runs on edge machines: it must never import ray, pymongo or minio.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from fedray.errors import PackageError
from fedray.packages.manifest import (
    _SKIP,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_MEMBERS,
    MAX_TOTAL_BYTES,
    parse_manifest,
    read_manifest,
)


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ manifest


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


