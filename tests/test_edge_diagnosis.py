"""Edge errors that tell the user what to do (issue 14, finding 8): the likely cause of a
failed dial and the option to change; giving up when retrying cannot help; waiting
quietly for a federation that is down; no credential sent over plaintext off loopback."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from netutil import free_ports

from fedray.bridge.addresses import is_loopback_target
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.edge.client import EdgeRunner, EdgeSettings, check_plaintext
from fedray.edge.diagnosis import DOWN, MISTAKE, RETRY, WRONG_SERVICE, diagnose
from fedray.edge.workers import CallbackWorker
from fedray.errors import ConfigError, TransportError
from tests.edge_server import ScriptedCombiner, ScriptedFederation
from tests.waiting import async_wait_until

T = "127.0.0.1:1"


@pytest.mark.parametrize("code, details, tls, action, hint", [
    ("UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: "
     "ipv4:127.0.0.1:9: Failed to connect to remote host: Connection refused", False, DOWN,
     "not running (yet), or --gateway is not its controller.port"),
    ("UNIMPLEMENTED", "Method not found!", False, WRONG_SERVICE, "a combiner's port?"),
    ("UNAVAILABLE", "Failed parsing HTTP/2 (Expected SETTINGS frame as the first frame, got "
     "frame type 79)", False, WRONG_SERVICE, "Ray's dashboard?"),
    ("UNAVAILABLE", "failed to connect to all addresses; last error: UNAVAILABLE: "
     "ipv4:127.0.0.1:9: Socket closed", False, MISTAKE, "the tracking port?"),
    ("UNAVAILABLE", "Ssl handshake failed: SSL_ERROR_SSL: error:100000f7:SSL "
     "routines:OPENSSL_internal:WRONG_VERSION_NUMBER", True, MISTAKE, "drop --ca"),
    ("UNAVAILABLE", "Handshake failed: CERTIFICATE_VERIFY_FAILED", True, MISTAKE,
     "check --ca"),
    ("UNAVAILABLE", "DNS resolution failed for nowhere:1", False, MISTAKE, "check --gateway"),
    ("UNAVAILABLE", "keepalive watchdog timeout", False, RETRY, "keepalive watchdog timeout"),
])
def test_each_dialing_mistake_is_named_with_the_option_to_change(code, details, tls, action,
                                                                   hint):
    found = diagnose(code, details, T, tls, client_cert=False)
    assert found.action == action and hint in found.why, found


def test_no_credential_crosses_plaintext_off_loopback_unless_insecure():
    token = EdgeSettings(gateway="x:1", name="a", token="t")
    check_plaintext("127.0.0.1:5", token)  # loopback: nothing crosses a network
    check_plaintext("[::1]:5", token)
    check_plaintext("10.0.0.1:5", EdgeSettings(gateway="x:1", name="a"))  # nothing to leak
    with pytest.raises(ConfigError, match="over plaintext.*--insecure"):
        check_plaintext("10.0.0.1:5", token)
    check_plaintext("10.0.0.1:5", EdgeSettings(gateway="x:1", name="a", token="t",
                                               insecure=True))
    assert is_loopback_target("localhost:1") and not is_loopback_target("fl.example.org:1")


class Counted(EdgeRunner):
    """An edge runner that counts its calls to the gateway."""

    attempts = 0

    async def _assign(self):
        self.attempts += 1
        return await super()._assign()


def _runner(gateway: str, lines: list[str], **settings) -> Counted:
    worker = CallbackWorker(lambda params, config: (params, 1, {}))
    return Counted(worker, EdgeSettings(gateway=gateway, name="site-a", backoff_initial_s=0.01,
                                        backoff_max_s=0.02, **settings), say=lines.append)


async def test_a_closed_port_is_named_once_then_waited_for_quietly():
    (port,) = free_ports(1)
    lines: list[str] = []
    runner = _runner(f"127.0.0.1:{port}", lines)
    task = asyncio.ensure_future(runner.run())
    try:
        await async_wait_until(lambda: runner.attempts >= 6, "six attempts on a closed port",
                               describe=lambda: lines)
    finally:
        runner.stop.set()
        await asyncio.wait_for(task, 10)
    assert len(lines) == 1 and "nothing listens at" in lines[0] and "quietly" in lines[0], lines


async def test_a_client_whose_federation_went_down_says_so_once():
    fed = await ScriptedFederation.start()
    lines: list[str] = []
    runner = _runner(fed.gateway, lines)
    task = asyncio.ensure_future(runner.run())
    try:
        await async_wait_until(lambda: runner.was_connected, "the client joined",
                               describe=lambda: lines)
        seen = runner.attempts
        await fed.close()
        await async_wait_until(lambda: runner.attempts >= seen + 6, "six attempts after",
                               describe=lambda: lines)
    finally:
        runner.stop.set()
        await asyncio.wait_for(task, 10)
    after = lines[lines.index(next(x for x in lines if "connected to" in x)) + 1:]
    waiting = [line for line in after if "waiting" in line]
    assert len(waiting) == 1 and "the federation is down" in waiting[0], lines
    assert len(after) <= 2, lines  # at most the lost stream, then the wait: not a line a try


async def test_dialing_a_combiner_port_as_the_gateway_ends_the_client_at_once():
    server = grpc.aio.server()
    pb_grpc.add_CombinerServicer_to_server(ScriptedCombiner(), server)  # no Gateway service
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    lines: list[str] = []
    runner = _runner(f"127.0.0.1:{port}", lines)
    try:
        with pytest.raises(TransportError, match="not a gateway .a combiner's port"):
            await asyncio.wait_for(runner.run(), 10)
    finally:
        await server.stop(0)
    assert runner.attempts == 1 and lines == [], lines


async def test_credentials_dial_a_plaintext_loopback_federation_without_tls(tmp_path):
    """A bundle carries the federation's CA, but a federation bound to loopback serves no
    TLS: on loopback (and only there) the client dials it in plaintext, saying so once."""
    from fedray.bridge.tls import ClientTls
    from tests.pki import make_pki

    pki = make_pki(tmp_path)
    fed = await ScriptedFederation.start()  # plaintext, on 127.0.0.1
    lines: list[str] = []
    runner = _runner(fed.gateway, lines, tls=ClientTls(ca=pki.ca), ca_from_credentials=True)
    task = asyncio.ensure_future(runner.run())
    try:
        await async_wait_until(lambda: runner.was_connected, "the client joined",
                               describe=lambda: lines)
    finally:
        runner.stop.set()
        await asyncio.wait_for(task, 10)
        await fed.close()
    assert sum("serves plaintext on loopback" in line for line in lines) == 1, lines
