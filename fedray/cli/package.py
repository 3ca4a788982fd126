"""`fedray package build SRC -o OUT`: pack a compute package. Part of the edge install:
it needs nothing of the server extra."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def package() -> None:
    """Build compute packages."""


@package.command("build")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
def package_build(src: Path, output: Path) -> None:
    """Pack the folder SRC (with its fedray.yaml) into a .tgz."""
    from fedray.packages import build_package

    digest = build_package(src, output)
    click.echo(f"wrote {output} (sha256 {digest})")
