"""Keeps the embedded tracking server alive for as long as a federation runs.

If nx-27017 dies, a watcher thread (blocked on the process, not polling) starts it again
on the same port and data, so clients holding the URI reconnect by themselves. Writers
retry meanwhile (``TrackingWriter``), and the controller waits for its commit writes, so
nothing committed is lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fedray.errors import TrackingError
from fedray.tracking.embedded import EmbeddedMongo

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


class SupervisedMongo:
    def __init__(self, server: EmbeddedMongo,
                 on_restart: Callable[[int | None], None] | None = None) -> None:
        self.server = server
        self.on_restart = on_restart
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tracking-supervisor",
                                        daemon=True)

    @property
    def uri(self) -> str:
        return self.server.uri

    def start(self) -> SupervisedMongo:
        self.server.start()
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stopping.is_set():
            code = self.server.wait()
            if self._stopping.is_set():
                return
            log.warning("the embedded tracking server exited (code %s); restarting it", code)
            attempt, delay = 0, 0.0
            while True:
                if self._stopping.wait(delay):
                    return
                try:
                    self.server.start()
                    break
                except TrackingError as exc:
                    log.warning("restarting the tracking server failed (try %d): %s",
                                attempt + 1, exc)
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                attempt += 1
            self.restarts += 1
            if self.on_restart is not None:
                try:
                    self.on_restart(code)
                except Exception:  # noqa: BLE001 - a failing callback must not stop the watch
                    log.exception("tracking restart callback failed")

    def stop(self) -> None:
        self._stopping.set()
        self.server.stop()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
