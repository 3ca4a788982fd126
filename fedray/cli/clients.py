"""`fedray client add|list|revoke`: one credential bundle per site, its public key
registered with the federation (``fedray.bridge.credential``, ``fedray.bridge.identity``).

The federation keeps only public material: the key rows in tracking (MAC'd under the
token secret of the data directory, like token rows) and its CA certificate. The private
key exists only in the bundle this command writes.
"""

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


def _folder(data_dir: Path | None, tracking_uri: str | None, command: str) -> Path:
    """The federation's data directory. ``fedray client add --data-dir NEW`` makes it:
    credentials may be provisioned before the federation's first start."""
    from fedray.bridge.keys import private_dir

    needs = "" if tracking_uri is not None else "tracking"
    try:  # with --tracking, no tracking/ there: the folder of the secret must exist
        return federation_dir(data_dir, needs)
    except ConfigError:
        if data_dir is None and not os.environ.get(DATA_DIR_ENV):
            raise ConfigError(f"{command} needs the federation's --data-dir: its token secret "
                              "(secrets/token.key) and CA (tls/ca.pem) live there") from None
        if data_dir is None or (data_dir.exists() and any(data_dir.iterdir())):
            raise
    private_dir(data_dir / needs if needs else data_dir)
    click.echo(f"note: {data_dir} is new: start the federation with --data-dir {data_dir} "
               "(or data_dir: in its config) for it to know this client", err=True)
    return data_dir


@click.group()
def client() -> None:
    """Clients' credentials: a key pair per site, its public half registered here. The
    gateway and combiners accept a new one within seconds, and refuse a revoked one."""


@client.command("add")
@click.argument("name")
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE",
              help="Something about this client, kept with its key (repeatable).")
@click.option("--gateway", default=None, metavar="HOST:PORT",
              help="The address this client dials (default: the last fedray run's gateway "
                   "of --data-dir).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the bundle (default: NAME.fedray.json here).")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@click.option("--expires", default=None, metavar="DURATION",
              help="Refuse the credential after this long (30m, 8h, 90d; default: never).")
@click.option("--ca", "ca_file", default=None, metavar="CA.pem",
              help="The CA clients verify the servers with, when the config's tls.cert is "
                   "not the federation's own (default: the data directory's tls/ca.pem).")
@tracking_options
@needs("fedray client add", "server", modules=TRACKING_MODULES)
def client_add(name: str, attrs: tuple[str, ...], gateway: str | None, output: Path | None,
               force: bool, expires: str | None, ca_file: str | None, data_dir: Path | None,
               tracking_uri: str | None, database: str | None) -> None:
    """Register a new key pair for client NAME and write its credential bundle (0600):
    its private key, NAME, the gateway address and the federation's CA certificate."""
    from fedray.bridge.credential import CredentialBundle
    from fedray.bridge.identity import ClientKey
    from fedray.bridge.keys import federation_id, load_token_secret, mark_tokens_issued
    from fedray.bridge.tls import read_pem
    from fedray.deploy.certificates import federation_ca
    from fedray.deploy.lifecycle import recorded_gateway
    from fedray.edge.cli import parse_attrs
    from fedray.edge.client import check_attrs
    from fedray.tracking.tokens import add_client_key

    folder = _folder(data_dir, tracking_uri, "fedray client add")
    where = output or Path(f"{name}.fedray.json")
    if where.exists() and not force:
        raise ConfigError(f"{where} exists; choose another -o FILE or pass --force")
    attributes = check_attrs(parse_attrs(attrs))
    until = parse_expiry(expires)
    secret = load_token_secret(folder)
    assert secret is not None
    ca = read_pem(ca_file, "--ca") if ca_file else federation_ca(folder)[0]
    address = gateway or recorded_gateway(folder)
    key = ClientKey.generate()
    with token_store(folder, tracking_uri, database) as store:
        key_id = add_client_key(store, name, key.public, secret, attributes, until)
    mark_tokens_issued(folder)
    bundle = CredentialBundle(name=name, federation=federation_id(secret), key=key,
                              gateway=address, ca=ca, attrs=attributes)
    bundle.write(where, force=force)
    click.echo(str(where))
    dial = "" if address else " --gateway HOST:PORT"
    click.echo(f"client {name} added (key {key_id[:12]}); copy {where} to that site only "
               f"and start it with: fedray edge start --credentials {where.name}{dial}"
               + ("" if address else " (no gateway recorded yet: fedray run records it)"),
               err=True)


@client.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@tracking_options
@needs("fedray client list", "server", modules=TRACKING_MODULES)
def client_list(as_json: bool, data_dir: Path | None, tracking_uri: str | None,
                database: str | None) -> None:
    """List clients' credentials (keys and tokens): name, kind, id, state."""
    from fedray.tracking.tokens import list_tokens

    with token_store(data_dir, tracking_uri, database) as store:
        rows = [r for r in list_tokens(store) if r["kind"] != "shared"]
    if as_json:
        click.echo(json_text(rows, default=str))
        return
    Console().print(credential_table(rows, f"{len(rows)} client credential(s)"))


@client.command("revoke")
@click.argument("name")
@tracking_options
@needs("fedray client revoke", "server", modules=TRACKING_MODULES)
def client_revoke(name: str, data_dir: Path | None, tracking_uri: str | None,
                  database: str | None) -> None:
    """Revoke every credential of client NAME (its key, its token); the gateway and
    combiners refuse it, and close its stream, within a few seconds."""
    from fedray.tracking.tokens import revoke_token

    with token_store(data_dir, tracking_uri, database) as store:
        count = revoke_token(store, name, kinds=("key", "token"))
    if count == 0:
        raise ConfigError(f"{name}: no live credential to revoke (see fedray client list)")
    click.echo(f"revoked {count} credential(s) of {name}")
