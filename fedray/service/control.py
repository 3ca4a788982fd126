"""The live half of the API: submit, stop and follow sessions on a running federation.

``LiveControl`` holds the deployment (``fedray.deploy.runner.Deployment``) and speaks to
the controller actor through Ray. It turns a ``SessionAsk`` into a ``SessionRequest``:
the config checked (``fedray.service.requests``), the seed loaded and stored, a new
compute package built and served by every combiner before the session is queued. Every
Ray failure leaves here as a ``FedrayError`` (``fedray.deploy.federation.ray_errors``).
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from typing import Any

import ray

from fedray.actors.controller.queue import SessionRequest
from fedray.deploy.federation import ray_errors
from fedray.deploy.runner import Deployment
from fedray.deploy.seeds import load_seed, resolve_seed, session_package
from fedray.service.requests import SessionAsk, session_config
from fedray.text import redact

CALL_TIMEOUT_S = 30.0
WATCH_MAX_S = 25.0  # one long poll of the status; clients ask again


class LiveControl:
    def __init__(self, up: Deployment, api_url: str = "") -> None:
        self.up = up
        self.api_url = api_url
        self._lock = threading.Lock()  # one submission at a time: seeds and packages

    @property
    def controller(self) -> Any:
        return self.up.federation.controller

    def _get(self, ref: Any, what: str, timeout: float = CALL_TIMEOUT_S) -> Any:
        with ray_errors(what):
            return ray.get(ref, timeout=timeout)

    def info(self) -> dict[str, Any]:
        up, config = self.up, self.up.config
        return {"federation": config.federation, "live": True, "pid": os.getpid(),
                "host": socket.gethostname(),
                "gateway": up.federation.gateway,
                "combiners": [{"name": c["name"], "address": c["address"]}
                              for c in up.federation.combiner_info],
                "tracking": redact(up.tracking_uri), "database": config.tracking.database,
                "ray_address": up.ray_address, "data_dir": str(up.data_dir),
                "api": self.api_url, "web": self.api_url + "/" if self.api_url else "",
                "tls": up.transport != "plaintext",
                "package": up.package[2] if up.package else None}

    def submit(self, ask: SessionAsk) -> dict[str, Any]:
        """Check, prepare and queue a session; its id and place in the queue."""
        config = session_config(self.up.config, ask)
        with self._lock:
            seed_id = "" if config.session.continue_from else self._seed(config)
            sha256, size = self._package(config)
            request = SessionRequest(uuid.uuid4().hex[:16], config.session, seed_id, sha256,
                                     size, ask.submitted_by or "api")
            return self._get(self.controller.submit_session.remote(request),
                             "submitting the session")

    def _seed(self, config) -> str:
        up = self.up
        if config.seed_model == up.config.seed_model:
            return up.seed_id  # stored when the federation came up
        return up.store.put(load_seed(config.seed_model, up.store,
                                      lambda ref: resolve_seed(up.tracking_uri, config, ref)))

    def _package(self, config) -> tuple[str, int]:
        up = self.up
        if config.package == up.config.package:
            return (up.package[0], len(up.package[1])) if up.package else ("", 0)
        package = session_package(config.package, up.data_dir)
        if package is None:
            return "", 0
        up.federation.serve_package(package[0], package[1])
        return package[0], len(package[1])

    def stop(self, session_id: str, by: str, reason: str = "") -> dict[str, Any]:
        return self._get(self.controller.stop_session.remote(session_id, by, reason),
                         "stopping the session")

    def queue(self) -> dict[str, Any]:
        return self._get(self.controller.session_list.remote(), "listing the sessions")

    def watch(self, version: int, timeout_s: float, after: int | None) -> dict[str, Any]:
        """The current session's status once newer than ``version`` (a long poll)."""
        timeout_s = max(0.0, min(timeout_s, WATCH_MAX_S))
        version, status = self._get(self.controller.watch.remote(version, timeout_s, after),
                                    "following the session", timeout=timeout_s + CALL_TIMEOUT_S)
        return {"version": version, "status": status}
