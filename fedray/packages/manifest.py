"""The compute package manifest: ``fedray.yaml`` parsed into a frozen ``Manifest``.

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
``FEDRAY_DATA``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedray.errors import PackageError

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


