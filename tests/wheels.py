"""Tiny pure-Python wheels made on the spot, and a pip that sees only them.

A compute package's ``python_env`` is installed by pip. Tests give pip a folder of wheels
written here (``PIP_NO_INDEX=1``, ``PIP_FIND_LINKS``), so no test depends on an index or
the network, and an unsatisfiable requirement fails at once.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

PROBE = "fedray_envprobe"  # the module of the probe wheel: VALUE = 42


def make_wheel(folder: Path, name: str = "fedray-envprobe", version: str = "0.1",
               module: str = PROBE, source: str = "VALUE = 42\n") -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` holding ``<module>.py`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{module}.py": source.encode(),
        f"{dist}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: fedray-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n",
    }
    record = [f"{path},sha256={_digest(data)},{len(data)}" for path, data in files.items()]
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record + [f"{dist}.dist-info/RECORD,,"])
                                         + "\n").encode()
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for member, data in files.items():
            whl.writestr(member, data)
    return path


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def offline_pip(monkeypatch, wheels: Path) -> None:
    """pip (in processes started from now on) installs from ``wheels`` and nothing else."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")


# An entrypoint that needs only the standard library and the probe: it sends the model back
# unchanged and reports whether it ran in a venv and what the probe module says.
ENTRYPOINT = f'''import json, shutil, sys
import {PROBE}

def main(kind, *args):
    if kind == "train":
        src, dst, meta = args[:3]
        shutil.copyfile(src, dst)
    else:
        meta = args[1]
    with open(meta, "w") as f:
        json.dump({{"num_examples": 5, "metrics": {{
            "probe": {PROBE}.VALUE, "in_venv": int(sys.prefix != sys.base_prefix)}}}}, f)

main(*sys.argv[1:])
'''


def write_env_package(root: Path, requirements: list[str], name: str = "envpkg") -> Path:
    """A compute package whose entrypoints need ``requirements`` (see ENTRYPOINT)."""
    root.mkdir(parents=True, exist_ok=True)
    reqs = ", ".join(f'"{r}"' for r in requirements)
    (root / "fedray.yaml").write_text(
        f"name: {name}\n"
        f"python_env: {{requirements: [{reqs}]}}\n"
        "entrypoints:\n"
        "  train: python main.py train {in_model} {out_model} {out_meta}\n"
        "  validate: python main.py validate {in_model} {out_meta}\n")
    (root / "main.py").write_text(ENTRYPOINT)
    return root
