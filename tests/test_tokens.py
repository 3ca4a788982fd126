"""Per-client tokens when tracking cannot be trusted: keyed hashes a row written without the
federation's secret cannot satisfy, token rows that may be renamed, revived or deleted by
whoever reaches the database, private files, one live token per name, shared-token
callers while the token list is unknown, and the shared token's strength. Against the
real embedded nx-27017 and a real gRPC bridge on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from fedray.bridge.auth import AuthGate, BridgeKeys
from fedray.bridge.client_tokens import ClientTokens
from fedray.bridge.keys import check_shared_token, load_token_secret, tokens_issued
from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.wire import auth_metadata
from fedray.errors import ConfigError
from fedray.tracking.embedded import EmbeddedMongo
from fedray.tracking.loopback import free_port, mongo_uri
from fedray.tracking.store import TrackingStore
from fedray.tracking.tokens import COLLECTION, create_token, revoke_token, tracking_token_loader
from tests.bridge import TOKEN, Bridge
from tests.waiting import async_wait_until


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _gated_bridge(uri: str, db: str, keys: BridgeKeys) -> Bridge:
    load, release = tracking_token_loader(uri, db)
    tokens = ClientTokens(load, refresh_s=0.2, miss_refresh_s=0.1, release=release,
                          secret=keys.token_secret, issued=keys.tokens_issued)
    return await Bridge.start(gate=AuthGate(keys.shared_token, tokens))


async def _reread(bridge: Bridge) -> None:
    """Until the token cache's own refresh has read the rows again since this call."""
    tokens, asked = bridge.gate.tokens, time.monotonic()
    await async_wait_until(lambda: tokens._read_at > asked and tokens._inflight is None,
                           "the token cache to re-read its rows")


async def _beat(bridge: Bridge, token: str | None, name: str = "probe") -> grpc.StatusCode:
    try:
        await bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id=name),
                                    metadata=auth_metadata(token, name), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_token_rows_written_without_the_secret_verify_nothing(tmp_path, store,
                                                                    tracking_uri, db_name):
    secret = load_token_secret(tmp_path)
    alice = create_token(store, "alice", secret)
    forged_plain = "frt_" + secrets.token_urlsafe(32)  # the old, unkeyed scheme
    forged_keyed = "frt_" + secrets.token_urlsafe(32)  # keyed, but with another secret
    other = os.urandom(32)
    digest = hmac.new(other, forged_keyed.encode(), hashlib.sha256).hexdigest()
    store.db[COLLECTION].insert_many([
        {"hash": hashlib.sha256(forged_plain.encode()).hexdigest(), "name": "mallory",
         "revoked": False},
        {"hash": digest, "name": "bob", "revoked": False,
         "mac": hmac.new(other, f"{digest}\0bob".encode(), hashlib.sha256).hexdigest()},
    ])
    bridge = await _gated_bridge(tracking_uri, db_name, BridgeKeys(None, secret, True))
    try:
        assert await _beat(bridge, alice, "alice") is grpc.StatusCode.OK
        assert await _beat(bridge, forged_plain, "mallory") is grpc.StatusCode.UNAUTHENTICATED
        assert await _beat(bridge, forged_keyed, "bob") is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await bridge.close()


async def test_renamed_or_revived_rows_give_their_token_nothing(tmp_path, store, tracking_uri,
                                                               db_name):
    secret = load_token_secret(tmp_path)
    alice, carol = create_token(store, "alice", secret), create_token(store, "carol", secret)
    bridge = await _gated_bridge(tracking_uri, db_name, BridgeKeys(None, secret, True))
    try:
        assert await _beat(bridge, carol, "carol") is grpc.StatusCode.OK
        store.db[COLLECTION].update_one({"name": "alice"}, {"$set": {"name": "bob"}})
        assert revoke_token(store, "carol") == 1
        await _reread(bridge)
        assert await _beat(bridge, carol, "carol") is grpc.StatusCode.UNAUTHENTICATED
        store.db[COLLECTION].update_one({"name": "carol"}, {"$set": {"revoked": False}})
        await _reread(bridge)
        assert await _beat(bridge, alice, "bob") is grpc.StatusCode.UNAUTHENTICATED
        assert await _beat(bridge, carol, "carol") is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await bridge.close()


@pytest.mark.parametrize("issued_before", [False, True])
async def test_deleting_token_rows_does_not_reopen_the_bridge(tmp_path, store, tracking_uri,
                                                              db_name, issued_before):
    secret = load_token_secret(tmp_path)
    if issued_before:  # tokens were issued in an earlier run; someone deleted them since
        create_token(store, "alice", secret)
        store.db[COLLECTION].delete_many({})
    bridge = await _gated_bridge(tracking_uri, db_name, BridgeKeys(None, secret, issued_before))
    try:
        if not issued_before:
            assert await _beat(bridge, None) is grpc.StatusCode.OK  # never had tokens: open
            create_token(store, "alice", secret)
            await _reread(bridge)
            assert await _beat(bridge, None) is grpc.StatusCode.UNAUTHENTICATED
            store.db[COLLECTION].delete_many({})
            await _reread(bridge)
        assert await _beat(bridge, None) is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await bridge.close()


def test_the_token_secret_is_a_private_file_made_once(tmp_path):
    data_dir = tmp_path / "fed"
    secret = load_token_secret(data_dir)
    path = data_dir / "secrets" / "token.key"
    assert len(secret) == 32 and load_token_secret(data_dir) == secret
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700 and _mode(data_dir) == 0o700
    path.chmod(0o644)  # loosened by someone: tightened again, same key
    assert load_token_secret(data_dir) == secret and _mode(path) == 0o600
    assert load_token_secret(tmp_path / "none", create=False) is None


def test_the_embedded_tracking_files_are_private(tmp_path):
    server = EmbeddedMongo(tmp_path / "fed").start()
    try:
        TrackingStore.from_uri(server.uri).event("info", "test", "hello")
    finally:
        server.stop()
    folder = tmp_path / "fed" / "tracking"
    assert _mode(tmp_path / "fed") == 0o700 and _mode(folder) == 0o700
    files = sorted(p.name for p in folder.iterdir())
    assert "fedray.db" in files and "nx-27017.log" in files and "server.json" in files
    loose = {p.name: oct(_mode(p)) for p in folder.iterdir() if _mode(p) & 0o077}
    assert not loose, loose


def test_token_create_uses_the_federations_secret(tmp_path, store, tracking_uri, db_name):
    from click.testing import CliRunner

    from fedray.bridge.keys import hash_token
    from fedray.cli.main import main

    result = CliRunner().invoke(main, ["token", "create", "--name", "site-a", "--data-dir",
                                       str(tmp_path), "--tracking", tracking_uri,
                                       "--database", db_name])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    [row] = store.db[COLLECTION].find({"name": "site-a"})
    assert row["hash"] == hash_token(token, load_token_secret(tmp_path, create=False))
    assert tokens_issued(tmp_path)


# --- bookkeeping ------------------------------------------------------------------------


def test_one_name_never_has_two_live_tokens(tmp_path, store):
    secret = load_token_secret(tmp_path)
    start = threading.Barrier(12)
    made, refused = [], []

    def create() -> None:
        start.wait()
        try:
            made.append(create_token(store, "alice", secret))
        except ConfigError:
            refused.append(1)

    threads = [threading.Thread(target=create) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(refused) == 11
    assert revoke_token(store, "alice") == 1
    create_token(store, "alice", secret)  # once revoked, the name may have a new one
    assert store.db[COLLECTION].count_documents({"name": "alice", "revoked": False}) == 1


async def test_shared_token_callers_wait_until_the_token_list_was_read(tmp_path, db_name):
    port = free_port()  # tracking is down when the bridge starts
    secret = load_token_secret(tmp_path)
    bridge = await _gated_bridge(mongo_uri(port), db_name, BridgeKeys(TOKEN, secret, True))
    server = EmbeddedMongo(tmp_path, port=port)
    try:
        assert await _beat(bridge, TOKEN, "alice") is grpc.StatusCode.UNAVAILABLE
        assert await _beat(bridge, TOKEN, "carol") is grpc.StatusCode.UNAVAILABLE
        await asyncio.to_thread(server.start)
        tracking = TrackingStore.from_uri(server.uri, db_name)
        create_token(tracking, "alice", secret)
        tracking.close()
        await async_wait_until(lambda: bridge.gate.tokens.loaded
                               and "alice" in bridge.gate.tokens.names,
                               "the bridge to read the token list once tracking is up")
        assert await _beat(bridge, TOKEN, "alice") is grpc.StatusCode.PERMISSION_DENIED
        assert await _beat(bridge, TOKEN, "carol") is grpc.StatusCode.OK
    finally:
        await bridge.close()
        server.stop()


@pytest.mark.parametrize("token", ["s3cret", "e2e-token", "a" * 40, "0123456789abcdef" * 1,
                                   "ab" * 20])
def test_a_weak_shared_token_is_refused(token):
    with pytest.raises(ConfigError) as error:
        check_shared_token(token, "FEDRAY_TOKEN")
    message = str(error.value)
    assert "$FEDRAY_TOKEN" in message and "secrets.token_hex(16)" in message
    assert "\n" not in message and token not in message


@pytest.mark.parametrize("token", [secrets.token_hex(16), secrets.token_urlsafe(16),
                                   uuid.uuid4().hex, "frt_" + secrets.token_urlsafe(32)])
def test_strong_shared_tokens_pass(token):
    check_shared_token(token, "FEDRAY_TOKEN")
    check_shared_token(None, "FEDRAY_TOKEN")  # no shared token at all is a choice, not weak


def test_fedray_run_refuses_a_weak_shared_token(monkeypatch):
    from fedray.deploy.config_file import config_from_dict
    from fedray.deploy.exposure import federation_token

    config = config_from_dict({"federation": "f", "seed_model": "x",
                               "auth": {"token_env": "MY_TOKEN"}})
    monkeypatch.setenv("MY_TOKEN", "hunter2")
    with pytest.raises(ConfigError, match=r"\$MY_TOKEN"):
        federation_token(config)
    monkeypatch.setenv("MY_TOKEN", secrets.token_hex(16))
    assert federation_token(config) == os.environ["MY_TOKEN"]


def test_printed_tracking_uris_never_show_a_password(tmp_path):
    from rich.console import Console

    from fedray.deploy.runner import RunResult, print_summary, tracking_line

    uri = "mongodb://fedray:s3cr3t-Pa55@db.example.org:27017/fedray?authSource=admin"
    status = {"session_id": "s1", "state": "finished", "rounds_done": 1, "rounds_planned": 1,
              "model_id": "m" * 64, "history": []}
    result = RunResult(status=status, data_dir=tmp_path, tracking_uri=uri, gateway="g:1",
                       embedded_tracking=False)
    console = Console(record=True, width=200)
    print_summary(result, console)
    console.print(tracking_line(uri, "fedray", tmp_path))
    shown = console.export_text() + json.dumps(result.summary())
    assert "s3cr3t" not in shown
    assert "mongodb://fedray:***@db.example.org:27017/" in shown
    assert result.tracking_uri == uri  # what the run itself uses is unchanged


@pytest.mark.parametrize(("uri", "shown"), [
    ("mongodb://fl:p@ss/w?rd@db1,db2:27017/fedray?replicaSet=rs0",
     "mongodb://fl:***@db1,db2:27017/fedray?replicaSet=rs0"),
    ("mongodb://db/?tls=true&tlsCAFile=/ca.pem&tlsCertificateKeyFilePassword=hunter2-x",
     "mongodb://db/?tls=true&tlsCAFile=/ca.pem&tlsCertificateKeyFilePassword=***"),
    ("mongodb://db/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:"
     "hunter2-x,SERVICE_NAME:s", "mongodb://db/?authMechanism=MONGODB-AWS"
                                 "&authMechanismProperties=***"),
    ("mongodb://fl@db:27017/?password=hunter2-x;appname=me@lab",
     "mongodb://fl@db:27017/?password=***;appname=me@lab"),
    ("s3://models?endpoint=h:9000&access_key=AKIDhunter2-x&secret_key=hunter2-x",
     "s3://models?endpoint=h:9000&access_key=***&secret_key=***"),
])
def test_redact_masks_every_secret_of_a_uri(uri, shown):
    from fedray.tracking.store import redact

    assert redact(uri) == shown and "hunter2" not in shown and "ss/w" not in shown


def test_config_and_key_reprs_never_show_secrets():
    from fedray.bridge.auth import BridgeKeys
    from fedray.deploy.config_file import config_from_dict

    config = config_from_dict({
        "federation": "f", "seed_model": "s",
        "tracking": {"uri": "mongodb://fl:p@ss-hunter2@db:27017/?password=hunter2"},
        "storage": {"uri": "s3://models?endpoint=h:9000&access_key=a&secret_key=hunter2"}})
    keys = BridgeKeys("hunter2" * 4, b"hunter2" * 5, True)
    shown = repr(config) + repr(config.tracking) + repr(config.storage) + repr(keys)
    assert "hunter2" not in shown, shown
    assert "mongodb://fl:***@db:27017/?password=***" in shown and "secret_key=***" in shown
    assert not hasattr(config, "to_dict")  # asdict of a config would dump the URIs whole


def test_token_create_refuses_a_mistyped_or_unwritable_data_dir(tmp_path, tracking_uri,
                                                                  db_name):
    from click.testing import CliRunner

    from fedray.cli.main import main

    def create(data_dir, *extra):
        return CliRunner().invoke(main, ["token", "create", "--name", "site-a", "--data-dir",
                                         str(data_dir), *extra])

    typo = tmp_path / "digts"
    for extra in ((), ("--tracking", tracking_uri, "--database", db_name)):
        result = create(typo, *extra)
        assert result.exit_code == 2 and "not a federation's data directory" in result.output
        assert result.output.count("\n") == 1 and not typo.exists(), result.output
    (tmp_path / "fed" / "tracking").mkdir(parents=True)
    (tmp_path / "fed" / "secrets").write_text("a file where the secrets folder goes")
    result = create(tmp_path / "fed", "--tracking", tracking_uri, "--database", db_name)
    assert result.exit_code == 2, result.output
    assert "cannot create the token secret" in result.output and "Traceback" not in result.output
    store = TrackingStore.from_uri(tracking_uri, db_name)
    assert store.db[COLLECTION].count_documents({}) == 0  # no token no federation accepts
    store.db.client.drop_database(db_name)
    store.close()


async def test_a_shared_token_expires_and_rotates_without_a_restart(tmp_path, store,
                                                                   tracking_uri, db_name):
    """Issue 14, finding 5: the shared token never expired and could only be changed by a
    restart. Now one from tracking carries an expiry, and the next one replaces it live:
    created, used, the old one revoked by its id; and $FEDRAY_TOKEN revoked too."""
    from click.testing import CliRunner

    from fedray.cli.main import main

    def fedray(*args: str, env: dict | None = None):
        result = CliRunner().invoke(main, [*args, "--data-dir", str(tmp_path), "--tracking",
                                           tracking_uri, "--database", db_name], env=env)
        assert result.exit_code == 0, result.output
        return result

    old = fedray("token", "create", "--shared", "--expires", "8h").stdout.strip()
    secret = load_token_secret(tmp_path, create=False)
    bridge = await _gated_bridge(tracking_uri, db_name, BridgeKeys(TOKEN, secret, True))
    try:
        assert await _beat(bridge, old, "site-a") == grpc.StatusCode.OK
        new = fedray("token", "create", "--shared", "--expires", "8h").stdout.strip()
        rows = json.loads(fedray("token", "list", "--json").stdout)
        assert [r["kind"] for r in rows] == ["shared", "shared"]
        assert all(r["expires_at"] for r in rows)
        fedray("token", "revoke", "--id", rows[0]["id"])
        await _reread(bridge)
        assert await _beat(bridge, old, "site-a") == grpc.StatusCode.UNAUTHENTICATED
        assert await _beat(bridge, new, "site-a") == grpc.StatusCode.OK
        assert await _beat(bridge, TOKEN, "site-b") == grpc.StatusCode.OK
        fedray("token", "revoke", "--shared", env={"FEDRAY_TOKEN": TOKEN})
        await _reread(bridge)
        assert await _beat(bridge, TOKEN, "site-b") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await bridge.close()
    # An expiry is part of the row's MAC: pushing it back makes the row verify nothing.
    store.db[COLLECTION].update_many({}, {"$set": {"expires_at": None}})
    from fedray.tracking.tokens import read_token_rows

    assert not any(row.verifies(secret) for row in read_token_rows(store)
                   if row.kind == "shared" and not row.revoked)
    with pytest.raises(ConfigError, match="a duration such as"):
        from fedray.cli.common import parse_expiry

        parse_expiry("tomorrow")
