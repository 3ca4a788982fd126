"""FEDn's compute packages, run as they are: ``fedn.yaml``, ``python_env.yaml``,
``.fednignore`` and the numpy helper's model files.

A FEDn package is a folder (or a ``.tgz`` of one, with ``fedn.yaml`` at its root or in
its one top folder) with a ``fedn.yaml`` and no ``fedray.yaml``::

    python_env: python_env.yaml             # optional: the package's own environment
    entry_points:
      build:    {command: python model.py}      # writes the seed (fedray package seed)
      startup:  {command: python data.py}       # once, before the client's first task
      train:    {command: python train.py}      # + IN_MODEL OUT_MODEL
      validate: {command: python validate.py}   # + IN_MODEL OUT_JSON

fedray calls them as FEDn's client does: ``train`` gets the global model as a numpy-helper
``.npz`` (arrays under ``"0"``, ``"1"``, ... in order) with the round's settings beside it
in ``IN_MODEL-metadata`` (FEDn's ``client_settings``), and writes the new model to
``OUT_MODEL`` and a JSON object to ``OUT_MODEL-metadata`` with ``num_examples`` (any other
number in it becomes a training metric); ``validate`` writes a flat JSON object of metrics.
The client's ``--data`` is ``FEDN_DATA_PATH`` as well as ``FEDRAY_DATA``. A FEDn model's
tensors are named by position, ``"0"``..``"n-1"``, so the safetensors the federation keeps
and the npz a package sees hold the same arrays under the same keys, bit for bit.

``python_env.yaml`` is FEDn's conda-like file (``name``, ``python``, ``build_dependencies``,
``dependencies``); its requirement lines go through the same checks as a ``fedray.yaml``
``python_env`` (by name only: no URLs, paths or pip options, but ``-r FILE`` of a file in
the package) and build the same cached venv (``fedray.packages.env``); pip honours their
environment markers. The ``python`` version is not installed: the venv uses the client's
Python, as FEDn's client does. ``predict`` and split learning's ``forward``/``backward``
are not run. Runs on edge machines: it must never import ray, pymongo or minio.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np
import yaml

from fedray.errors import PackageError, SerializationError
from fedray.packages.manifest import (
    _NAME_RE,
    _SKIP,
    DEFAULT_TIMEOUT_S,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_REQUIREMENTS,
    Manifest,
    PythonEnv,
    read_manifest,
    read_requirements,
    requirement_problem,
)
from fedray.serialization import (
    Buffer,
    decode,
    decode_npz,
    describe_names,
    encode,
    encode_fedn_npz,
    positions,
)

FEDN_MANIFEST = "fedn.yaml"
FEDN_IGNORE = ".fednignore"
FEDN = "fedn"
DEFAULT_NAME = "fedn-package"
METADATA = "-metadata"  # FEDn's save_metadata(meta, path) writes path + "-metadata"
IN_MODEL, OUT_MODEL, OUT_JSON = "in.npz", "out.npz", "metrics.json"
# What FEDn's client appends to each entry point's command.
ARGUMENTS = {"train": ("{in_model}", "{out_model}"), "validate": ("{in_model}", "{out_meta}"),
             "predict": ("{in_model}", "{out_meta}")}
_ENV_FIELDS = ("name", "python", "build_dependencies", "dependencies")
_SHELL = ("&&", "||", "|", ";", "&", ">", ">>", "<", "2>", "2>&1")
_HOW_TRAIN = "FEDn's save_metadata({'num_examples': n}, out_model_path)"


# ------------------------------------------------------------------------------ manifest


def read_package_manifest(root: Path) -> Manifest:
    """The manifest at ``root``: ``fedray.yaml``, else FEDn's ``fedn.yaml``."""
    if (root / MANIFEST).is_file():
        return read_manifest(root)
    if (root / FEDN_MANIFEST).is_file():
        return read_fedn_manifest(root)
    raise PackageError(f"{root}: no {MANIFEST} (or FEDn's {FEDN_MANIFEST}) at the package root")


def package_root(folder: Path) -> Path:
    """Where an unpacked package's manifest is: ``folder``, or its one subfolder holding a
    ``fedn.yaml`` (``tar -czf package.tgz client`` packs the folder itself)."""
    if (folder / MANIFEST).is_file() or (folder / FEDN_MANIFEST).is_file():
        return folder
    entries = [p for p in folder.iterdir() if p.name not in _SKIP]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() \
            and (entries[0] / FEDN_MANIFEST).is_file():
        return entries[0]
    return folder


def manifest_member(paths: Mapping[str, object]) -> tuple[str, bool] | None:
    """Which archive member is the manifest, and whether it is FEDn's, given the members'
    clean paths: ``fedray.yaml``, else ``fedn.yaml``, else ``TOP/fedn.yaml`` when every
    member lies in the one folder ``TOP``."""
    if MANIFEST in paths:
        return MANIFEST, False
    if FEDN_MANIFEST in paths:
        return FEDN_MANIFEST, True
    tops = {path.split("/", 1)[0] for path in paths}
    if len(tops) == 1 and f"{next(iter(tops))}/{FEDN_MANIFEST}" in paths:
        return f"{next(iter(tops))}/{FEDN_MANIFEST}", True
    return None


def parse_fedn_manifest(text: str | bytes, source: str = FEDN_MANIFEST) -> Manifest:
    """``fedn.yaml`` as a ``Manifest`` whose entrypoints end in FEDn's arguments (as
    placeholders). Keys other than ``entry_points`` and ``python_env`` are ignored, as
    FEDn ignores them."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise PackageError(f"{source}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PackageError(f"{source}: not valid YAML ({exc})") from None
    entries = raw.get("entry_points") if isinstance(raw, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise PackageError(f"{source}: needs 'entry_points', a mapping of names to "
                           "{command: ...}")
    parsed = []
    for ep, spec in entries.items():
        field = f"{source}: entry_points.{ep}"
        if not isinstance(ep, str) or not _NAME_RE.match(ep):
            raise PackageError(f"{field}: not a valid entry point name")
        command = spec.get("command") if isinstance(spec, dict) else None
        if not isinstance(command, str) or not command.strip():
            raise PackageError(f"{field}: needs 'command', a non-empty command line")
        try:
            argv = tuple(shlex.split(command))
        except ValueError as exc:
            raise PackageError(f"{field}.command is not a valid command ({exc})") from None
        shell = [arg for arg in argv if arg in _SHELL or "$" in arg or "`" in arg]
        if shell:
            raise PackageError(f"{field}.command uses shell syntax ({shell[0]!r}); fedray runs "
                               "entry points without a shell: put it in a script")
        parsed.append((ep, argv + ARGUMENTS.get(ep, ())))
    manifest = Manifest(DEFAULT_NAME, tuple(sorted(parsed)), "", DEFAULT_TIMEOUT_S, None, FEDN)
    if not manifest.has("train"):
        found = ", ".join(sorted(str(ep) for ep in entries))
        raise PackageError(f"{source}: entry_points has no 'train' (it has {found}); fedray "
                           "runs train and validate (split learning's forward and backward "
                           "are not supported)")
    return manifest


def read_fedn_manifest(root: Path) -> Manifest:
    """``root/fedn.yaml``, with the requirements of the ``python_env`` file it names."""
    path = root / FEDN_MANIFEST
    text = path.read_bytes()
    manifest = parse_fedn_manifest(text, str(path))
    env_file = yaml.safe_load(text).get("python_env")
    if env_file is None or env_file == "":
        return manifest
    env, name = read_python_env(root, env_file, f"{path}: python_env")
    return replace(manifest, python_env=env, name=name or manifest.name)


def read_python_env(root: Path, name: object, field: str) -> tuple[PythonEnv, str]:
    """FEDn's ``python_env.yaml``: its requirements (build dependencies first) and the
    package name its ``name`` gives (``.mnist-pytorch`` is ``mnist-pytorch``), or ''."""
    pure = PurePosixPath(name) if isinstance(name, str) else None
    if pure is None or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise PackageError(f"{field} must name a file in the package, got {name!r}")
    root = root.resolve()
    path = (root / pure).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise PackageError(f"{field}: {name} is not a file in the package")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError as exc:
        raise PackageError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise PackageError(f"{path}: must be a mapping with {', '.join(_ENV_FIELDS)}")
    for key in raw:
        if key not in _ENV_FIELDS:
            raise PackageError(f"{path}: field {key!r} is unknown (FEDn's python_env has "
                               f"{', '.join(_ENV_FIELDS)})")
    requirements: list[str] = []
    for key in ("build_dependencies", "dependencies"):
        lines = raw.get(key) or []
        if not isinstance(lines, list):
            raise PackageError(f"{path}: {key} must be a list of requirement lines")
        for i, line in enumerate(lines):
            requirements.extend(_requirement(root, path, f"{key}[{i}]", line))
    if len(requirements) > MAX_REQUIREMENTS:
        raise PackageError(f"{path}: more than {MAX_REQUIREMENTS} requirements")
    env_name = raw.get("name")
    env_name = env_name.lstrip(".") if isinstance(env_name, str) else ""
    env = PythonEnv(tuple(requirements), str(pure))  # the file names the env in messages
    return env, env_name if _NAME_RE.match(env_name) else ""


def _requirement(root: Path, path: Path, field: str, line: object) -> list[str]:
    if isinstance(line, str) and line.strip().startswith(("-r ", "--requirement ")):
        return list(read_requirements(root, line.strip().split(None, 1)[1].strip()))
    if isinstance(line, dict):
        raise PackageError(f"{path}: {field} is a mapping ({describe_names(map(str, line))}); "
                           "FEDn's python_env lists pip requirement lines only")
    why = requirement_problem(line)
    if why:
        raise PackageError(f"{path}: {field}: {why}")
    return [line.strip()]


def fednignore(src: Path) -> Callable[[str], bool]:
    """Whether a path (relative to ``src``, POSIX) is left out of the package by
    ``src/.fednignore``: FEDn's rule, a pattern matching the path or its last part."""
    try:
        text = (src / FEDN_IGNORE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return lambda path: False
    except (OSError, UnicodeDecodeError) as exc:
        raise PackageError(f"{src / FEDN_IGNORE}: cannot read it ({exc})") from None
    patterns = [line.strip().rstrip("/") for line in text.splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    return lambda path: any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.rsplit("/", 1)[-1], p)
                            for p in patterns)


# ------------------------------------------------------------------------------ calls


def environ(env: dict[str, str], data: str) -> dict[str, str]:
    """An entry point's environment: FEDn's packages read their data from FEDN_DATA_PATH."""
    return env | {"FEDN_DATA_PATH": data} if data else env


def write_inputs(work: Path, model: Buffer, config: Mapping, where: str) -> dict[str, str]:
    """The global model as the numpy helper's npz, the round's settings beside it, and the
    placeholders of FEDn's arguments."""
    params = decode(model)
    try:
        (work / IN_MODEL).write_bytes(encode_fedn_npz(params))
    except SerializationError:
        raise PackageError(f"{where}: the global model's tensors are named "
                           f"{describe_names(params)}, not '0', '1', ...: a FEDn package "
                           "takes the numpy helper's arrays by position; start the session "
                           "from the package's seed (seed_model: seed.npz)") from None
    try:
        (work / (IN_MODEL + METADATA)).write_text(json.dumps(dict(config)), encoding="utf-8")
    except (TypeError, ValueError) as exc:
        raise PackageError(f"the round config is not JSON-serializable ({exc})") from None
    return {"in_model": str(work / IN_MODEL), "out_model": str(work / OUT_MODEL),
            "out_meta": str(work / OUT_JSON)}


def read_update(work: Path, model: Buffer, where: str) -> tuple[bytes, int, dict]:
    """What ``train`` wrote: the new model (checked against the global one, cast to its
    dtypes), ``num_examples`` and the other numbers of its metadata."""
    out = work / OUT_MODEL
    if not out.is_file():
        raise PackageError(f"{where}: wrote no model to {out} (expected the numpy helper's "
                           "npz: helper.save(weights, out_model_path))")
    try:
        arrays = decode_npz(str(out))
    except SerializationError as exc:
        raise PackageError(f"{where}: {out}: {exc}") from None
    glob = decode(model)
    if set(arrays) != set(glob):
        raise PackageError(f"{where}: {out} holds arrays {describe_names(arrays)}, the global "
                           f"model {describe_names(glob)} (expected one array per array of "
                           "in_model, in the same order)")
    for key, value in arrays.items():
        if value.shape != glob[key].shape:
            raise PackageError(f"{where}: {out}: array {key} has shape {value.shape}, the "
                               f"global model's {glob[key].shape}")
    new = encode({key: np.asarray(arrays[key], dtype=glob[key].dtype) for key in glob})
    meta = _json_object(work / (OUT_MODEL + METADATA), where,
                        f"JSON with 'num_examples': {_HOW_TRAIN}")
    num = meta.pop("num_examples", None)
    if not _positive_int(num):
        raise PackageError(f"{where}: {out}{METADATA} has no 'num_examples' (expected a "
                           f"positive integer, the examples trained on: {_HOW_TRAIN}); "
                           f"got {str(num)[:40]}")
    return new, int(num), _numbers(meta)


def read_metrics(work: Path, where: str) -> tuple[int, dict]:
    """What ``validate`` wrote: a flat JSON object of metrics (``num_examples``, if there,
    weighs them)."""
    meta = _json_object(work / OUT_JSON, where, "a JSON object of metrics: FEDn's "
                        "save_metrics(report, out_json_path)")
    num = meta.pop("num_examples", 0)
    return (int(num) if _positive_int(num) else 0), _numbers(meta)


def _json_object(path: Path, where: str, expected: str) -> dict:
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read(MAX_MANIFEST_BYTES + 1))
    except FileNotFoundError:
        raise PackageError(f"{where}: wrote no {path} (expected {expected})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PackageError(f"{where}: {path} is not JSON ({str(exc)[:80]}; expected "
                           f"{expected})") from None
    if not isinstance(meta, dict):
        raise PackageError(f"{where}: {path} holds a {type(meta).__name__}, expected {expected}")
    return meta


def _positive_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) \
        and math.isfinite(value) and value == int(value) and value >= 1


def _numbers(meta: Mapping) -> dict[str, float | int]:
    """The finite numbers of ``meta`` (metrics); text, lists and objects are left out."""
    return {str(k): v for k, v in meta.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


# ------------------------------------------------------------------------------ build


def snapshot(folders: list[Path]) -> dict[Path, tuple[int, int]]:
    """Every file under ``folders[0]`` (not in VCS or cache folders) and directly in the
    others, with its mtime and size: what ``build`` wrote is what changed."""
    seen: dict[Path, tuple[int, int]] = {}
    for i, folder in enumerate(folders):
        walk = os.walk(folder) if i == 0 else [(str(folder), [], os.listdir(folder))]
        for dirpath, dirnames, filenames in walk:
            dirnames[:] = [d for d in dirnames if d not in _SKIP]
            for name in filenames:
                path = Path(dirpath) / name
                try:
                    stat = path.stat()
                except OSError:
                    continue
                if path.is_file():
                    seen[path.resolve()] = (stat.st_mtime_ns, stat.st_size)
    return seen


def describe_seed(path: Path) -> str:
    """What a file ``build`` wrote is, for ``fedray package seed``'s report."""
    if path.suffix != ".npz":
        return f"{path.stat().st_size} bytes"
    try:
        arrays = decode_npz(str(path))
    except SerializationError as exc:
        return f"not a model: {exc}"
    kind = "numpy-helper npz" if positions(arrays) else "npz"
    total = sum(a.nbytes for a in arrays.values())
    size = f"{total} bytes" if total < 1e3 else \
        f"{total / 1e3:.1f} kB" if total < 1e6 else f"{total / 1e6:.1f} MB"
    return f"{kind}, {len(arrays)} arrays, {size}"
