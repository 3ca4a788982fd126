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
                level: str | None = None) -> None:
        if click.get_current_context().invoked_subcommand:  # fedray models get ...
            return
        require(f"fedray {collection}", ("server",), TRACKING_MODULES)
        from fedray.tracking.query import parse_filter, query_page, to_json
        from fedray.tracking.tables import render_table

        parse_filter(filter_json)  # a typo is told before any server starts
        with tracking(data_dir, tracking_uri) as uri:
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


QUERIES = [query_command(collection) for collection in QUERY_COLLECTIONS]
