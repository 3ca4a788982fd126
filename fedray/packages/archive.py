"""Compute package archives: deterministic builds and a paranoid unpacker.

Archives come from the network, so ``unpack_package`` checks every member before writing
anything (no absolute paths, ``..``, escaping links, devices, duplicates; bounded sizes;
checksum; a valid manifest), then extracts by hand into a temp folder renamed into place.
We do not rely on tarfile's extraction filters (the 3.11 ones have known link escapes).

A few hundred KiB of gzip can hold gigabytes of tar, so sizes are bounded on the
uncompressed side too: every member counts (``./`` entries included), an extended header
(a PAX record or a GNU long name) is refused before tarfile reads it into memory, and the
decompressed stream as a whole may not run past ``max_tar_bytes``.
Runs on edge machines: it must never import ray, pymongo or minio.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from fedray.errors import PackageError
from fedray.packages.fedn import (
    FEDN_MANIFEST,
    fednignore,
    manifest_member,
    parse_fedn_manifest,
    read_package_manifest,
)
from fedray.packages.manifest import (
    _SKIP,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_MEMBERS,
    MAX_TOTAL_BYTES,
    parse_manifest,
)

MAX_EXTENDED_HEADER_BYTES = 64 * 1024  # one PAX header or GNU long name/link (a path is < 4 KiB)
MAX_GLOBAL_HEADER_BYTES = 4 * 1024  # all global PAX headers (git archive writes one of 52 B)
MAX_EXTENDED_IN_A_ROW = 4  # before one member: global, PAX, GNU long name, GNU long link
MEMBER_OVERHEAD_BYTES = 4 * 1024  # a member's share of the .tar stream beyond its data
_EXTENDED = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                       tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK})
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: str) -> bool:
    """64 lowercase hex characters: only such a value may name a file in a cache."""
    return isinstance(value, str) and _SHA256_RE.fullmatch(value) is not None


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ build


def build_package(src_dir: Path | str, out: Path | str) -> str:
    """Write a deterministic ``.tgz`` of ``src_dir`` to ``out`` and return its sha256.

    Entries are sorted, with mtime 0, owner 0:0 and modes 0o755 (directories, executables)
    or 0o644; ``__pycache__``, VCS folders, ``*.pyc`` and what ``.fednignore`` lists (FEDn's
    patterns) are skipped. Symlinks are kept as symlinks and must obey the rule
    ``unpack_package`` enforces.
    """
    src, out = Path(src_dir), Path(out)
    read_package_manifest(src)
    ignored = fednignore(src)
    skip_out = out.resolve()
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath).relative_to(src)
        dirnames[:] = [d for d in dirnames
                       if d not in _SKIP and not ignored((here / d).as_posix())]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            arcname = path.relative_to(src).as_posix()
            if name in _SKIP or name.endswith(".pyc") or path.resolve() == skip_out \
                    or ignored(arcname):
                continue
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
    max_tar_bytes: int | None = None,
) -> Path:
    """Check every member of ``archive``, then extract it to ``dest`` and return ``dest``.

    ``dest`` must not exist or be an empty directory. Any refusal raises ``PackageError``
    before a byte is extracted. Symlinks must be relative without ``..`` (so no chain of
    them can leave the package); hard links must name an earlier regular file and are
    extracted as copies; devices, fifos, sparse files and duplicate names are refused.
    ``max_tar_bytes`` bounds the uncompressed archive (default: ``max_total_bytes`` plus
    ``MEMBER_OVERHEAD_BYTES`` per member allowed).
    """
    if max_tar_bytes is None:
        max_tar_bytes = max_total_bytes + (max_members + 1) * MEMBER_OVERHEAD_BYTES
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
        with _open_tar(archive, max_tar_bytes) as tar:
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
    except _Refused as exc:
        raise PackageError(f"{archive}: {exc}") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise PackageError(f"{archive}: cannot unpack ({exc})") from None
    return dest


class _Refused(Exception):
    """A bound hit inside tarfile's own reading; ``unpack_package`` names the archive."""


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses oversized or endless extended headers before tarfile reads them into memory
    (tarfile reads a whole PAX header or GNU long name at once, whatever size it claims),
    and sparse files, whose maps can be made as long as the archive."""

    def _proc_member(self, tar: _BoundedTarFile):
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused(f"member {self.name!r} is a sparse file")
        if self.type not in _EXTENDED:
            tar.extended_in_a_row = 0
            return super()._proc_member(tar)
        tar.extended_in_a_row += 1
        if tar.extended_in_a_row > MAX_EXTENDED_IN_A_ROW:
            raise _Refused(f"more than {MAX_EXTENDED_IN_A_ROW} extended headers in a row")
        if self.size > MAX_EXTENDED_HEADER_BYTES:
            raise _Refused(f"extended header of {self.size} bytes "
                           f"(at most {MAX_EXTENDED_HEADER_BYTES})")
        if self.type == tarfile.XGLTYPE:  # copied into every later member: keep it small
            tar.global_header_bytes += self.size
            if tar.global_header_bytes > MAX_GLOBAL_HEADER_BYTES:
                raise _Refused(f"global PAX headers over {MAX_GLOBAL_HEADER_BYTES} bytes")
        return super()._proc_member(tar)

    def _proc_gnusparse_00(self, *args):  # the PAX forms of sparse files
        raise _Refused("a member is a sparse file")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


class _BoundedTarFile(tarfile.TarFile):
    tarinfo = _BoundedTarInfo
    extended_in_a_row = 0
    global_header_bytes = 0


class _BoundedStream:
    """A decompressed stream that may not go past ``limit`` bytes. tarfile skips member
    data by seeking, which decompresses it, so bounding the position bounds the work."""

    def __init__(self, inner: BinaryIO, limit: int) -> None:
        self.inner, self.limit = inner, limit

    def _refuse(self) -> _Refused:
        return _Refused(f"uncompressed archive exceeds {self.limit} bytes")

    def read(self, size: int = -1) -> bytes:
        room = self.limit + 1 - self.inner.tell()
        data = self.inner.read(room if size is None or size < 0 else min(size, room))
        if len(data) >= room:
            raise self._refuse()
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            offset += self.inner.tell() if whence == os.SEEK_CUR else self.limit + 1
        if offset > self.limit:
            raise self._refuse()
        return self.inner.seek(offset)

    def tell(self) -> int:
        return self.inner.tell()


@contextlib.contextmanager
def _open_tar(archive: Path, max_tar_bytes: int):
    """``archive`` (plain, gzip, bzip2 or xz tar) opened through the bounds above."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(archive, "rb"))
        magic = raw.read(6)
        raw.seek(0)
        stream: BinaryIO = raw
        if magic.startswith(b"\x1f\x8b"):
            stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif magic.startswith(b"BZh"):
            stream = stack.enter_context(bz2.BZ2File(raw))
        elif magic.startswith(b"\xfd7zXZ\x00"):
            stream = stack.enter_context(lzma.LZMAFile(raw))
        bounded = _BoundedStream(stream, max_tar_bytes)
        yield stack.enter_context(_BoundedTarFile(fileobj=bounded, mode="r"))  # type: ignore[arg-type]


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
    for count, member in enumerate(tar, 1):
        if count > max_members:  # every entry counts, also the ./ ones skipped below
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
    found = manifest_member(seen)
    manifest = seen.get(found[0]) if found is not None else None
    if found is None or manifest is None or not manifest.isfile():
        raise PackageError(f"{archive}: no {MANIFEST} (or FEDn's {FEDN_MANIFEST}) at the "
                           "package root")
    if manifest.size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{archive}: {found[0]} is larger than {MAX_MANIFEST_BYTES} bytes")
    f = tar.extractfile(manifest)
    assert f is not None
    (parse_fedn_manifest if found[1] else parse_manifest)(f.read(), f"{archive}:{found[0]}")
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


