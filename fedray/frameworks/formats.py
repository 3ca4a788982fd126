"""Model files to take away: a committed model as safetensors, npz, torch or keras.

``safetensors`` writes the committed bytes as they are (their sha256 is the model id);
``npz`` writes the same named arrays with numpy (``np.load(path)`` reads them back, no
pickle); ``fedn`` writes FEDn's numpy-helper file (``helper.load(path)`` gives the arrays
as a list), for a model whose tensors are named ``"0"``, ``"1"``, ... as a FEDn seed's are. ``torch`` and ``keras`` go through ``fedray.frameworks.torch`` and
``fedray.frameworks.keras``, imported only when asked for; each provides

    save_model_file(arrays: dict[str, np.ndarray], path: Path, build=None) -> None

(``build``: the ``--model package.module:function`` that makes the model, when given) and,
if it must refuse an output path or a missing ``build``, also

    check_model_file(path: Path | None, build=None) -> None

which ``writer`` calls before anything is fetched. A missing module (or framework) is one
line that says what to install or use instead.
Files are written to a temporary name beside ``path`` and renamed into place, so ``path``
is either the whole model or untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

import numpy as np

from fedray.errors import ConfigError, SerializationError
from fedray.frameworks import require as require_framework
from fedray.serialization import decode, encode_fedn_npz

FORMATS = ("safetensors", "npz", "fedn", "torch", "keras")
FRAMEWORKS = {"torch": "fedray.frameworks.torch", "keras": "fedray.frameworks.keras"}
FRAMEWORK_HOOK = "save_model_file"
FRAMEWORK_CHECK = "check_model_file"
_SUFFIXES = {".npz": "npz", ".safetensors": "safetensors"}
# Suffixes that promise a framework's own file: safetensors bytes under them would mislead.
_FRAMEWORK_SUFFIXES = {
    ".keras": "pass --format keras --model MODULE:FUNCTION for a whole Keras model",
    ".pt": "fedray writes no torch pickle: pass --format torch for a state_dict in "
           "safetensors (name it .safetensors)",
    ".pth": "fedray writes no torch pickle: pass --format torch for a state_dict in "
            "safetensors (name it .safetensors)",
}

Writer = Callable[[bytes, Path], None]


def format_for(path: Path, fmt: str | None = None) -> str:
    """``fmt``, else what ``path``'s suffix says (``.npz``), else safetensors; a suffix of
    a framework's own file (``.keras``, ``.pt``) needs ``--format``."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(f"--format {fmt}: one of {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower()
    if suffix in _FRAMEWORK_SUFFIXES:
        raise ConfigError(f"-o {path}: {_FRAMEWORK_SUFFIXES[suffix]}, or --format "
                          "safetensors to write safetensors bytes under this name")
    return _SUFFIXES.get(suffix, "safetensors")


def writer(fmt: str, build: Callable[[], object] | None = None,
           path: Path | None = None) -> Writer:
    """How to write a model in ``fmt``; for torch/keras this imports their module and
    checks ``path`` and ``build`` now, so what cannot be written is refused before
    anything is fetched."""
    if fmt == "safetensors":
        return lambda data, path: _atomic(path, lambda f: f.write(data))
    if fmt == "npz":
        return lambda data, path: _atomic(path, lambda f: _savez(f, decode(data)))
    if fmt == "fedn":
        return _write_fedn
    if fmt not in FRAMEWORKS:
        raise ConfigError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    module = _framework(fmt)
    save = getattr(module, FRAMEWORK_HOOK, None)
    if not callable(save):
        raise ConfigError(f"--format {fmt}: {FRAMEWORKS[fmt]} has no {FRAMEWORK_HOOK}(arrays, "
                          "path); use --format safetensors or npz")
    check = getattr(module, FRAMEWORK_CHECK, None)
    if callable(check):
        check(path, build)
    return lambda data, path: _atomic_file(path, lambda tmp: save(dict(decode(data)), tmp,
                                                                  build))


def _framework(fmt: str) -> ModuleType:
    name = FRAMEWORKS[fmt]
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # the helpers raise plain ImportError for a missing framework
        raise _import_problem(fmt, name, exc) from None


def _import_problem(fmt: str, name: str, exc: ImportError) -> ConfigError:
    """The one line (exit code 2) for a framework module that cannot be imported: the
    extra to install when the framework is missing, else what the import said."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if missing is not None and name.startswith(missing):  # fedray.frameworks(.torch)
        return ConfigError(f"--format {fmt}: this fedray has no {name}; use --format "
                           "safetensors or npz")
    try:
        require_framework(fmt, f"--format {fmt}")
    except ConfigError as missing_framework:
        return missing_framework
    if missing is not None:
        return ConfigError(f"--format {fmt}: {name} needs {missing}, which is not installed "
                           "here")
    return ConfigError(f"--format {fmt}: {exc}")


def _write_fedn(data: bytes, path: Path) -> None:
    try:
        npz = encode_fedn_npz(decode(data))
    except SerializationError as exc:
        raise ConfigError(f"--format fedn: {exc}; use --format npz for named arrays") from None
    _atomic(path, lambda f: f.write(npz))


def _savez(fh: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` for any tensor name (its keyword arguments could clash with one)."""
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array),
                                          allow_pickle=False)


def _atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    def to_file(tmp: Path) -> None:
        with open(tmp, "xb") as fh:
            write(fh)

    _atomic_file(path, to_file)


def _atomic_file(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``path`` (same suffix: frameworks look at it),
    then rename it onto ``path``."""
    if not path.parent.is_dir():
        raise ConfigError(f"-o {path}: folder {path.parent} does not exist")
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
