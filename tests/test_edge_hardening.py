"""The edge client against a hostile or misconfigured federation, over real gRPC.

The federation is ``tests/edge_server.py``: a real gRPC server on 127.0.0.1 whose tasks and
download streams each test scripts (runaway model and package streams, path-like package
ids, TLS with the wrong CA, a token with another name). The client is the real
``EdgeRunner``, or a real ``fedray edge start`` process for what the command line decides.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.tls import ClientTls, ServerTls
from fedray.edge.client import EdgeRunner, EdgeSettings
from fedray.edge.workers import CallbackWorker, PackageWorker, RemotePackageWorker
from fedray.errors import ConfigError, TransportError
from fedray.packages import build_package, load_package
from fedray.serialization import encode
from tests.edge_server import ScriptedFederation, endless, task
from tests.pki import make_pki
from tests.waiting import async_wait_until

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BUSY_LOOP_WINDOW_S = 1.2  # watched: told to beat every 1e-6 s, a client beats every 0.5 s at most
ECHO_PACKAGE = {
    "fedray.yaml": "name: echo\nentrypoints:\n  validate: python v.py {data} {out_meta}\n",
    "v.py": "import json, os, sys\n"
            "data, meta = sys.argv[1], sys.argv[2]\n"
            "if not os.path.exists(data):\n"
            "    sys.exit(f'data file {data} does not exist')\n"
            "json.dump({'num_examples': 7, 'metrics': {}}, open(meta, 'w'))\n",
}


class Counting:
    """A worker that only looks at the model's size: no copy, so memory is the client's."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def train(self, model, config):
        raise AssertionError("no train tasks here")

    def validate(self, model, config):
        self.sizes.append(len(model))
        return 1, {}


@pytest.fixture
async def federation():
    fed = await ScriptedFederation.start()
    try:
        yield fed
    finally:
        await fed.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _package(folder: Path, files: dict[str, str] = ECHO_PACKAGE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


class Client:
    """An ``EdgeRunner`` serving in the test's own event loop, its lines kept."""

    def __init__(self, worker, gateway: str, name: str = "site-a", **settings) -> None:
        self.lines: list[str] = []
        settings.setdefault("backoff_initial_s", 0.05)
        self.runner = EdgeRunner(worker, EdgeSettings(gateway=gateway, name=name, **settings),
                                 say=self.lines.append)
        self.future = asyncio.ensure_future(self.runner.run())

    async def close(self) -> None:
        self.runner.stop.set()
        await asyncio.wait_for(self.future, 10)


async def _failure(fed: ScriptedFederation, client: Client, what: str) -> pb.EventReport:
    await async_wait_until(lambda: fed.servicer.events or client.future.done(),
                           f"an event or the client's end: {what}",
                           describe=lambda: client.lines)
    await client.close()
    assert fed.servicer.events, client.lines
    return fed.servicer.events[0]


# --- 8. bounded downloads ------------------------------------------------------------------


async def test_a_model_stream_longer_than_the_task_says_is_cut_off(federation):
    fed = federation.servicer
    runaway = task(model=b"m" * MiB)
    fed.downloads[runaway.model_id] = endless(count=64)
    client = Client(Counting(), federation.gateway)
    fed.send(runaway)
    event = await _failure(federation, client, "the runaway model to be refused")
    assert f"more than the {MiB} bytes the task announced" in event.message
    assert fed.sent[runaway.model_id] < 16 * MiB  # hung up early, not after 64 MiB


async def test_a_model_larger_than_the_client_cap_is_not_downloaded(federation):
    fed = federation.servicer
    big = task(model=b"m" * (2 * MiB))
    fed.serve(b"m" * (2 * MiB))
    client = Client(Counting(), federation.gateway, max_model_bytes=MiB)
    fed.send(big)
    event = await _failure(federation, client, "the big model to be refused")
    assert "--max-model-mb" in event.message and big.model_id not in fed.sent


async def test_a_model_download_is_assembled_in_one_buffer(federation):
    size = 32 * MiB
    model = os.urandom(1024) * (size // 1024)
    fed = federation.servicer
    fed.serve(model)
    worker = Counting()
    client = Client(worker, federation.gateway)
    await async_wait_until(lambda: fed.joins, "the client to join")
    tracemalloc.start()
    try:
        fed.send(task(model=model))
        await async_wait_until(lambda: fed.validations or fed.events,
                               "a validation or a failure", describe=lambda: client.lines)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await client.close()
    assert worker.sizes == [size], client.lines
    assert peak < 1.4 * size, f"peak {peak / MiB:.0f} MiB for a {size / MiB:.0f} MiB model"


async def _package_failure(federation, tmp_path, sha256: str, package_size: int,
                           **settings) -> pb.EventReport:
    fed = federation.servicer
    joined = len(fed.joins)
    client = Client(RemotePackageWorker(cache_dir=tmp_path / "cache"), federation.gateway,
                    **settings)
    await async_wait_until(lambda: len(fed.joins) > joined,
                           "the client to join")  # not an older one
    model = b"model"
    fed.serve(model)
    fed.send(task(model=model, package_sha256=sha256, package_size=package_size))
    return await _failure(federation, client, "the package download to be refused")


async def test_a_package_download_is_bounded_by_the_task_and_the_cap(federation, tmp_path):
    fed = federation.servicer
    sha = "ab" * 32
    fed.downloads[sha] = endless(count=32)

    event = await _package_failure(federation, tmp_path, sha, package_size=1000)
    assert "more than the 1000 bytes the task announced" in event.message
    # the server keeps yielding into gRPC's flow-control buffers until it sees the hang-up
    # (8 MiB once on a loaded machine); the stream would have gone on for 32 MiB
    assert fed.sent[sha] <= 16 * MiB
    fed.events.clear()
    event = await _package_failure(federation, tmp_path, sha, package_size=0,
                                   max_package_bytes=64 * 1024)
    assert "--max-package-mb" in event.message
    fed.events.clear()
    fed.sent.clear()
    event = await _package_failure(federation, tmp_path, sha, package_size=4 * MiB,
                                   max_package_bytes=MiB)
    assert "--max-package-mb" in event.message and sha not in fed.sent  # not even asked for
    assert not any((tmp_path / "cache").rglob("*.part")) and not any((tmp_path / "cache").rglob("*.tgz"))


async def test_a_package_sha256_that_is_not_hex_is_refused_before_any_use(federation, tmp_path):
    victim = tmp_path / "victim.tgz"  # cache/archives/../../victim.tgz
    victim.write_bytes(b"precious")
    event = await _package_failure(federation, tmp_path, "../../victim", package_size=0)
    assert "is not a sha256 (64 lowercase hex characters)" in event.message
    assert victim.read_bytes() == b"precious"
    assert not federation.servicer.sent  # nothing was asked for with it either


# --- 7. remote code only over TLS, when pinned, or when the operator says so -----------------


async def test_a_pinned_client_runs_only_the_pinned_package(federation, tmp_path):
    fed = federation.servicer
    pinned = build_package(_package(tmp_path / "echo"), tmp_path / "echo.tgz")
    other = _package(tmp_path / "other", {**ECHO_PACKAGE, "v.py": ECHO_PACKAGE["v.py"] + "#\n"})
    other_sha = build_package(other, tmp_path / "other.tgz")
    fed.serve((tmp_path / "echo.tgz").read_bytes())
    fed.serve((tmp_path / "other.tgz").read_bytes())
    model = b"model"
    fed.serve(model)
    data = tmp_path / "data.npz"
    data.write_bytes(b"")
    worker = RemotePackageWorker(str(data), cache_dir=tmp_path / "cache", pinned_sha256=pinned)
    client = Client(worker, federation.gateway)
    fed.send(task(model=model, package_sha256=other_sha))
    fed.send(task(model=model, package_sha256=pinned))
    await async_wait_until(lambda: fed.validations, "a validation",
                           describe=lambda: client.lines)
    await client.close()
    assert len(fed.events) == 1 and "pinned" in fed.events[0].message
    assert other_sha not in fed.sent  # never downloaded, let alone run
    assert fed.validations[0].num_examples == 7 and worker.sha256 == pinned


def _edge_start(*args: str, cwd: Path = ROOT, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FEDRAY_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "fedray", "edge", "start", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _refused(args: list[str], needle: str) -> None:
    """``fedray edge start`` with ``args`` exits 2 with one line on stderr that has ``needle``."""
    result = _edge_start("--gateway", "127.0.0.1:1", "--name", "n", *args)
    assert result.returncode == 2, result
    assert needle in result.stderr and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize(("args", "needle"), [
    ([], "add --package-sha256 HEX or --insecure"),
    (["--package", "remote"], "add --package-sha256 HEX or --insecure"),
    (["--package-sha256", "abc"], "--package-sha256: 'abc' is not a sha256"),
    (["--app", "examples.digits.app", "--package-sha256", "ab" * 32], "goes with --package remote"),
])
def test_edge_start_refuses_remote_code_over_plaintext_unless_pinned(args, needle):
    _refused(args, needle)


@pytest.mark.parametrize("trust", [["--insecure"], ["--package-sha256", "ab" * 32]])
async def test_edge_start_runs_remote_code_over_plaintext_when_told_to(federation, trust):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedray", "edge", "start", "--gateway", federation.gateway,
        "--name", "site-a", *trust, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await async_wait_until(lambda: federation.servicer.joins or proc.returncode is not None,
                               "the client to join (or end)", timeout=30)
    finally:
        if proc.returncode is None:
            proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert federation.servicer.joins, out.decode()


# --- 12. secrets stay out of reprs and out of the package's environment ---------------------


def test_reprs_hide_tokens_and_private_keys(pki):
    tls = ClientTls(ca=pki.ca, cert=pki.read("client.pem"), key=pki.read("client.key"))
    settings = EdgeSettings(gateway="g:1", name="n", token="s3cret-token", tls=tls)
    server = ServerTls(cert=pki.read("server.pem"), key=pki.read("server.key"))
    assert "s3cret-token" not in repr(settings) and "PRIVATE KEY" not in repr(settings)
    assert "PRIVATE KEY" not in repr(server)


def test_the_package_process_gets_no_token(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRAY_TOKEN", "shared-token-1")
    monkeypatch.setenv("SITE_FL_TOKEN", "client-token-2")  # a token kept under another name
    dump = "import json, os, sys\njson.dump(dict(os.environ), open(sys.argv[1], 'w'))\n" \
           "json.dump({'num_examples': 1}, open(sys.argv[2], 'w'))\n"
    package = load_package(_package(tmp_path / "pkg", {**ECHO_PACKAGE, "v.py": dump}))
    env_file = tmp_path / "env.json"
    PackageWorker(package, str(env_file), secrets=("client-token-2",)).validate(b"", {})
    env = json.loads(env_file.read_text())
    assert "FEDRAY_TOKEN" not in env and "SITE_FL_TOKEN" not in env
    assert env["FEDRAY_DATA"] == str(env_file) and "PATH" in env


# The client as a process of a non-root user (root drops to nobody first, as root reads
# any /proc/<pid>/environ): it hides its token, then a child of the same user looks for it.
_TOKEN_PROBE = """
import ctypes, json, os, shutil, subprocess, sys
from fedray.edge.cli import hide_token_from_children
cat, env = shutil.which("cat"), shutil.which("env")
if os.geteuid() == 0:
    os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # dumpable again, as a login's processes are
hidden = hide_token_from_children()
parent = subprocess.run([cat, f"/proc/{os.getpid()}/environ"], capture_output=True)
own = subprocess.run([env], capture_output=True)
print(json.dumps({"dumpable_off": hidden, "in_os_environ": "FEDRAY_TOKEN" in os.environ,
                  "parent_environ_read": b"FEDRAY_TOKEN=" in parent.stdout,
                  "child_env": b"FEDRAY_TOKEN=" in own.stdout}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")
def test_a_child_of_the_same_user_cannot_read_the_clients_token():
    env = {**os.environ, "FEDRAY_TOKEN": "frt_secret_1", "PYTHONPATH": str(ROOT)}
    env.pop("FEDRAY_RUN", None)
    result = subprocess.run([sys.executable, "-c", _TOKEN_PROBE], cwd="/", env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"dumpable_off": True, "in_os_environ": False,
                                         "parent_environ_read": False, "child_env": False}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")
def test_a_client_started_by_fedray_demo_stays_findable_by_its_run_mark():
    """A non-dumpable client's environ cannot be read by its own (non-root) user, so the
    command that started it could no longer find it by its FEDRAY_RUN mark to sweep it."""
    env = {**os.environ, "FEDRAY_TOKEN": "frt_secret_1", "PYTHONPATH": str(ROOT),
           "FEDRAY_RUN": "run-1234"}
    result = subprocess.run([sys.executable, "-c", _TOKEN_PROBE], cwd="/", env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["dumpable_off"] is False and seen["in_os_environ"] is False
    assert seen["child_env"] is False


async def test_a_combiner_cannot_make_the_client_beat_in_a_busy_loop(federation):
    federation.servicer.heartbeat_interval_s = 1e-6
    client = Client(Counting(), federation.gateway, heartbeat_s=0.5)
    await async_wait_until(lambda: federation.servicer.heartbeats, "a first heartbeat",
                           describe=lambda: client.lines)
    await asyncio.sleep(BUSY_LOOP_WINDOW_S)  # behaviour: the window a busy loop would fill
    beats = federation.servicer.heartbeats
    await client.close()
    assert beats <= 5, beats  # every 0.5 s at most, not thousands
    from fedray.edge.client import heartbeat_interval

    assert [heartbeat_interval(s, 2.0) for s in (0.0, -1.0, float("nan"), 7.0, 3600.0,
                                                 float("inf"))] == [2.0, 0.5, 2.0, 7.0, 60.0, 60.0]


async def test_a_package_fetch_that_fails_to_start_leaves_no_open_file(tmp_path, monkeypatch):
    import tempfile

    from fedray.edge import downloads

    made = []
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, path = real(*args, **kwargs)
        made.append((fd, os.fstat(fd).st_ino))
        return fd, path

    class Broken:
        def FetchPackage(self, request, metadata):
            raise RuntimeError("the channel is closed")

    monkeypatch.setattr(downloads.tempfile, "mkstemp", mkstemp)
    with pytest.raises(RuntimeError, match="channel is closed"):
        await downloads.fetch_package(Broken(), (), "a", "0" * 64, 10, MiB, tmp_path / "p.tgz")
    ((fd, inode),) = made
    try:
        still_open = os.fstat(fd).st_ino == inode  # (a reused number is another file)
    except OSError:
        still_open = False
    if still_open:
        os.close(fd)
    assert not still_open, "the .part file's descriptor was left open"
    assert list(tmp_path.iterdir()) == []


async def test_client_event_messages_lose_their_control_characters(bridge):
    from tests.bridge import METADATA

    tasks = await bridge.open_round(["a", "good"])
    events: list[str] = []
    bridge.core.listener.event = lambda level, message, **data: events.append(message)
    hostile = "boom\x1b[2J\x1b]0;pwned\x07\rX\x08\x9b\u202e\nnext line\tcol"
    await bridge.stub.PushEvent(pb.EventReport(client_id="a", level="warning", message=hostile),
                                metadata=METADATA)
    await bridge.stub.PushEvent(pb.EventReport(client_id="a", level="error", message=hostile,
                                               task_id=tasks["a"].task_id,
                                               error_class="Bad\x1bClass"),
                                metadata=METADATA)
    assert len(events) == 2, events
    for message in events:
        assert "boom" in message and "X" in message and "next line\tcol" in message
        assert not any(c in message for c in "\x1b\x07\r\x08\x9b\u202e"), repr(message)
        assert "[2J" not in message and "pwned" not in message


def test_the_events_table_shows_no_terminal_escapes():
    from fedray.tracking.query import render_table

    console = Console(record=True, width=100, color_system=None)
    render_table("events", [{"level": "error", "source": "combiner-0",
                             "message": "client x: \x1b[31mred\x1b[0m \x1b]8;;http://e\x07link"}],
                 console)
    text = console.export_text()
    assert "\x1b" not in text and "red" in text and "link" in text


# --- 18. a relative --data works with a local package -----------------------------------


async def test_a_local_package_gets_a_relative_data_path_resolved(federation, tmp_path):
    _package(tmp_path / "pkg")
    (tmp_path / "site-data").mkdir()
    (tmp_path / "site-data" / "client-0.npz").write_bytes(b"")
    model = b"model"
    federation.servicer.serve(model)
    federation.servicer.send(task(model=model))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedray", "edge", "start", "--gateway", federation.gateway,
        "--name", "site-a", "--package", "pkg", "--data", "site-data/client-0.npz",
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        fed = federation.servicer
        await async_wait_until(lambda: fed.validations or fed.events,
                               "a validation or a failure", timeout=30)
    finally:
        proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert [e.message for e in federation.servicer.events] == [], out.decode()
    assert federation.servicer.validations[0].num_examples == 7


def test_edge_start_refuses_a_data_path_that_does_not_exist():
    _refused(["--app", "examples.digits.app", "--data", "no/such.npz"],
             "--data: no/such.npz does not exist")


# --- 19. a failed task reports its class and one line, the traceback stays home -------------


def _failing_train(params, config):
    def deep():
        raise ValueError("learning rate must be positive\n(got -1)")

    deep()


@pytest.mark.parametrize("share", [False, True])
async def test_a_failed_task_sends_its_class_and_one_line(federation, share):
    fed = federation.servicer
    model = encode({"w": np.zeros(3, np.float32)})
    fed.serve(model)
    client = Client(CallbackWorker(_failing_train), federation.gateway, share_tracebacks=share)
    fed.send(task("train", model=model))
    event = await _failure(federation, client, "the failure event")
    assert event.error_class == "ValueError" and event.level == "error"
    local = "\n".join(client.lines)
    assert "Traceback" in local and __file__ in local and "(got -1)" in local
    if share:
        assert "Traceback" in event.message and "in deep" in event.message
    else:
        assert event.message == "learning rate must be positive"


async def test_the_combiner_records_the_error_class_with_the_message(bridge):
    from tests.bridge import METADATA

    tasks = await bridge.open_round(["a", "good"])
    events: list[str] = []
    bridge.core.listener.event = lambda level, message, **data: events.append(message)
    await bridge.stub.PushEvent(pb.EventReport(client_id="a", level="error", message="bad lr",
                                               task_id=tasks["a"].task_id,
                                               error_class="ValueError"),
                                metadata=METADATA)
    assert any(f"failed task {tasks['a'].task_id[:12]}" in m and m.endswith(": ValueError: bad lr")
               for m in events), events


# --- 20. permanent TLS mistakes end the client ---------------------------------------------


@pytest.mark.parametrize("mistake", ["plaintext", "wrong CA", "no client certificate",
                                     "TLS to plaintext"])
async def test_a_tls_mistake_stops_the_client_after_a_few_tries(pki, mistake):
    mutual = mistake == "no client certificate"
    server = ServerTls(cert=pki.read("server.pem"), key=pki.read("server.key"),
                       ca=pki.ca if mutual else None, require_client_cert=mutual)
    fed = await ScriptedFederation.start(tls=None if mistake == "TLS to plaintext" else server)
    tls = {"plaintext": None, "wrong CA": ClientTls(ca=pki.other_ca),
           "no client certificate": ClientTls(ca=pki.ca),
           "TLS to plaintext": ClientTls(ca=pki.ca)}[mistake]
    try:
        client = Client(Counting(), fed.gateway, tls=tls)
        with pytest.raises(TransportError) as error:
            await asyncio.wait_for(client.future, 10)
    finally:
        await fed.close()
    hint = {"plaintext": "--ca", "wrong CA": "not trusted", "no client certificate": "--cert/--key",
            "TLS to plaintext": "the server speaks plaintext"}[mistake]
    assert hint in str(error.value) and "3 times in a row" in str(error.value)
    assert len([line for line in client.lines if "retrying" in line]) == 2, client.lines


async def test_edge_start_exits_7_on_a_wrong_ca_without_grpc_noise(pki, tmp_path):
    server = ServerTls(cert=pki.read("server.pem"), key=pki.read("server.key"))
    fed = await ScriptedFederation.start(tls=server)
    (tmp_path / "noop.py").write_text("def train(params, config):\n    return params, 1, {}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE")}
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedray", "edge", "start", "--gateway", fed.gateway,
            "--name", "site-a", "--app", "noop", "--ca", pki.path("other-ca.pem"), cwd=tmp_path,
            env={**env, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await fed.close()
    stderr = err.decode()
    assert proc.returncode == 7, (out, stderr)
    assert "ssl_transport_security" not in stderr and "Handshake failed" not in stderr, stderr
    assert stderr.count("\n") == 1 and "certificate is not trusted" in stderr, stderr


# --- 21. the name the server uses -----------------------------------------------------------


async def test_a_client_is_told_when_its_token_names_it_otherwise(federation):
    federation.servicer.identity = "alice"
    client = Client(Counting(), federation.gateway, name="mallory")
    await async_wait_until(lambda: federation.servicer.joins, "a join")
    await client.close()
    expected = "connected as alice (the name of your token); --name mallory is ignored"
    assert sum(expected in line for line in client.lines) == 1, client.lines
    assert federation.servicer.joins[0].client_id == "alice"


# --- attrs ----------------------------------------------------------------------------------


async def test_attrs_reach_the_combiner(federation, bridge):
    from tests.bridge import TOKEN

    federation.servicer.address = bridge.address  # the gateway sends the client to the bridge
    attrs = {"site": "eu-west", "gpu": "0", "os.version": "12.1-rc"}
    client = Client(Counting(), federation.gateway, name="site-a", token=TOKEN, attrs=attrs)
    await async_wait_until(lambda: "site-a" in bridge.core.clients, "site-a to join",
                           describe=lambda: client.lines)
    await client.close()
    assert bridge.core.clients["site-a"].attrs == attrs


@pytest.mark.parametrize(("attrs", "needle"), [
    ({f"k{i}": "v" for i in range(33)}, "at most 32"),
    ({"bad key": "v"}, "'bad key'"),
    ({"": "v"}, "''"),
    ({"k" * 65: "v"}, "kkkk"),
    ({"site": "x" * 257}, "256"),
    ({"site": "eu\x1b[31m"}, "printable"),
])
def test_bad_attrs_are_refused_naming_the_attr(attrs, needle):
    with pytest.raises(ConfigError, match="--attr") as error:
        EdgeSettings(gateway="g:1", name="n", attrs=attrs)
    assert needle in str(error.value)


@pytest.mark.parametrize(("args", "needle"), [
    (["--attr", "site"], "--attr site: expected KEY=VALUE"),
    (["--attr", "a=1", "--attr", "a=2"], "--attr a: given twice"),
    (["--attr", "bad key=1"], "--attr 'bad key': a key is"),
])
def test_edge_start_refuses_bad_attrs(args, needle):
    _refused(["--app", "examples.digits.app", *args], needle)
