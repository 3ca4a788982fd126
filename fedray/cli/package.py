"""`fedray package build SRC -o OUT`: pack a compute package; `fedray package seed SRC`:
run its ``build`` entry point (FEDn's way to write ``seed.npz``) and say what it wrote.
Part of the edge install: it needs nothing of the server extra."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click


@click.group()
def package() -> None:
    """Build compute packages and their seed models."""


@package.command("build")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
def package_build(src: Path, output: Path) -> None:
    """Pack the folder SRC (with its fedray.yaml or FEDn's fedn.yaml) into a .tgz,
    leaving out what its .fednignore lists."""
    from fedray.packages import build_package

    digest = build_package(src, output)
    click.echo(f"wrote {output} (sha256 {digest})")


@package.command("seed")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--no-env", is_flag=True,
              help="Run the build entry point in this environment, not the package's "
                   "python_env.")
def package_seed(src: Path, no_env: bool) -> None:
    """Run the build entry point of the package SRC in its folder and its python_env (the
    venv the edge client uses, built once), and report the files it wrote: FEDn's
    `python model.py` writes ../seed.npz, a seed_model for the federation."""
    from fedray.errors import PackageError
    from fedray.packages import load_package
    from fedray.packages.fedn import describe_seed, snapshot

    pkg = load_package(src)
    name = pkg.manifest.name
    if not pkg.manifest.has("build"):
        raise PackageError(f"package {name!r} ({src}) has no 'build' entry point")
    if pkg.manifest.python_env is not None and not no_env:
        pkg = pkg.with_env(say=lambda line: click.echo(line, err=True))
    folders = [pkg.root, pkg.root.parent]
    before = snapshot(folders)
    started = time.monotonic()
    pkg.run_alone("build", os.environ.get("FEDRAY_DATA", ""))
    after = snapshot(folders)
    written = sorted(path for path, stamp in after.items() if before.get(path) != stamp)
    if not written:
        raise PackageError(f"package {name!r} build ran but wrote no file in {pkg.root} or "
                           f"{pkg.root.parent}")
    took = time.monotonic() - started
    for path in written:
        shown = os.path.relpath(path, pkg.root)
        click.echo(f"package {name!r} build wrote {shown} ({path}; {describe_seed(path)}) "
                   f"in {took:.1f}s")
