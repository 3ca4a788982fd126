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
