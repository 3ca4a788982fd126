"""Identity by key pair, without gRPC or Ray: signed calls, the gate's verdicts and their
reasons, credential rows and their MACs, bundles on disk, shared tokens that expire, and
the federation's own CA."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

from fedray.bridge.auth import AuthGate, Caller, Refused
from fedray.bridge.client_tokens import ClientTokens
from fedray.bridge.credential import CredentialBundle, read_bundle
from fedray.bridge.identity import (
    KEY_HEADER,
    MAX_SKEW_S,
    SIG_HEADER,
    CallSigner,
    ClientKey,
    SignatureCheck,
    fingerprint,
)
from fedray.bridge.keys import TokenRow, federation_id, hash_token, row_mac
from fedray.errors import ConfigError

SECRET = b"k" * 32
FEDERATION = federation_id(SECRET)


class Book:
    """A stand-in for the tokens collection."""

    def __init__(self, *rows: TokenRow) -> None:
        self.rows = list(rows)

    def __call__(self):
        return list(self.rows)


def key_row(name: str, key: ClientKey, **terms) -> TokenRow:
    return TokenRow(fingerprint(key.public), name, kind="key", public_key=key.public.hex(),
                    **terms).signed(SECRET)


async def _gate(book: Book, shared: str | None = None, events: list | None = None) -> AuthGate:
    def sink(level, message, **data):
        if events is not None:
            events.append(data["reason"])

    tokens = ClientTokens(book, secret=SECRET, refresh_s=3600, miss_refresh_s=0)
    gate = AuthGate(shared, tokens, on_event=sink)
    await gate.start()
    return gate


def _md(signer: CallSigner) -> dict[str, str]:
    return dict(signer.metadata())


def _refusal(gate: AuthGate, md: dict) -> Refused:
    with pytest.raises(Refused) as refused:
        gate.admit(md, "/fedray.v1.Gateway/Assign", "ipv4:10.0.0.9:1")
    assert refused.value.code == "UNAUTHENTICATED"
    return refused.value


async def test_a_registered_key_is_its_name_and_each_refusal_says_why():
    alice, bob, carol, dave = (ClientKey.generate() for _ in range(4))
    book = Book(key_row("alice", alice), dataclasses.replace(key_row("bob", bob), revoked=True),
                key_row("dave", dave, expires_at=time.time() - 1))
    events: list[str] = []
    gate = await _gate(book, events=events)
    try:
        caller = gate.admit(_md(CallSigner(alice, FEDERATION)), "/m", "ipv4:10.0.0.1:5")
        assert caller == Caller("client", "alice")
        assert caller.client_id("mallory", "mallory") == "alice"  # claims do not count

        revoked = _refusal(gate, _md(CallSigner(bob, FEDERATION)))
        assert "'bob' was revoked" in revoked.message
        expired = _refusal(gate, _md(CallSigner(dave, FEDERATION)))
        assert "expired" in expired.message
        unknown = _refusal(gate, _md(CallSigner(carol, FEDERATION)))
        assert "not registered" in unknown.message
        other = _refusal(gate, _md(CallSigner(alice, federation_id(b"o" * 32))))
        assert "another federation" in other.message

        # Alice's public key with a signature made by another key: refused, never Alice.
        forged = _md(CallSigner(alice, FEDERATION))
        forged[SIG_HEADER] = _md(CallSigner(carol, FEDERATION))[SIG_HEADER]
        assert "does not verify" in _refusal(gate, forged).message
        assert "not an Ed25519" in _refusal(gate, {KEY_HEADER: "!" * 43}).message
        assert events == ["claimed_name", "revoked", "expired", "unknown_key", "other_federation",
                          "bad_signature", "bad_key"]
    finally:
        await gate.close()


async def test_a_key_revoked_while_connected_is_refused_after_the_next_read():
    alice = ClientKey.generate()
    book = Book(key_row("alice", alice))
    gate = await _gate(book)
    try:
        md = _md(CallSigner(alice, FEDERATION))
        assert gate.admit(md, "/m", "p").name == "alice"
        book.rows = [dataclasses.replace(r, revoked=True) for r in book.rows]
        await gate.tokens.refresh()
        assert "revoked" in _refusal(gate, md).message
    finally:
        await gate.close()


def test_signatures_are_per_window_checked_once_and_refused_when_old(monkeypatch):
    import fedray.bridge.identity as identity

    key = ClientKey.generate()
    public = key.public
    now = [1_000_000.0]
    signer = CallSigner(key, FEDERATION, clock=lambda: now[0])
    first = signer.metadata()
    assert signer.metadata() is first  # one signature per window, reused
    check = SignatureCheck(FEDERATION, clock=lambda: now[0])
    md = dict(first)
    assert check.why_not(public, md["x-fedray-ts"], md[SIG_HEADER]) == ""
    monkeypatch.setattr(identity, "_ed25519", lambda: pytest.fail("verified twice"))
    assert check.why_not(public, md["x-fedray-ts"], md[SIG_HEADER]) == ""  # a lookup
    now[0] += MAX_SKEW_S + 120
    assert "clock" in check.why_not(public, md["x-fedray-ts"], md[SIG_HEADER])
    monkeypatch.undo()
    assert dict(signer.metadata())["x-fedray-ts"] != md["x-fedray-ts"]  # signed anew


def test_row_macs_bind_kind_key_and_expiry_and_old_rows_still_verify():
    token_row = TokenRow(hash_token("frt_x", SECRET), "alice").signed(SECRET)
    assert token_row.mac == row_mac(SECRET, token_row.hash, "alice")  # as before kinds
    assert token_row.verifies(SECRET) and not token_row.verifies(b"z" * 32)
    key = ClientKey.generate()
    row = key_row("alice", key, expires_at=time.time() + 60)
    assert row.verifies(SECRET)
    for change in ({"expires_at": None}, {"kind": "token"}, {"name": "bob"},
                   {"public_key": ClientKey.generate().public.hex()}):
        assert not dataclasses.replace(row, **change).verifies(SECRET), change


async def test_shared_tokens_from_tracking_expire_and_the_env_token_can_be_revoked():
    live = TokenRow(hash_token("frt_live", SECRET), "shared", kind="shared",
                    expires_at=time.time() + 60).signed(SECRET)
    old = TokenRow(hash_token("frt_old", SECRET), "shared", kind="shared",
                   expires_at=time.time() - 1).signed(SECRET)
    book = Book(live, old)
    gate = await _gate(book, shared="env-token-0123456789abcdef")
    try:
        md = {"authorization": "Bearer frt_live", "x-fedray-client": "site-9"}
        caller = gate.admit(md, "/m", "p")
        assert caller.kind == "shared" and caller.client_id("site-9") == "site-9"
        assert "shared" not in gate.tokens.names  # a shared row reserves no name
        assert _refusal(gate, {"authorization": "Bearer frt_old"}).reason == "expired"
        env = {"authorization": "Bearer env-token-0123456789abcdef"}
        assert gate.admit(env, "/m", "p").kind == "shared"
        book.rows.append(TokenRow(hash_token("env-token-0123456789abcdef", SECRET), "shared",
                                  revoked=True, kind="shared").signed(SECRET))
        await gate.tokens.refresh()
        assert _refusal(gate, env).reason == "revoked"
    finally:
        await gate.close()


async def test_a_caller_without_any_credential_is_told_it_needs_one():
    gate = await _gate(Book(key_row("alice", ClientKey.generate())))
    try:
        assert "none was sent" in _refusal(gate, {}).message
    finally:
        await gate.close()


def test_a_bundle_round_trips_and_a_readable_or_foreign_file_is_refused(tmp_path):
    key = ClientKey.generate()
    bundle = CredentialBundle("site-a", FEDERATION, key, "fl.example.org:12080",
                              b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
                              {"region": "eu"})
    path = tmp_path / "site-a.fedray.json"
    bundle.write(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = read_bundle(path)
    assert again == bundle and again.key.public == key.public
    assert "private_key" not in repr(again) and key.hex() not in repr(again)
    with pytest.raises(ConfigError, match="exists"):
        bundle.write(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_bundle(path)
    (tmp_path / "x.json").write_text(json.dumps({"format": "something else"}))
    os.chmod(tmp_path / "x.json", 0o600)
    with pytest.raises(ConfigError, match="not a fedray credential bundle"):
        read_bundle(tmp_path / "x.json")
    doc = bundle.to_json() | {"private_key": "00"}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    os.chmod(tmp_path / "bad.json", 0o600)
    with pytest.raises(ConfigError, match="not an Ed25519 private key"):
        read_bundle(tmp_path / "bad.json")


def test_the_federation_ca_signs_a_server_certificate_for_every_dialable_host(tmp_path):
    from cryptography import x509

    from fedray.deploy.certificates import dialable_hosts, federation_ca, server_tls_for

    ca, ca_key = federation_ca(tmp_path)
    assert federation_ca(tmp_path) == (ca, ca_key)  # made once
    assert oct((tmp_path / "tls" / "ca.key").stat().st_mode & 0o777) == "0o600"
    hosts = dialable_hosts(["0.0.0.0", "fl.example.org", "auto"])
    assert {"127.0.0.1", "localhost", "fl.example.org"} <= set(hosts) and "0.0.0.0" not in hosts
    first = server_tls_for(tmp_path, hosts)
    assert oct((tmp_path / "tls" / "server.key").stat().st_mode & 0o777) == "0o600"
    assert server_tls_for(tmp_path, hosts).cert == first.cert  # reused while it covers them
    wider = server_tls_for(tmp_path, [*hosts, "10.1.2.3"])
    assert wider.cert != first.cert
    cert = x509.load_pem_x509_certificate(wider.cert)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.1.2.3" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert cert.issuer == x509.load_pem_x509_certificate(ca).subject


def test_the_python_client_takes_its_name_gateway_ca_and_key_from_a_bundle(tmp_path):
    import fedray

    bundle = CredentialBundle("site-b", FEDERATION, ClientKey.generate(), "127.0.0.1:9",
                              b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
                              {"region": "eu"})
    bundle.write(tmp_path / "b.json")
    runner = fedray.EdgeClient(train=lambda p, c: (p, 1, {})).runner(
        credentials=tmp_path / "b.json", attrs={"gpu": "0"})
    settings = runner.settings
    assert (settings.name, settings.gateway, settings.token) == ("site-b", "127.0.0.1:9", None)
    assert settings.attrs == {"region": "eu", "gpu": "0"} and settings.tls.ca == bundle.ca
    assert dict(runner.metadata)["x-fedray-federation"] == FEDERATION
    with pytest.raises(ConfigError, match="gateway= and name="):
        fedray.EdgeClient(train=lambda p, c: (p, 1, {})).runner()
