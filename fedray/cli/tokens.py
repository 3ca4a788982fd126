"""`fedray token create|revoke|list`: per-client tokens, kept in tracking as keyed hashes
(``fedray.tracking.tokens``) under the secret in the federation's data directory
(``fedray.bridge.keys``)."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.console import Console

from fedray.cli.common import (
    DATA_DIR_ENV,
    TRACKING_MODULES,
    credential_table,
    federation_dir,
    parse_expiry,
    token_store,
    tracking_options,
)
from fedray.cli.extras import needs
from fedray.errors import ConfigError
from fedray.text import json_text


@click.group()
def token() -> None:
    """Bearer tokens: per-client ones (a client's identity is its token's name) and shared
    ones (callers name themselves, like $FEDRAY_TOKEN) that expire and rotate. The gateway
    and combiners accept a new one within seconds. Prefer key pairs: fedray client add."""


@token.command("create")
@click.option("--name", default=None, help="The client's name (its identity in tracking).")
@click.option("--shared", is_flag=True,
              help="A shared token instead: any caller presenting it names itself.")
@click.option("--expires", default=None, metavar="DURATION",
              help="Refuse the token after this long (30m, 8h, 90d; default: never).")
@tracking_options
@needs("fedray token create", "server", modules=TRACKING_MODULES)
def token_create(name: str | None, shared: bool, expires: str | None, data_dir: Path | None,
                 tracking_uri: str | None, database: str | None) -> None:
    """Create a token for client --name, or a --shared one, and print it once (tracking
    keeps only a keyed hash, under the secret in the federation's --data-dir)."""
    from fedray.bridge.keys import load_token_secret, mark_tokens_issued
    from fedray.tracking.tokens import create_shared_token, create_token

    if (name is None) == (not shared):
        raise ConfigError("give --name NAME (a client's own token) or --shared, not both")
    until = parse_expiry(expires)
    try:  # with --tracking, no tracking/ there: the folder of the secret must exist
        folder = federation_dir(data_dir, "" if tracking_uri is not None else "tracking")
    except ConfigError:
        if data_dir is not None or os.environ.get(DATA_DIR_ENV):
            raise
        raise ConfigError("fedray token create needs the federation's --data-dir: its token "
                          "secret (secrets/token.key) lives there") from None
    key = load_token_secret(folder)
    assert key is not None
    with token_store(folder, tracking_uri, database) as store:
        if shared:
            secret, token_id = create_shared_token(store, key, until)
        else:
            secret, token_id = create_token(store, name, key, until), ""
    mark_tokens_issued(folder)
    click.echo(secret)
    whom = f"shared token {token_id}" if shared else f"token for {name}"
    click.echo(f"{whom} created{' (expires in ' + expires + ')' if expires else ''}; it is "
               "shown only now. On a client, put it in the environment as FEDRAY_TOKEN (not "
               "--token: command lines show in ps), then fedray edge start ...", err=True)


@token.command("revoke")
@click.option("--name", default=None, help="The client whose token stops working.")
@click.option("--id", "token_id", default=None, metavar="ID",
              help="The token with this id (fedray token list), e.g. an old shared token.")
@click.option("--shared", "env_token", is_flag=True,
              help="The shared token in $FEDRAY_TOKEN (the one fedray run was started with).")
@tracking_options
@needs("fedray token revoke", "server", modules=TRACKING_MODULES)
def token_revoke(name: str | None, token_id: str | None, env_token: bool,
                 data_dir: Path | None, tracking_uri: str | None,
                 database: str | None) -> None:
    """Revoke a token; servers refuse it within a few seconds."""
    from fedray.bridge.keys import load_token_secret
    from fedray.tracking.tokens import revoke_shared_value, revoke_token

    if sum(x is not None and x is not False for x in (name, token_id, env_token)) != 1:
        raise ConfigError("give one of --name NAME, --id ID or --shared")
    with token_store(data_dir, tracking_uri, database) as store:
        if env_token:
            value = os.environ.get("FEDRAY_TOKEN")
            if not value:
                raise ConfigError("--shared revokes the token in $FEDRAY_TOKEN, which is not set")
            folder = federation_dir(data_dir, "" if tracking_uri is not None else "tracking")
            secret = load_token_secret(folder, create=False)
            if secret is None:
                raise ConfigError(f"{folder}: no token secret (secrets/token.key)")
            count = revoke_shared_value(store, value, secret)
        else:
            count = revoke_token(store, name, token_id, kinds=("token", "shared"))
    if count == 0:
        raise ConfigError(f"{'--name ' + name if name else '--id ' + str(token_id)}: no live "
                          "token to revoke (see fedray token list)")
    click.echo(f"revoked {'the shared token' if env_token else f'{count} token(s)'}")


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@tracking_options
@needs("fedray token list", "server", modules=TRACKING_MODULES)
def token_list(as_json: bool, data_dir: Path | None, tracking_uri: str | None,
               database: str | None) -> None:
    """List tokens: name (shared ones are named "shared"), kind, id (a hash prefix),
    created, state."""
    from fedray.tracking.tokens import list_tokens

    with token_store(data_dir, tracking_uri, database) as store:
        rows = [r for r in list_tokens(store) if r["kind"] != "key"]
    if as_json:
        click.echo(json_text(rows, default=str))
        return
    Console().print(credential_table(rows, f"{len(rows)} token(s)"))
