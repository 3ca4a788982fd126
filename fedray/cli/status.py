"""`fedray status [CONFIG]`: show a running federation from another shell.

The command only parses its arguments and checks for Ray; joining the cluster and asking
the federation's actors is ``fedray.deploy.status``.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from fedray.cli.extras import needs
from fedray.config import DATA_DIR_ENV
from fedray.deploy.lifecycle import recorded_run
from fedray.deploy.status import default_address, describe, render
from fedray.errors import ConfigError
from fedray.text import json_text


@click.command("status")
@click.argument("config_path", metavar="[CONFIG]", required=False, type=click.Path(path_type=Path))
@click.option("--federation", default=None, help="The federation's name (instead of CONFIG).")
@click.option("--address", default=None, metavar="RAY_ADDRESS",
              help="Ray's GCS address, HOST:PORT, used as given (default: the Ray of the run "
                   "going on in the data directory, else $RAY_ADDRESS, else auto).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              envvar=DATA_DIR_ENV, help="The federation's data directory, whose run to show "
              "(default: the config's; $FEDRAY_DATA_DIR).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@needs("fedray status", "server", modules=("ray",))
def status(config_path: Path | None, federation: str | None, address: str | None,
           data_dir: Path | None, as_json: bool) -> None:
    """Show a running federation: combiners, clients, gateway and the current session.

    Without CONFIG or --federation: the federation running from the data directory (or
    the one federation running in the cluster)."""
    config_address = None
    if config_path is not None:
        if federation is not None:
            raise ConfigError("give either CONFIG or --federation, not both")
        from fedray.deploy.config_file import load_config

        config = load_config(config_path)
        federation, config_address = config.federation, config.ray.address
        data_dir = data_dir or config.resolved_data_dir()
    if address is None and data_dir is not None:
        found = recorded_run(data_dir)
        if found is not None:
            address, federation = found[0], federation or found[1]
    result = describe(federation, address or default_address(config_address))
    if as_json:
        click.echo(json_text(result))
    else:
        render(result, Console())
