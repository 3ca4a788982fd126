"""The HTTP API's server: uvicorn on a thread of its own, its socket bound by us.

Binding here (not in uvicorn) lets a port that is taken fall back to a free one with a
line that says so, and tells the caller the address before anything is served. uvicorn
runs its own event loop on the thread and installs no signal handler there: Ctrl-C and
SIGTERM stay with the command (``fedray.deploy.lifecycle``), which calls ``stop``.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import Any

from fedray.errors import ListenError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


def bind(host: str, port: int) -> tuple[socket.socket, bool]:
    """A listening socket on ``host:port`` (a free port if that one is taken); and whether
    it fell back."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for attempt, want in enumerate((port, 0) if port else (0,)):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, want))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE and attempt == 0 and port:
                continue
            raise ListenError(f"{host}:{want}", f"the API: {exc.strerror} (api.host, "
                              "api.port)", exc.errno == errno.EADDRINUSE) from None
        sock.listen(128)
        sock.setblocking(False)
        return sock, attempt > 0
    raise AssertionError("unreachable")  # pragma: no cover


class ApiServer:
    """``app`` served on ``host:port`` until ``stop``."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        self.sock, self.fell_back = bind(host, port)
        bound = self.sock.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}"
        self.port = bound[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="fedray-api", daemon=True)

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self.sock])
        except Exception:  # noqa: BLE001 - said in the log; the federation keeps running
            log.exception("the HTTP API stopped")

    def start(self) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise ListenError(self.url, f"the API did not start in {START_TIMEOUT_S:g}s")
            time.sleep(0.02)  # waiting for uvicorn's startup flag, which has no event
        if not self._server.started:
            raise ListenError(self.url, "the API failed to start (see the log)")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)
        self.sock.close()
