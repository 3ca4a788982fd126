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

A package may also declare the Python environment its entrypoints run in, as requirement
specifiers or as a requirements file inside the package (``fedray.packages.env`` builds it
once per package and requirement list)::

    python_env:
      requirements: ["scikit-learn>=1.4", "safetensors"]    # or
      requirements_file: requirements.txt

Only requirement specifiers by name are allowed there (``name``, ``name[extra]>=1.0;
marker``): no pip options, direct URLs (``name @ https://…``), version-control URLs
(``git+https://…``) or local paths (``./x``, ``/x``, ``file:``). Where pip gets a project
from is the edge site's choice (its pip configuration), not the package's.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

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
_FIELDS = ("name", "version", "timeout_s", "entrypoints", "python_env")
_ENV_FIELDS = ("requirements", "requirements_file")
MAX_REQUIREMENTS = 200
MAX_REQUIREMENT_CHARS = 1000
MAX_REQUIREMENTS_FILE_BYTES = 64 * 1024
_COMMENT_RE = re.compile(r"(^|\s)#.*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A requirement by name (PEP 508 without a direct reference), up to its marker's ";".
_SPECIFIER_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
                           r"\s*(?:\[[A-Za-z0-9._,\s-]*\])?\s*[<>=!~*.,+\sA-Za-z0-9_-]*")
_VCS_RE = re.compile(r"(?:git|hg|svn|bzr)\+", re.IGNORECASE)
# What pip takes for an archive file (pip's own list), not a project name.
_ARCHIVES = (".whl", ".zip", ".tar", ".tgz", ".tar.gz", ".tbz", ".tar.bz2", ".txz", ".tar.xz",
             ".tlz", ".tar.lz", ".tar.lzma")
_BY_NAME = ("only requirement specifiers by name are allowed (the site's pip configuration "
            "chooses where projects come from)")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SKIP = frozenset({"__pycache__", ".git", ".hg", ".svn", ".DS_Store"})


@dataclass(frozen=True, slots=True)
class PythonEnv:
    """``python_env``: the requirements of the venv the entrypoints run in. With a
    ``requirements_file``, ``requirements`` are its lines once ``read_manifest`` read it."""

    requirements: tuple[str, ...] = ()
    requirements_file: str = ""


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed ``fedray.yaml``; ``entrypoints`` pairs each name with its command's argv.
    ``format`` is ``"fedray"``, or ``"fedn"`` for FEDn's ``fedn.yaml``
    (``fedray.packages.fedn``), whose entrypoints keep FEDn's calling convention."""

    name: str
    entrypoints: tuple[tuple[str, tuple[str, ...]], ...]
    version: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S
    python_env: PythonEnv | None = None
    format: str = "fedray"

    def has(self, entrypoint: str) -> bool:
        return any(name == entrypoint for name, _ in self.entrypoints)

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
    env = _python_env(raw["python_env"], bad) if "python_env" in raw else None
    return Manifest(name, tuple(sorted(parsed)), str(version), float(timeout), env)


def _python_env(raw: object, bad) -> PythonEnv:
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in _ENV_FIELDS:
        raise bad("python_env", "must be a mapping with one of 'requirements' (a list of "
                  "requirement specifiers) or 'requirements_file' (a file in the package)")
    if "requirements" in raw:
        reqs = raw["requirements"]
        if not isinstance(reqs, list) or len(reqs) > MAX_REQUIREMENTS:
            raise bad("python_env.requirements",
                      f"must be a list of at most {MAX_REQUIREMENTS} requirement specifiers")
        for i, req in enumerate(reqs):
            why = requirement_problem(req)
            if why:
                raise bad(f"python_env.requirements[{i}]", why)
        return PythonEnv(tuple(r.strip() for r in reqs))
    name = raw["requirements_file"]
    pure = PurePosixPath(name) if isinstance(name, str) else None
    if pure is None or not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise bad("python_env.requirements_file", "must be a relative path inside the package")
    return PythonEnv((), str(pure))


def requirement_problem(req: object) -> str:
    """Why ``req`` is not a requirement specifier fit for a package env ('' if it is)."""
    if not isinstance(req, str) or not req.strip():
        return "must be a non-empty string"
    if len(req) > MAX_REQUIREMENT_CHARS or not req.isprintable():
        return f"must be at most {MAX_REQUIREMENT_CHARS} printable characters on one line"
    text = req.strip()
    spec = text.split(";", 1)[0].strip()  # what comes before an environment marker
    kind = _not_by_name(text, spec)
    return f"{text[:40]!r} is {kind}; {_BY_NAME}" if kind else ""


def _not_by_name(text: str, spec: str) -> str:
    """What ``text`` is instead of a requirement by name ('' when it is one)."""
    if re.search(r"(^|\s)-", text):  # pip reads options anywhere on a requirement line
        return "a pip option"
    if "${" in text:
        return "an environment variable reference (pip would expand it)"
    if "@" in spec:
        return "a direct reference (name @ URL)"
    if _VCS_RE.match(spec):
        return "a version-control URL"
    if "://" in spec or spec.lower().startswith("file:"):
        return "a URL"
    if (spec.startswith((".", "~")) or "/" in spec or "\\" in spec
            or spec.split("[", 1)[0].strip().lower().endswith(_ARCHIVES)):
        return "a local path"
    if _SPECIFIER_RE.fullmatch(spec) is None:
        return "not a requirement specifier (name, name[extra] or name>=1.0)"
    return ""


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not path.is_file():
        raise PackageError(f"{root}: no {MANIFEST} at the package root")
    manifest = parse_manifest(path.read_bytes(), str(path))
    env = manifest.python_env
    if env is not None and env.requirements_file:
        env = replace(env, requirements=read_requirements(root, env.requirements_file))
        manifest = replace(manifest, python_env=env)
    return manifest


def read_requirements(root: Path, name: str) -> tuple[str, ...]:
    """The requirement lines of the package's ``name`` (comments and blank lines left out)."""
    root = root.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise PackageError(f"{root / MANIFEST}: field 'python_env.requirements_file': "
                           f"{name} is not a file in the package")
    if path.stat().st_size > MAX_REQUIREMENTS_FILE_BYTES:
        raise PackageError(f"{root / name}: larger than {MAX_REQUIREMENTS_FILE_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PackageError(f"{root / name}: not UTF-8 text") from None
    reqs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = _COMMENT_RE.sub("", line).strip()
        if not line:
            continue
        why = requirement_problem(line)
        if why:
            raise PackageError(f"{root / name}: line {number}: {why}")
        reqs.append(line)
    if len(reqs) > MAX_REQUIREMENTS:
        raise PackageError(f"{root / name}: more than {MAX_REQUIREMENTS} requirements")
    return tuple(reqs)


