"""The `fedray` command: run, demo, edge, package, the tracking queries and plot.

User mistakes end as one line on stderr and a stable exit code (see ``fedray.errors``);
a traceback is printed only for a bug in fedray itself (exit code 70). Server-side imports
(Ray, pymongo) stay inside the commands that need them, and each such command first
checks that its extra is installed (``fedray.cli.extras``): on an edge-only install it says
which one in one line and exits 2.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import click
from rich.console import Console

from fedray.cli.extras import MissingExtra, hint_for, needs, require
from fedray.cli.models import TRACKING_MODULES
from fedray.cli.models import get as models_get
from fedray.deploy.lifecycle import Stopped, running
from fedray.deploy.status import status
from fedray.edge.cli import edge
from fedray.errors import ConfigError, FedrayError
from fedray.text import json_text

INTERNAL_ERROR = 70
DATA_DIR_ENV = "FEDRAY_DATA_DIR"  # fedray.config's, without importing it
SESSION_COLLECTIONS = ("rounds", "models", "events", "validations")  # have a session_id
EVENT_LEVELS = ("debug", "info", "warning", "error")  # tracking's LEVELS, without pymongo
QUERY_COLLECTIONS = ("sessions", "rounds", "models", "clients", "combiners", "events", "validations",
                     "packages")


class FedrayGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MissingExtra as exc:  # the message is the whole hint
            click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)
        except FedrayError as exc:
            click.echo(f"fedray: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Stopped as exc:  # SIGINT/SIGTERM to run or demo: what it stopped, in one line
            click.echo(f"fedray: {exc.line()}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("fedray: interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in fedray: show it whole
            line = hint_for(f"fedray {ctx.invoked_subcommand or ''}".rstrip(), exc) \
                if isinstance(exc, ModuleNotFoundError) else None
            if line is not None:  # an extra's module, imported past the checks
                click.echo(line, err=True)
                sys.exit(MissingExtra.exit_code)
            traceback.print_exc()
            click.echo("fedray: internal error (a bug in fedray; please report the trace above)",
                       err=True)
            sys.exit(INTERNAL_ERROR)


@click.group(cls=FedrayGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedray")
def main() -> None:
    """fedray: federated learning on Ray, with edge clients that only dial out."""


main.add_command(edge)
main.add_command(status)


def _stderr() -> Console:
    return Console(stderr=True, soft_wrap=True)


@main.command()
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
    console = _stderr()
    with running() as teardown:
        result = run_federation(config, console=console, resume=not new_session,
                                teardown=teardown, insecure=insecure)
    print_summary(result, console)
    if as_json:
        click.echo(json_text(result.summary()))
    if not result.ok:
        sys.exit(9)


@main.command()
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
                           partition=partition, data_dir=data_dir, console=_stderr(),
                           storage=storage, tracking=tracking, teardown=teardown,
                           framework=framework)
    if as_json:
        click.echo(json_text(summary))
    if summary["state"] != "finished":
        sys.exit(9)


@main.group()
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


database_option = click.option(
    "--database", default=None, metavar="NAME",
    help="The tracking database (default: the URI's, else 'fedray'; a config's "
         "tracking.database).")


def _query_command(collection: str) -> click.Command:
    @click.option("--filter", "filter_json", default=None, metavar="JSON",
                  help='A Mongo filter, e.g. \'{"status": "failed"}\'.')
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
    @click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 1_000_000))
    @click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                  help="A federation's data directory (default: the newest under ~/.fedray).")
    @click.option("--tracking", "tracking_uri", default=None, metavar="URI",
                  help="A mongodb:// URI instead of the embedded tracking of --data-dir.")
    @database_option
    def command(filter_json: str | None, as_json: bool, limit: int, data_dir: Path | None,
                tracking_uri: str | None, database: str | None, session: str | None = None,
                level: str | None = None) -> None:
        if click.get_current_context().invoked_subcommand:  # fedray models get ...
            return
        require(f"fedray {collection}", ("server",), TRACKING_MODULES)
        from fedray.tracking.query import parse_filter, query_page, to_json
        from fedray.tracking.tables import render_table

        parse_filter(filter_json)  # a typo is told before any server starts
        with _tracking(data_dir, tracking_uri) as uri:
            page = query_page(uri, collection, filter_json, limit, database=database,
                              session=session, level=level, count=not as_json)
        if as_json:
            click.echo(to_json(page.docs))
        else:
            render_table(collection, page.docs, Console(), total=page.total)

    if collection == "events":
        command = click.option(
            "--level", type=click.Choice(EVENT_LEVELS), default=None,
            help="Show this level and above (debug < info < warning < error).")(command)
    if collection in SESSION_COLLECTIONS:
        command = click.option(
            "--session", default=None, metavar="ID",
            help="Only this session: its id or the first characters of it.")(command)
    command.__doc__ = f"List {collection} from tracking."
    if collection == "models":
        command.__doc__ += ("\n\n`fedray models get ID|latest -o FILE` writes one of them, "
                            "its checksum verified.")
        group = click.group(collection, invoke_without_command=True)(command)
        group.add_command(models_get)
        return group
    return click.command(collection)(command)


@contextlib.contextmanager
def _tracking(data_dir: Path | None, tracking_uri: str | None) -> Iterator[str]:
    """The tracking URI to query: --tracking, else the embedded server of the data directory
    (started for the command, and stopped after it, when it is not already running)."""
    from fedray.tracking.embedded import connect_or_start

    if tracking_uri is not None:
        yield tracking_uri
        return
    uri, server = connect_or_start(federation_dir(data_dir, "tracking"))
    try:
        yield uri
    finally:
        if server is not None:
            server.stop()


for _collection in QUERY_COLLECTIONS:
    main.add_command(_query_command(_collection))


@main.command()
@click.option("--session", default=None, metavar="ID",
              help="A session id or its first characters (default: the latest session).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("curve.png"), show_default=True, help="The PNG file to write.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="A federation's data directory (default: the newest under ~/.fedray).")
@click.option("--tracking", "tracking_uri", default=None, metavar="URI",
              help="A mongodb:// URI instead of the embedded tracking of --data-dir.")
@database_option
@needs("fedray plot", "server", modules=(*TRACKING_MODULES, "matplotlib"))
def plot(session: str | None, output: Path, data_dir: Path | None,
         tracking_uri: str | None, database: str | None) -> None:
    """Draw a session's training and validation curves, round by round, into a PNG."""
    from fedray.tracking.plot import plot_session

    with _tracking(data_dir, tracking_uri) as uri:
        info = plot_session(uri, output, session=session, database=database)
    shown = ", ".join(info.metrics) or "no metrics yet"
    click.echo(f"wrote {info.path}: session {info.session_id} of {info.federation} "
               f"({info.status}), {info.rounds} rounds; {shown}")


def _tracking_options(command):
    command = database_option(command)
    command = click.option("--tracking", "tracking_uri", default=None, metavar="URI",
                           help="A mongodb:// URI instead of the embedded tracking of "
                                "--data-dir.")(command)
    return click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                        help="A federation's data directory (default: the newest under "
                             "~/.fedray).")(command)


@contextlib.contextmanager
def _token_store(data_dir: Path | None, tracking_uri: str | None, database: str | None):
    from fedray.tracking.store import TrackingStore

    with _tracking(data_dir, tracking_uri) as uri:
        store = TrackingStore.from_uri(uri, database)
        try:
            yield store
        finally:
            store.close()


@main.group()
def token() -> None:
    """Per-client tokens: the gateway and combiners accept them (and the shared token)
    within seconds, and a client's identity is its token's name."""


@token.command("create")
@click.option("--name", required=True, help="The client's name (its identity in tracking).")
@_tracking_options
@needs("fedray token create", "server", modules=TRACKING_MODULES)
def token_create(name: str, data_dir: Path | None, tracking_uri: str | None,
                 database: str | None) -> None:
    """Create a token for client NAME and print it once (tracking keeps only a keyed hash,
    under the secret in the federation's --data-dir)."""
    from fedray.bridge.keys import load_token_secret, mark_tokens_issued
    from fedray.tracking.tokens import create_token

    try:  # with --tracking, no tracking/ there: the folder of the secret must exist
        folder = federation_dir(data_dir, "" if tracking_uri is not None else "tracking")
    except ConfigError:
        if data_dir is not None or os.environ.get(DATA_DIR_ENV):
            raise
        raise ConfigError("fedray token create needs the federation's --data-dir: its token "
                          "secret (secrets/token.key) lives there") from None
    key = load_token_secret(folder)
    assert key is not None
    with _token_store(folder, tracking_uri, database) as store:
        secret = create_token(store, name, key)
    mark_tokens_issued(folder)
    click.echo(secret)
    click.echo(f"token for {name} created; it is shown only now. On that client, put it in "
               "the environment as FEDRAY_TOKEN (not --token: command lines show in ps), "
               "then fedray edge start ...", err=True)


@token.command("revoke")
@click.option("--name", required=True, help="The client whose token stops working.")
@_tracking_options
@needs("fedray token revoke", "server", modules=TRACKING_MODULES)
def token_revoke(name: str, data_dir: Path | None, tracking_uri: str | None,
                 database: str | None) -> None:
    """Revoke the token of client NAME; servers refuse it within a few seconds."""
    from fedray.tracking.tokens import revoke_token

    with _token_store(data_dir, tracking_uri, database) as store:
        count = revoke_token(store, name)
    if count == 0:
        raise ConfigError(f"--name {name}: no live token to revoke (see fedray token list)")
    click.echo(f"revoked the token of {name}")


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@_tracking_options
@needs("fedray token list", "server", modules=TRACKING_MODULES)
def token_list(as_json: bool, data_dir: Path | None, tracking_uri: str | None,
               database: str | None) -> None:
    """List per-client tokens: name, id (a hash prefix), created, revoked."""
    from fedray.tracking.tokens import list_tokens

    with _token_store(data_dir, tracking_uri, database) as store:
        rows = list_tokens(store)
    if as_json:
        click.echo(json_text(rows, default=str))
        return
    from rich.table import Table
    from rich.text import Text

    from fedray.text import printable

    table = Table("name", "id", "created", "state", title=f"{len(rows)} token(s)")
    for row in rows:
        when = row["revoked_at"] or ""
        state = f"revoked {when:%Y-%m-%d %H:%M}" if row["revoked"] and when else \
            "revoked" if row["revoked"] else "live"
        created = row["created_at"]
        table.add_row(Text(printable(str(row["name"]), newlines=False)), Text(str(row["id"])),
                      f"{created:%Y-%m-%d %H:%M}" if created else "", state)
    Console().print(table)


def federation_dir(data_dir: Path | None, needs: str = "tracking") -> Path:
    """``data_dir`` (else the default) once it is a federation's: it has ``needs`` (its
    tracking/ folder, or itself). A mistyped path must not get an empty tracking server,
    nor a fresh token secret that no federation knows."""
    folder = data_dir or default_data_dir()
    where = "--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}" \
        if os.environ.get(DATA_DIR_ENV) else "the data directory"
    wanted = folder / needs if needs else folder
    if not wanted.is_dir():
        what = f"{wanted} is missing" if needs else "no such folder"
        raise ConfigError(f"{where} {folder}: not a federation's data directory ({what}): "
                          "a mistyped path, or no `fedray run` used it yet")
    return folder


def default_data_dir() -> Path:
    """$FEDRAY_DATA_DIR, else the most recently used federation under ~/.fedray."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    root = Path.home() / ".fedray"
    candidates = [d for d in root.glob("*") if (d / "tracking").is_dir()] if root.is_dir() else []
    if not candidates:
        raise ConfigError("no federation data found under ~/.fedray; pass --data-dir or --tracking")
    newest = max(candidates, key=lambda d: (d / "tracking").stat().st_mtime)
    click.echo(f"(tracking of {newest})", err=True)
    return newest


if __name__ == "__main__":
    main()
