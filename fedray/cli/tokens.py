"""`fedray token create|revoke|list`: per-client tokens, kept in tracking as keyed hashes
(``fedray.tracking.tokens``) under the secret in the federation's data directory
(``fedray.bridge.keys``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from fedray.cli.common import (
    DATA_DIR_ENV,
    TRACKING_MODULES,
    federation_dir,
    tracking,
    tracking_options,
)
from fedray.cli.extras import needs
from fedray.errors import ConfigError
from fedray.text import json_text

if TYPE_CHECKING:
    from fedray.tracking.store import TrackingStore


@contextlib.contextmanager
def _token_store(data_dir: Path | None, tracking_uri: str | None,
                 database: str | None) -> Iterator[TrackingStore]:
    from fedray.tracking.store import TrackingStore

    with tracking(data_dir, tracking_uri) as uri:
        store = TrackingStore.from_uri(uri, database)
        try:
            yield store
        finally:
            store.close()


@click.group()
def token() -> None:
    """Per-client tokens: the gateway and combiners accept them (and the shared token)
    within seconds, and a client's identity is its token's name."""


@token.command("create")
@click.option("--name", required=True, help="The client's name (its identity in tracking).")
@tracking_options
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
@tracking_options
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
@tracking_options
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
