"""`fedray serve CONFIG` and `fedray down`: a federation that stays up between sessions.

`fedray serve` runs under ``fedray.deploy.lifecycle.running`` like `fedray run`: SIGINT or
SIGTERM stops what it started, in one line. `fedray down` asks the federation's API to
shut down and waits until it has.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import click

from fedray.cli.common import api_options, connect_to, stderr_console
from fedray.cli.extras import needs
from fedray.deploy.lifecycle import running

DOWN_TIMEOUT_S = 120.0


@click.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where models and tracking live (default ~/.fedray/<federation>).")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Override a config field, e.g. --set api.port=8080 (YAML value).")
@click.option("--new-session", is_flag=True,
              help="Do not resume a session an earlier run left unfinished.")
@click.option("--insecure", is_flag=True,
              help="Start even without a token while listening beyond loopback.")
@needs("fedray serve", "server", modules=("ray", "pymongo", "nx_27017", "fastapi", "uvicorn"))
def serve(config_path: Path, data_dir: Path | None, overrides: tuple[str, ...],
          new_session: bool, insecure: bool) -> None:
    """Run a federation from CONFIG and keep it up: sessions come and go with `fedray
    session start`, clients stay connected. Stops on SIGINT, SIGTERM or `fedray down`."""
    from fedray.deploy.config_file import load_config, parse_override
    from fedray.service.serve import serve_federation

    parsed = dict(parse_override(item) for item in overrides)
    if data_dir is not None:
        parsed["data_dir"] = str(data_dir)
    config = load_config(config_path, parsed)
    with running() as teardown:
        serve_federation(config, console=stderr_console(), teardown=teardown,
                         insecure=insecure, resume=not new_session)


@click.command()
@api_options
def down(data_dir: Path | None, api_url: str | None) -> None:
    """Stop a federation that fedray serve runs (its running session is recorded as
    stopped and resumes at the next fedray serve)."""
    from fedray.errors import ApiError

    fed = connect_to(data_dir, api_url)
    info = fed.info()
    name, pid = info.get("federation", ""), int(info.get("pid") or 0)
    local = pid and socket.gethostname() == info.get("host")
    fed.shutdown()
    console = stderr_console()
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    with console.status(f"stopping federation {name}..."):
        while time.monotonic() < deadline:
            if local:  # the process goes last: Ray, tracking and the lock are gone then
                if _ended(pid):
                    console.print(f"federation {name} is down")
                    return
            else:
                try:
                    fed.http.call("GET", "/federation", timeout=2.0)
                except ApiError:
                    console.print(f"federation {name} is down")
                    return
            time.sleep(0.2)  # waiting for another process to end: no event to wait on
    raise ApiError(f"federation {name} still answers after {DOWN_TIMEOUT_S:g}s; stop its "
                   "fedray serve process (SIGTERM)")


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie its parent has not reaped has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")
