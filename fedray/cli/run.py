"""`fedray run CONFIG` and `fedray demo`: the commands that start a federation and own it
until its session ends.

Both run under ``fedray.deploy.lifecycle.running``: SIGINT or SIGTERM stops what they
started and ends the command with ``Stopped`` (``fedray.cli.main`` prints it in one line).
A session that does not finish exits 9, ``SessionError``'s code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fedray.cli.common import stderr_console
from fedray.cli.extras import needs
from fedray.deploy.lifecycle import running
from fedray.errors import SessionError
from fedray.text import json_text


@click.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where models and tracking live (default ~/.fedray/<federation>).")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Override a config field, e.g. --set session.rounds=3 (YAML value).")
@click.option("--new-session", is_flag=True,
              help="Start a new session even if an earlier run left one unfinished "
                   "(by default that one resumes after its last committed round).")
@click.option("--insecure", is_flag=True,
              help="Start even without a token while listening beyond loopback: then "
                   "every client that reaches the gateway is accepted.")
@needs("fedray run", "server", modules=("ray", "pymongo", "nx_27017"))
def run(config_path: Path, as_json: bool, data_dir: Path | None, overrides: tuple[str, ...],
        new_session: bool, insecure: bool) -> None:
    """Run a federation from CONFIG until its session ends (joins Ray when told to).

    SIGINT or SIGTERM stops what it started (actors, tracking server, a local Ray) and
    exits 130 or 143."""
    from fedray.deploy.config_file import load_config, parse_override
    from fedray.deploy.runner import print_summary, run_federation

    parsed = dict(parse_override(item) for item in overrides)
    if data_dir is not None:
        parsed["data_dir"] = str(data_dir)
    config = load_config(config_path, parsed)
    console = stderr_console()
    with running() as teardown:
        result = run_federation(config, console=console, resume=not new_session,
                                teardown=teardown, insecure=insecure)
    print_summary(result, console)
    if as_json:
        click.echo(json_text(result.summary()))
    if not result.ok:
        sys.exit(SessionError.exit_code)


@click.command()
@click.option("--clients", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option("--combiners", default=2, show_default=True, type=click.IntRange(1, 16))
@click.option("--partition", type=click.Choice(["iid", "label_skew"]), default="iid",
              show_default=True, help="How the digits are split across clients.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where the demo keeps data, models and tracking (default ~/.fedray/demo).")
@click.option("--storage", default="file", show_default=True, metavar="URI",
              help="storage.uri for the models, e.g. s3://BUCKET?endpoint=HOST:9000&secure=false "
                   "(keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY).")
@click.option("--tracking", default="embedded", show_default=True, metavar="URI",
              help="tracking.uri, e.g. mongodb://HOST:27017/ instead of the embedded server.")
@click.option("--framework", type=click.Choice(["numpy", "torch", "keras"]), default="numpy",
              show_default=True, help="The clients' model: numpy's MLP, or a small CNN in "
                                      "PyTorch or Keras 3 (pip install 'fedray[torch]' or "
                                      "'fedray[keras]').")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of results.")
@needs("fedray demo", "server", "examples")
def demo(clients: int, rounds: int, combiners: int, partition: str, data_dir: Path | None,
         storage: str, tracking: str, framework: str, as_json: bool) -> None:
    """Run a whole federation on this machine: digits data, edge clients as processes."""
    from fedray.deploy.demo import run_demo

    with running() as teardown:
        summary = run_demo(clients=clients, rounds=rounds, combiners=combiners,
                           partition=partition, data_dir=data_dir, console=stderr_console(),
                           storage=storage, tracking=tracking, teardown=teardown,
                           framework=framework)
    if as_json:
        click.echo(json_text(summary))
    if summary["state"] != "finished":
        sys.exit(SessionError.exit_code)
