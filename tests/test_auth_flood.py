"""A flood of wrong tokens cannot shut valid clients out (issue 14, finding 2): a wrong
token is refused without waiting for the token list to be re-read, so it never holds one
of the server's concurrent-RPC slots; the per-host failure limit answers first."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc

from fedray.bridge.auth import AuthGate
from fedray.bridge.client_tokens import ClientTokens
from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.server import ServerLimits
from fedray.bridge.wire import auth_metadata
from fedray.config import CombinersConfig
from tests.bridge import TOKEN, Bridge

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"k" * 32
FLOOD_S, FLOOD_RATE = 4.0, 1200.0  # what the probe sent: ~1,200 wrong tokens a second


async def test_a_flood_of_wrong_tokens_makes_no_valid_heartbeat_fail():
    # A combiner sized for 8 clients (272 concurrent RPCs), whose gate knows client
    # tokens: every wrong token is looked up, and re-read (in the background) on a miss.
    tokens = ClientTokens(lambda: [], secret=SECRET, refresh_s=3600, miss_refresh_s=1.0)
    gate = AuthGate(TOKEN, tokens, max_rpcs_per_s=None)
    limits = ServerLimits.for_settings(CombinersConfig(max_clients=8))
    bridge = await Bridge.start(gate=gate, limits=limits)
    flood = subprocess.Popen([sys.executable, "-m", "tests.flood", bridge.address,
                              str(FLOOD_S), str(FLOOD_RATE)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    failures, beats = [], 0
    try:
        started = time.monotonic()
        while flood.poll() is None and time.monotonic() - started < FLOOD_S + 30:
            try:
                await bridge.stub.Heartbeat(pb.HeartbeatRequest(client_id="valid"),
                                            metadata=auth_metadata(TOKEN, "valid"), timeout=5)
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
            beats += 1
            await asyncio.sleep(0.2)  # behaviour: a client's heartbeat period
        out, _ = flood.communicate(timeout=30)
    finally:
        if flood.poll() is None:
            flood.kill()
        await bridge.close()
    report = json.loads(out.splitlines()[-1])
    assert beats >= 10 and failures == [], (beats, failures, report)
    assert report["sent"] / report["seconds"] >= FLOOD_RATE / 3, report  # it was a flood
    assert set(report["codes"]) <= {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}, report


async def test_an_unknown_method_is_refused_like_any_other_without_a_valid_token():
    """UNIMPLEMENTED before authentication told a scanner what the port serves (finding 7)."""
    bridge = await Bridge.start()
    try:
        nope = bridge.channel.unary_unary("/fedray.v1.Combiner/Nope",
                                          request_serializer=lambda m: b"",
                                          response_deserializer=lambda b: b)
        codes = {}
        for label, metadata in (("none", ()), ("wrong", auth_metadata("wrong")),
                                ("valid", auth_metadata(TOKEN))):
            try:
                await nope(b"", metadata=metadata, timeout=5)
                codes[label] = "OK"
            except grpc.aio.AioRpcError as exc:
                codes[label] = exc.code().name
    finally:
        await bridge.close()
    assert codes == {"none": "UNAUTHENTICATED", "wrong": "UNAUTHENTICATED",
                     "valid": "UNIMPLEMENTED"}


def test_failures_are_counted_per_ipv4_address_and_per_ipv6_slash_64():
    """One host holds a whole IPv6 /64: counting single addresses gave it 2^64 budgets."""
    from fedray.bridge.auth import peer_host

    assert peer_host("ipv4:10.0.0.1:5555") == "ipv4:10.0.0.1"
    assert peer_host("ipv6:[2001:db8:1:2:aaaa::1]:5555") == "ipv6:2001:db8:1:2::/64"
    assert peer_host("ipv6:[2001:db8:1:2:ffff::9]:6") == peer_host("ipv6:[2001:db8:1:2::1]:7")
    assert peer_host("ipv6:[2001:db8:1:3::1]:7") != peer_host("ipv6:[2001:db8:1:2::1]:7")
    assert peer_host("ipv6:[::ffff:10.0.0.1]:5555") == "ipv4:10.0.0.1"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"
