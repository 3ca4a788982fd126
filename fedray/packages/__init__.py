"""Compute packages: the manifest, safe archives, and running entrypoints.

See ``manifest`` for the package contract, ``archive`` for building and unpacking,
``run`` for executing entrypoints, ``env`` for a package's own Python environment, and
``entrypoint`` for writing a package's entrypoint.py around Python callbacks. Edge-side
code: never imports ray, pymongo or minio.
"""

from fedray.packages.archive import build_package, sha256_file, unpack_package
from fedray.packages.manifest import (
    MANIFEST,
    Manifest,
    PythonEnv,
    parse_manifest,
    read_manifest,
)
from fedray.packages.run import Package, default_cache_dir, load_package

__all__ = [
    "MANIFEST",
    "Manifest",
    "Package",
    "PythonEnv",
    "build_package",
    "default_cache_dir",
    "load_package",
    "parse_manifest",
    "read_manifest",
    "sha256_file",
    "unpack_package",
]
