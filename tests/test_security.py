"""Integration: the bridge's security with real Ray actors, real gRPC and real TLS.

Tokens (shared and per-client, revoked without a restart), identities taken from tokens,
TLS and mutual TLS with certificates made here by the ``cryptography`` package, the
per-client RPC rate, the per-combiner client bound, and an edge process that never
listens on a port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.tls import ClientTls
from fedray.bridge.wire import auth_metadata
from fedray.cli.main import main
from fedray.deploy.config_file import config_from_dict
from fedray.deploy.federation import Federation
from fedray.errors import AuthError
from fedray.serialization import decode, encode
from fedray.storage import open_model_store
from fedray.tracking.store import TrackingStore
from tests.pki import Pki, make_pki
from tests.waiting import connections, wait_connected, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
SEED = {"w": np.zeros((4, 8), np.float32), "b": np.zeros(8, np.float32)}
TOKEN = "s3cret"


class DeltaWorker:
    def __init__(self, delta: float, examples: int = 10) -> None:
        self.delta, self.examples = delta, examples

    def train(self, model: bytes, config: dict):
        new = {k: (v + self.delta).astype(v.dtype) for k, v in decode(model).items()}
        return encode(new), self.examples, {"loss": self.delta}

    def validate(self, model: bytes, config: dict):
        return self.examples, {"accuracy": 0.5}


# --- certificates-----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- helpers ----------------------------------------------------------------------------


def _config(name: str, tmp_path, combiners: dict | None = None, tls: dict | None = None,
            **session):
    return config_from_dict({
        "federation": name, "seed_model": "unused", "data_dir": str(tmp_path),
        "controller": {"host": "127.0.0.1", "port": 0},
        "combiners": {"count": 1, "host": "127.0.0.1", "base_port": 0,
                      "heartbeat_interval_s": 0.5, "offline_after_s": 3, **(combiners or {})},
        "tracking": {"database": f"t_{name.replace('-', '_')}"},
        "session": {"rounds": 1, "min_clients": 1, "round_timeout_s": 20, "validate": False,
                    "wait_for_clients_s": 30, **session},
        "tls": tls or {},
    })


def _deploy(config, tracking_uri, token: str | None = TOKEN, seed=None):
    store = open_model_store("file", config.resolved_data_dir())
    seed_id = store.put(encode(SEED if seed is None else seed))
    return Federation(config, token, tracking_uri).deploy(), seed_id


def _channel(target: str, tls: ClientTls | None = None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, tls.credentials(), options=tls.options())


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    """The status a call ends with (OK when it returns)."""
    try:
        result = call(*args, timeout=5, **kwargs)
        if hasattr(result, "__next__"):  # a server stream: its first message or its error
            next(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _assign(target, tls=None, token=TOKEN, name="probe") -> grpc.StatusCode:
    with _channel(target, tls) as ch:
        return _code(pb_grpc.GatewayStub(ch).Assign, pb.AssignRequest(name=name),
                     metadata=auth_metadata(token, name))


def _heartbeat(target, tls=None, token=TOKEN, name="probe") -> grpc.StatusCode:
    with _channel(target, tls) as ch:
        return _code(pb_grpc.CombinerStub(ch).Heartbeat, pb.HeartbeatRequest(client_id=name),
                     metadata=auth_metadata(token, name))


def _token(*args: str) -> str:
    result = CliRunner().invoke(main, ["token", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def _events(tracking_uri, config, **flt) -> list[dict]:
    return TrackingStore.from_uri(tracking_uri, config.tracking.database).find("events", flt)


# --- TLS --------------------------------------------------------------------------------


def test_tls_clients_run_a_round_while_plaintext_and_untrusting_clients_are_refused(
        ray_session, tracking_uri, fleet, tmp_path, pki):
    config = _config("tls", tmp_path, tls={"cert": pki.path("server.pem"),
                                           "key": pki.path("server.key")})
    fed, seed_id = _deploy(config, tracking_uri)
    try:
        combiner = fed.combiner_info[0]["address"]
        member = fleet.add("site-a", DeltaWorker(1.0), fed.gateway, token=TOKEN, tls=pki.client())
        outsider = fleet.add("site-x", DeltaWorker(9.0), fed.gateway, token=TOKEN,
                             tls=pki.client(ca=pki.other_ca), backoff_initial_s=0.2)
        wait_connected(fleet, 1)

        for target, call in ((fed.gateway, _assign), (combiner, _heartbeat)):
            assert call(target, tls=pki.client()) is grpc.StatusCode.OK
            assert call(target) is grpc.StatusCode.UNAVAILABLE  # plaintext
            assert call(target, tls=pki.client(ca=pki.other_ca)) is grpc.StatusCode.UNAVAILABLE
            # TLS alone is not enough: the token is still checked
            assert call(target, tls=pki.client(), token="wrong") is grpc.StatusCode.UNAUTHENTICATED
        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()
    assert status["state"] == "finished", status
    assert member.tasks_done == 1 and outsider.tasks_done == 0
    assert not any(line.startswith("[site-x] connected") for line in fleet.lines)
    assert any(line.startswith("[site-x]") and "certificate is not trusted" in line
               for line in fleet.lines), fleet.lines


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(
        ray_session, tracking_uri, fleet, tmp_path, pki):
    config = _config("mtls", tmp_path, tls={"cert": pki.path("server.pem"),
                                            "key": pki.path("server.key"),
                                            "ca": pki.path("ca.pem")})
    fed, seed_id = _deploy(config, tracking_uri)
    try:
        combiner = fed.combiner_info[0]["address"]
        member = fleet.add("site-a", DeltaWorker(1.0), fed.gateway, token=TOKEN,
                           tls=pki.client(cert="client"))
        wait_connected(fleet, 1)
        for target, call in ((fed.gateway, _assign), (combiner, _heartbeat)):
            assert call(target, tls=pki.client(cert="client")) is grpc.StatusCode.OK
            assert call(target, tls=pki.client()) is grpc.StatusCode.UNAVAILABLE  # no cert
            assert call(target, tls=pki.client(cert="rogue")) is grpc.StatusCode.UNAVAILABLE
        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()
    assert status["state"] == "finished", status
    assert member.tasks_done == 1


# --- tokens and identities --------------------------------------------------------------


def test_per_client_tokens_give_identities_and_revoking_one_needs_no_restart(
        ray_session, tracking_uri, fleet, tmp_path):
    config = _config("client-tokens", tmp_path, min_clients=2)
    where = ["--tracking", tracking_uri, "--database", config.tracking.database,
             "--data-dir", str(tmp_path)]  # where the federation's token secret is
    fed, seed_id = _deploy(config, tracking_uri)
    try:
        # Tokens created while the federation runs work within a second (the servers read
        # new tokens in the background; the clients try again meanwhile).
        alice = _token("create", "--name", "alice", *where)
        bob = _token("create", "--name", "bob", *where)
        assert alice.startswith("frt_") and alice != bob
        # alice's client claims to be someone else: it is tracked as alice all the same.
        impostor = fleet.add("mallory", DeltaWorker(1.0, 10), fed.gateway, token=alice)
        fleet.add("bob", DeltaWorker(3.0, 30), fed.gateway, token=bob)
        wait_connected(fleet, 2)
        assert impostor.client_id == "alice"
        # Nobody can pose as a client that has its own token, not even with the shared one.
        assert _assign(fed.gateway, name="bob") is grpc.StatusCode.PERMISSION_DENIED
        assert _heartbeat(fed.combiner_info[0]["address"], name="alice") \
            is grpc.StatusCode.PERMISSION_DENIED
        assert _assign(fed.gateway, name="carol") is grpc.StatusCode.OK
        assert _assign(fed.gateway, token=None) is grpc.StatusCode.UNAUTHENTICATED
        # A flood of wrong tokens is refused (past a burst, without a word about the
        # guesses), and recorded as a bounded number of events.
        with _channel(fed.gateway) as ch:
            calls = [pb_grpc.GatewayStub(ch).Assign.future(
                pb.AssignRequest(name="x"), metadata=auth_metadata(f"guess-{i}"), timeout=10)
                for i in range(60)]
            codes = [call.exception().code() for call in calls]
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 40, codes

        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
        assert status["state"] == "finished", status

        _token("revoke", "--name", "alice", *where)
        with pytest.raises(AuthError):  # cut off within seconds, no restart
            fleet.futures[0].result(timeout=20)
        assert _heartbeat(fed.combiner_info[0]["address"], token=alice, name="alice") \
            is grpc.StatusCode.UNAUTHENTICATED
        assert _heartbeat(fed.combiner_info[0]["address"], token=bob, name="bob") \
            is grpc.StatusCode.OK
    finally:
        fed.shutdown()

    tracking = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    clients = {c["client_id"]: c for c in tracking.find("clients")}
    assert {"alice", "bob"} <= set(clients) and "mallory" not in clients
    assert clients["alice"]["name"] == "alice"
    round_doc = tracking.get_round(status["session_id"], 1)
    assert round_doc["updates"] == 2
    np.testing.assert_allclose(decode(open_model_store("file", config.resolved_data_dir())
                                      .get(status["model_id"]))["w"], 2.5)  # (10+90)/40
    refused = [e for e in _events(tracking_uri, config, level="warning")
               if e["message"].startswith("refused /")]
    wrong = [e for e in refused if e["data"]["reason"] == "wrong_token"]
    # 61 refusals of the flood (10 answered, the rest throttled), and the first tries of
    # alice and bob, refused until the servers had read their new tokens (within a second)
    assert 5 <= len(wrong) <= 16, len(wrong)
    assert wrong[0]["source"] == "controller"
    assert wrong[0]["data"]["method"] == "/fedray.v1.Gateway/Assign"
    assert wrong[0]["data"]["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert any(e["data"]["reason"] == "revoked" and "'alice'" in e["message"] for e in refused)
    claims = _events(tracking_uri, config, **{"data.reason": "claimed_name"})
    assert claims and "'mallory'" in claims[0]["message"]
    listed = _token("list", "--json", *where)
    assert '"revoked": true' in listed and "hash" not in listed


# --- bounds -----------------------------------------------------------------------------


def test_a_client_over_its_rpc_rate_gets_resource_exhausted_and_others_go_on(
        ray_session, tracking_uri, fleet, tmp_path):
    config = _config("rate-limit", tmp_path, combiners={"max_rpcs_per_s": 5})
    fed, seed_id = _deploy(config, tracking_uri)
    try:
        steady = fleet.add("steady", DeltaWorker(1.0), fed.gateway, token=TOKEN)
        wait_connected(fleet, 1)
        combiner = fed.combiner_info[0]["address"]
        with _channel(combiner) as ch:
            stub = pb_grpc.CombinerStub(ch)
            codes = [_code(stub.Heartbeat, pb.HeartbeatRequest(client_id="noisy"),
                           metadata=auth_metadata(TOKEN, "noisy")) for _ in range(40)]
        assert codes[0] is grpc.StatusCode.OK
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 20, codes
        assert _heartbeat(combiner, name="quiet") is grpc.StatusCode.OK
        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()
    assert status["state"] == "finished", status
    assert steady.tasks_done == 1
    limited = _events(tracking_uri, config, **{"data.reason": "rate_limit"})
    assert limited and "'noisy' on ipv4:127.0.0.1:" in limited[0]["message"]


def test_a_full_combiner_refuses_more_clients(ray_session, tracking_uri, fleet, tmp_path):
    config = _config("max-clients", tmp_path, combiners={"max_clients": 1})
    fed, seed_id = _deploy(config, tracking_uri)
    try:
        first = fleet.add("first", DeltaWorker(1.0), fed.gateway, token=TOKEN)
        wait_connected(fleet, 1)
        second = fleet.add("second", DeltaWorker(5.0), fed.gateway, token=TOKEN,
                           backoff_initial_s=0.2)
        wait_until(lambda: any(line.startswith("[second]") and "unavailable" in line
                               for line in fleet.lines),
                   "'second' to be told the combiner is unavailable",
                   describe=lambda: fleet.lines)
        assert _assign(fed.gateway, name="third") is grpc.StatusCode.UNAVAILABLE
        with _channel(fed.combiner_info[0]["address"]) as ch:  # straight to the combiner
            assert _code(pb_grpc.CombinerStub(ch).Join, pb.JoinRequest(client_id="third"),
                         metadata=auth_metadata(TOKEN, "third")) \
                is grpc.StatusCode.RESOURCE_EXHAUSTED
        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
    finally:
        fed.shutdown()
    assert status["state"] == "finished", status
    assert first.tasks_done == 1 and second.tasks_done == 0


# --- the edge never listens -------------------------------------------------------------


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds (from its /proc/PID/fd links)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except FileNotFoundError:  # closed while we looked
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def listening_sockets(pid: int) -> set[str]:
    """Inodes of the TCP (v4/v6) and Unix sockets that process ``pid`` listens on."""
    mine = socket_inodes(pid)
    listening = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening.add(fields[9])
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: a listening Unix socket
            listening.add(fields[6])
    return mine & listening


def test_the_listening_check_sees_a_listening_socket():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert listening_sockets(os.getpid())


def test_an_edge_process_never_listens(ray_session, tracking_uri, tmp_path):
    from examples.digits.data import write_partitions
    from examples.digits.seed import seed_model

    config = _config("no-listen", tmp_path)
    paths = write_partitions(tmp_path / "data", 1)
    fed, seed_id = _deploy(config, tracking_uri, seed=seed_model())
    env = {**os.environ, "FEDRAY_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedray", "edge", "start", "--gateway",
                             fed.gateway, "--name", "site-0", "--app", "examples.digits.app",
                             "--data", str(paths[0])], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: connections(lines), "the edge client to connect", timeout=60,
                   describe=lambda: lines)
        assert socket_inodes(proc.pid)  # it does talk: outbound connections only
        assert listening_sockets(proc.pid) == set()
        fed.start_session(seed_id)
        status = fed.follow(lambda s: None)
        assert status["state"] == "finished", (status, lines)
        assert listening_sockets(proc.pid) == set()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        fed.shutdown()
    assert any("update accepted" in line for line in lines), lines
