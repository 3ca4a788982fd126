"""The bridge's gate without gRPC or Ray: tokens, identities, rate limits, event throttling,
and the TLS settings' errors."""

from __future__ import annotations

import dataclasses

import pytest

from fedray.bridge.auth import AuthGate, Caller, EventThrottle, RateLimiter, Refused
from fedray.bridge.client_tokens import ClientTokens
from fedray.bridge.keys import TokenRow, hash_token
from fedray.bridge.tls import client_tls, server_tls
from fedray.deploy.config_file import config_from_dict
from fedray.errors import ConfigError
from tests.pki import make_pki
from tests.waiting import async_wait_until as wait_until_async

BEARER = "authorization"
SECRET = b"s" * 32  # the federation's token secret


def row(token: str, name: str, revoked: bool = False) -> TokenRow:
    return TokenRow(hash_token(token, SECRET), name, revoked).signed(SECRET)


class Book:
    """A stand-in for the tokens collection: its rows, and a read count."""

    def __init__(self, **tokens: str) -> None:
        self.rows = [row(t, name) for name, t in tokens.items()]
        self.reads = 0

    def __call__(self):
        self.reads += 1
        return list(self.rows)

    def revoke(self, name: str) -> None:
        self.rows = [dataclasses.replace(r, revoked=r.revoked or r.name == name)
                     for r in self.rows]


def _tokens(book, **kwargs) -> ClientTokens:
    return ClientTokens(book, secret=SECRET, **kwargs)


def _md(token: str | None = None, name: str = "") -> dict[str, str]:
    md = {BEARER: f"Bearer {token}"} if token else {}
    if name:
        md["x-fedray-client"] = name
    return md


async def _gate(book: Book | None, shared: str | None = "s3cret", rate: float | None = None,
                events: list | None = None) -> AuthGate:
    def sink(level, message, **data):
        if events is not None:
            events.append((level, message, data))

    gate = AuthGate(shared, _tokens(book, refresh_s=3600, miss_refresh_s=0), rate, sink)
    await gate.start()
    return gate


async def test_shared_and_client_tokens_identify_the_caller_and_others_are_refused():
    events: list = []
    gate = await _gate(Book(alice="tok-a"), events=events)
    try:
        shared = gate.admit(_md("s3cret"), "/m", "ipv4:1.2.3.4:5")
        alice = gate.admit(_md("tok-a", name="mallory"), "/m", "ipv4:1.2.3.4:6")

        assert shared.kind == "shared" and alice == Caller("client", "alice")
        for md in (_md("wrong"), _md(), {BEARER: "s3cret"}, {BEARER: "Bearer "}):
            with pytest.raises(Refused) as refused:
                gate.admit(md, "/fedray.v1.Combiner/Heartbeat", "ipv4:6.6.6.6:1")
            assert refused.value.code == "UNAUTHENTICATED"
        assert len(events) == 4 and all(level == "warning" for level, _, _ in events)
        assert events[0][2] == {"reason": "wrong_token", "method": "/fedray.v1.Combiner/Heartbeat",
                                "peer": "ipv4:6.6.6.6:1"}
    finally:
        await gate.close()


async def test_identity_comes_from_the_token_and_token_names_are_reserved():
    events: list = []
    gate = await _gate(Book(alice="tok-a"), events=events)
    try:
        alice = gate.admit(_md("tok-a"), "/m", "p")
        shared = gate.admit(_md("s3cret"), "/m", "p")

        assert alice.client_id("bob", "bob") == "alice"  # claims are overridden
        assert shared.client_id("carol", "carol") == "carol"
        with pytest.raises(Refused) as refused:
            shared.client_id("alice")
        assert refused.value.code == "PERMISSION_DENIED"
        assert [d["reason"] for _, _, d in events] == ["claimed_name", "posing"]
    finally:
        await gate.close()


async def test_new_and_revoked_tokens_are_seen_without_a_restart():
    book = Book()
    revoked: list[set[str]] = []
    tokens = _tokens(book, refresh_s=3600, miss_refresh_s=0, on_revoked=revoked.append)
    gate = AuthGate(None, tokens)
    await gate.start()
    try:
        assert (gate.admit(_md(), "/m", "p")).kind == "open"  # no tokens at all yet

        book.rows.append(row("tok-b", "bob"))
        # Not known yet: no wait for it (the bridge is still open, so it is let in as
        # such), while the miss re-reads the tokens in the background.
        assert gate.admit(_md("tok-b"), "/m", "p").kind == "open"
        await tokens.settled()
        assert (gate.admit(_md("tok-b"), "/m", "p")).name == "bob"
        with pytest.raises(Refused):  # now that client tokens exist, a token is required
            gate.admit(_md(), "/m", "p")

        book.revoke("bob")
        await tokens.refresh()
        with pytest.raises(Refused) as refused:
            gate.admit(_md("tok-b"), "/m", "p")
        assert refused.value.code == "UNAUTHENTICATED" and revoked == [{"bob"}]
    finally:
        await gate.close()



async def test_a_name_revoked_and_given_a_new_token_in_one_refresh_loses_its_old_stream():
    """Revocation was tracked by name, so a new live token for the same name hid it and the
    revoked holder's task stream stayed open."""
    book = Book(bob="tok-old")
    revoked: list[set[str]] = []
    tokens = _tokens(book, refresh_s=3600, miss_refresh_s=0, on_revoked=revoked.append)
    await tokens.start()
    try:
        book.revoke("bob")
        book.rows.append(row("tok-new", "bob"))
        await tokens.refresh()
        assert revoked == [{"bob"}]
        await tokens.refresh()
        assert revoked == [{"bob"}]  # once, not on every refresh
    finally:
        await tokens.close()


async def test_token_rows_are_checked_off_the_event_loop(monkeypatch):
    import asyncio
    import threading

    loop_thread = threading.get_ident()
    checked_in: list[int] = []

    def load():
        checked_in.append(threading.get_ident())
        return [row("tok-a", "alice")]

    tokens = ClientTokens(load, secret=SECRET, refresh_s=3600)
    original = TokenRow.verifies

    def spy(self, secret):
        checked_in.append(threading.get_ident())
        return original(self, secret)

    monkeypatch.setattr(TokenRow, "verifies", spy)
    try:
        await tokens.start()
        await asyncio.sleep(0)  # one turn of the loop: the refresh task starts, still spied on
    finally:
        await tokens.close()
    assert tokens.names == {"alice"} and checked_in and loop_thread not in checked_in

async def test_unknown_tokens_reread_the_collection_about_once_per_interval():
    import asyncio
    import time

    book = Book(alice="tok-a")
    gate = AuthGate("s3cret", _tokens(book, refresh_s=3600, miss_refresh_s=0.2))
    await gate.start()

    async def guess(i: int) -> None:
        with pytest.raises(Refused):
            gate.admit(_md(f"guess-{i}"), "/m", "p")
        await asyncio.sleep(0)  # one turn of the loop between guesses: a re-read may run

    try:
        started = time.monotonic()
        await asyncio.gather(*(guess(i) for i in range(200)))
        book.rows.append(row("tok-new", "newcomer"))
        def admitted():  # a client trying again, as the edge does after UNAUTHENTICATED
            try:
                return gate.admit(_md("tok-new"), "/m", "p")
            except Refused:
                return None

        newcomer = await wait_until_async(admitted, "the new token to be read", timeout=5)
        assert newcomer.name == "newcomer"
        elapsed = time.monotonic() - started
        assert book.reads <= 3 + elapsed / 0.2, book.reads  # not one read per guess
    finally:
        await gate.close()


async def test_an_unreadable_token_collection_keeps_tokenless_callers_out():
    def broken():
        raise OSError("tracking is down")

    gate = AuthGate(None, ClientTokens(broken, refresh_s=3600))
    await gate.start()
    try:
        with pytest.raises(Refused):
            gate.admit(_md(), "/m", "p")
    finally:
        await gate.close()


async def test_each_caller_has_its_own_rate_limit():
    events: list = []
    gate = await _gate(Book(alice="tok-a"), rate=5, events=events)
    try:
        admitted = 0
        for _ in range(30):
            try:
                gate.admit(_md("tok-a"), "/m", "p")
                admitted += 1
            except Refused as exc:
                assert exc.code == "RESOURCE_EXHAUSTED"
        assert 10 <= admitted <= 11  # a two-second burst, plus what refilled meanwhile
        assert (gate.admit(_md("s3cret", name="bob"), "/m", "p")).kind == "shared"
        assert events and events[0][2]["reason"] == "rate_limit"
    finally:
        await gate.close()


def test_rate_limiter_refills_and_bounds_its_memory():
    limiter = RateLimiter(2.0, max_keys=3)
    assert [limiter.allow("a", now=0.0) for _ in range(5)] == [True] * 4 + [False]
    assert limiter.allow("a", now=0.5)  # half a second at 2/s buys one call
    for key in "bcde":
        limiter.allow(key, now=1.0)
    assert len(limiter._buckets) == 3


def test_event_throttle_counts_what_it_drops():
    throttle = EventThrottle(burst=3, every_s=10.0)
    seen = [throttle.allow(now=0.0) for _ in range(10)]
    assert [r for r, _ in seen] == [True] * 3 + [False] * 7
    assert throttle.allow(now=10.0) == (True, 7)


def _tls_config(tmp_path, **tls):
    return config_from_dict({"federation": "f", "seed_model": "x", "tls": tls},
                            source=str(tmp_path / "f.yaml"))


def test_tls_fields_are_checked_when_the_config_loads(tmp_path):
    pki = make_pki(tmp_path)
    cert, key, ca = pki.path("server.pem"), pki.path("server.key"), pki.path("ca.pem")
    cases = {
        "tls.key must be set together with tls.cert": {"cert": cert},
        "tls.key: cannot read /nope.pem": {"cert": cert, "key": "/nope.pem"},
        f"tls.key: {cert} is not a PEM private key": {"cert": cert, "key": cert},
        f"tls.ca: {key} is not a PEM certificate": {"cert": cert, "key": key, "ca": key},
        "tls.client_auth needs tls.ca": {"cert": cert, "key": key, "client_auth": True},
        "tls.cert and tls.key are needed": {"ca": ca},
        f"tls.key: {pki.path('client.key')} is not the unencrypted private key of tls.cert":
            {"cert": cert, "key": pki.path("client.key")},
    }
    for message, tls in cases.items():
        with pytest.raises(ConfigError) as error:
            _tls_config(tmp_path, **tls)
        assert message in str(error.value) and str(tmp_path / "f.yaml") in str(error.value)

    mutual = server_tls(_tls_config(tmp_path, cert=cert, key=key, ca=ca).tls)
    assert mutual is not None and mutual.require_client_cert and mutual.ca == pki.ca
    optional = server_tls(_tls_config(tmp_path, cert=cert, key=key, ca=ca, client_auth=False).tls)
    assert optional is not None and not optional.require_client_cert
    assert server_tls(_tls_config(tmp_path).tls) is None


def test_edge_tls_options_name_the_bad_one(tmp_path):
    with pytest.raises(ConfigError, match="--ca: cannot read"):
        client_tls(ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="--cert and --key go together"):
        client_tls(cert="c.pem")
    with pytest.raises(ConfigError, match="--key: .* is not the unencrypted private key"):
        pki = make_pki(tmp_path)
        client_tls(cert=pki.path("client.pem"), key=pki.path("rogue.key"))
    assert client_tls() is None
    assert client_tls(system_roots=True).ca is None


def test_edge_start_names_a_missing_certificate_file(tmp_path):
    from click.testing import CliRunner

    from fedray.cli.main import main

    result = CliRunner().invoke(main, ["edge", "start", "--gateway", "127.0.0.1:1", "--name", "a",
                                       "--ca", str(tmp_path / "ca.pem")])
    assert result.exit_code == 2
    assert f"--ca: cannot read {tmp_path / 'ca.pem'}" in result.output
