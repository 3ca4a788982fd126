"""`fedray dashboard`: the web view (and the read half of the HTTP API) over tracking.

For a federation that fedray serve runs, the page is already served with its API; this
command says where. Otherwise it serves the page over the tracking of a run, finished or
running (`fedray run` writes tracking live), on 127.0.0.1 until Ctrl-C.
"""

from __future__ import annotations

import threading
from pathlib import Path

import click

from fedray.cli.common import stderr_console, tracking, tracking_options
from fedray.cli.extras import needs


@click.command()
@tracking_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Where to listen; beyond loopback every read needs the API token.")
@click.option("--port", default=12071, show_default=True, type=click.IntRange(0, 65535),
              help="0 picks a free port; a port in use falls back to a free one.")
@needs("fedray dashboard", "server", modules=("pymongo", "nx_27017", "fastapi", "uvicorn"))
def dashboard(data_dir: Path | None, tracking_uri: str | None, database: str | None, host: str,
              port: int) -> None:
    """Serve the web view of a federation's tracking (live while it runs)."""
    from fedray.api.endpoint import RECORD, api_token
    from fedray.bridge.addresses import is_loopback
    from fedray.cli.common import federation_dir
    from fedray.deploy.lifecycle import running
    from fedray.service.app import make_app
    from fedray.service.reader import TrackingReader
    from fedray.service.server import ApiServer

    console = stderr_console()
    folder = None if tracking_uri else federation_dir(data_dir)
    if folder is None and not is_loopback(host):
        from fedray.errors import ConfigError

        raise ConfigError("--host beyond loopback needs --data-dir: its API token guards "
                          "every read")
    if folder is not None and (folder / RECORD).exists():
        from fedray.api import connect
        from fedray.errors import FedrayError

        try:
            url = connect(folder).endpoint.url
        except FedrayError:
            url = ""  # a record left by a serve that was killed: serve the page here
        if url:
            console.print(f"fedray serve runs this federation; its web view is at {url}/")
            return
    with running() as teardown, tracking(folder, tracking_uri) as uri:
        reader = TrackingReader(uri, database, "")
        token = api_token(folder) if folder is not None else ""
        app = make_app(reader, None, token, reads_need_token=not is_loopback(host))
        server = ApiServer(app, host, port).start()
        teardown.add(0, "web view", server.stop)
        console.print(f"web view at {server.url}/ (Ctrl-C stops it)")
        idle = threading.Event()
        while not idle.wait(1.0):
            pass  # SIGINT/SIGTERM end it (fedray.deploy.lifecycle.running)
