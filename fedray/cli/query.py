"""The tracking queries: `fedray sessions|rounds|clients|combiners|events|models|packages|
validations`, one command per collection, all built by ``query_command``.

Each lists documents as a table (or ``--json``) through ``fedray.tracking.query``; the
collections that belong to a session take ``--session``, events take ``--level``, and
``models`` is also the group of `fedray models get` (``fedray.cli.models``).
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from fedray.cli.common import TRACKING_MODULES, tracking, tracking_options
from fedray.cli.extras import require
from fedray.cli.models import get as models_get

SESSION_COLLECTIONS = ("rounds", "models", "events", "validations")  # have a session_id
EVENT_LEVELS = ("debug", "info", "warning", "error")  # tracking's LEVELS, without pymongo
QUERY_COLLECTIONS = ("sessions", "rounds", "models", "clients", "combiners", "events", "validations",
                     "packages")


def query_command(collection: str) -> click.Command:
    @click.option("--filter", "filter_json", default=None, metavar="JSON",
                  help='A Mongo filter, e.g. \'{"status": "failed"}\'.')
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
    @click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 1_000_000))
    @tracking_options
    def command(filter_json: str | None, as_json: bool, limit: int, data_dir: Path | None,
                tracking_uri: str | None, database: str | None, session: str | None = None,
                level: str | None = None, follow: bool = False) -> None:
        if click.get_current_context().invoked_subcommand:  # fedray models get ...
            return
        require(f"fedray {collection}", ("server",), TRACKING_MODULES)
        from fedray.tracking.query import parse_filter, query_page, to_json
        from fedray.tracking.tables import render_table

        parse_filter(filter_json)  # a typo is told before any server starts
        with tracking(data_dir, tracking_uri) as uri:
            page = query_page(uri, collection, filter_json, limit, database=database,
                              session=session, level=level, count=not as_json and not follow)
            if follow:
                _follow(uri, collection, page.docs, filter_json, database, session, level,
                        as_json)
                return
        if as_json:
            click.echo(to_json(page.docs))
        else:
            render_table(collection, page.docs, Console(), total=page.total)

    if collection == "events":
        command = click.option(
            "--level", type=click.Choice(EVENT_LEVELS), default=None,
            help="Show this level and above (debug < info < warning < error).")(command)
    if collection in FOLLOWED:
        command = click.option(
            "--follow", "-f", is_flag=True,
            help=f"Then print each new {collection[:-1]} as it lands, until Ctrl-C "
                 "(with --json: one JSON object per line).")(command)
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


def _follow(uri: str, collection: str, docs: list[dict], filter_json: str | None,
            database: str | None, session: str | None, level: str | None,
            as_json: bool) -> None:
    """Print ``docs``, then every new document as it lands (``fedray.tracking.tail``)."""
    from fedray.tracking.query import follow_query, to_json_line
    from fedray.tracking.tables import follow_line

    console = Console(soft_wrap=True)

    def show(doc: dict) -> None:
        if as_json:
            click.echo(to_json_line(doc))
        else:
            console.print(follow_line(collection, doc))

    for doc in docs:
        show(doc)
    try:
        for doc in follow_query(uri, collection, filter_json, database=database,
                                session=session, level=level, after=docs):
            show(doc)
    except KeyboardInterrupt:
        click.echo("(stopped following)", err=True)


FOLLOWED = ("events", "rounds")  # what --follow streams
QUERIES = [query_command(collection) for collection in QUERY_COLLECTIONS]
