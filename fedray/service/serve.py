"""`fedray serve`: a federation that stays up, with its HTTP API, until it is told to go.

``serve_federation`` brings the federation up (``fedray.deploy.runner.bring_up``: tracking,
Ray, the actors), serves the API and the web view (``fedray.service.app``), says where
everything is, resumes a session an earlier run left unfinished, and then waits: sessions
come through the API (``fedray session start``, ``fedray.connect(...).start_session``),
clients stay connected between them. SIGINT, SIGTERM or ``fedray down`` (the API's
``/shutdown``, which signals this process) stop everything it started.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedray.api.endpoint import api_token, record_api
from fedray.bridge.addresses import is_loopback
from fedray.config import FederationConfig
from fedray.deploy import lifecycle
from fedray.deploy.lifecycle import Teardown
from fedray.deploy.runner import Deployment, bring_up
from fedray.service.control import LiveControl
from fedray.service.reader import TrackingReader

IDLE_CHECK_S = 1.0


def start_api(up: Deployment, teardown: Teardown, console: Console) -> LiveControl:
    """Serve the API and the web view for ``up`` (stopped with the federation)."""
    from fedray.service.app import make_app
    from fedray.service.server import ApiServer

    config = up.config
    control = LiveControl(up)
    if not config.api.enabled:
        return control
    reader = TrackingReader(up.tracking_uri, config.tracking.database, config.federation)
    token = api_token(up.data_dir)
    app = make_app(reader, control, token, reads_need_token=not is_loopback(config.api.host),
                   on_shutdown=lambda: os.kill(os.getpid(), signal.SIGTERM))
    server = ApiServer(app, config.api.host, config.api.port).start()
    control.api_url = server.url
    teardown.add(lifecycle.FEDERATION, "HTTP API", server.stop)  # before the federation
    teardown.add(lifecycle.LOCK, "", record_api(up.data_dir, server.url, config.federation))
    if server.fell_back:
        console.print(f"[yellow]note:[/] api.port {config.api.port} is taken; the API took "
                      f"{server.port}")
    console.print(escape(f"API at {server.url}/api/v1 (token in {up.data_dir}/api-token); "
                         f"web view at {server.url}/"))
    return control


def serve_federation(config: FederationConfig, *, console: Console, teardown: Teardown,
                     insecure: bool = False, resume: bool = True,
                     on_ready: Callable[[LiveControl], Any] | None = None,
                     stop: threading.Event | None = None) -> None:
    """Bring the federation up and keep it up until a signal (or ``stop``, in tests)."""
    up = bring_up(config, console, teardown, insecure)
    control = start_api(up, teardown, console)
    if resume:
        package = up.package
        resumed = up.federation.start_session(up.seed_id, package[0] if package else "",
                                              package_size=len(package[1]) if package else 0,
                                              resume_only=True)
        if resumed is not None:
            console.print(f"[yellow]resuming[/] unfinished session {resumed} after round "
                          f"{up.federation.resumed_after}")
    where = f"--data-dir {up.data_dir}"
    console.print(escape(f"serving federation {config.federation}; start a session with: "
                         f"fedray session start {where} [--set session.rounds=10]; "
                         f"stop it all with: fedray down {where}"))
    if on_ready is not None:
        on_ready(control)
    stop = stop or threading.Event()
    while not stop.wait(IDLE_CHECK_S):
        lifecycle.checkpoint()  # a signal whose exception was lost stops us here
