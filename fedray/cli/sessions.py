"""`fedray session start|list|show|stop`: sessions on a federation that fedray serve runs.

Every command goes through the Python API (``fedray.api``), so it runs wherever the API
answers (``--api URL`` from another machine). `start` follows the session round by round
unless ``--detach``; a session that does not finish exits 9, like `fedray run`.
"""

from __future__ import annotations

import getpass
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedray.cli.common import api_options, connect_to, stderr_console
from fedray.errors import ConfigError, SessionError
from fedray.text import json_text, printable


@click.group()
def session() -> None:
    """Start, list, show and stop sessions on a running federation (fedray serve)."""


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "someone"
    return f"{user}@{socket.gethostname()}"


def _config_text(path: Path) -> str:
    """The config file's text, its relative package and seed paths made absolute (the
    service may run elsewhere in the file system than this command)."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of fields")
    for key in ("package", "seed_model"):
        value = raw.get(key)
        if isinstance(value, str) and value and not value.startswith("model:") \
                and (Path(value).exists() or ":" not in value):
            raw[key] = str(Path(value).expanduser().resolve())
    return yaml.safe_dump(raw, sort_keys=False)


@session.command("start")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="A config file: its session, seed_model and package are used (the rest "
                   "must match the running federation's).")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Override a session field, e.g. --set session.rounds=20 --set "
                   "session.aggregator=fedadam (YAML value).")
@click.option("--detach", is_flag=True, help="Return once it is queued; do not follow it.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line.")
@api_options
def start(config_path: Path | None, overrides: tuple[str, ...], detach: bool, as_json: bool,
          data_dir: Path | None, api_url: str | None) -> None:
    """Submit a session and follow it (sessions queue and run one at a time)."""
    fed = connect_to(data_dir, api_url)
    body: dict[str, Any] = {"set": list(overrides), "submitted_by": _who()}
    if config_path is not None:
        body["config"] = _config_text(config_path)
    answer = fed.http.json("POST", "/sessions", body)
    sid = answer["session_id"]
    console = stderr_console()
    ahead = f" after {answer['after']}" if answer.get("after") else ""
    console.print(escape(f"session {sid} submitted (queue position {answer['position']}"
                         f"{ahead})"))
    if detach:
        if as_json:
            click.echo(json_text(answer))
        return
    doc = _follow(fed, sid, console)
    state = doc.get("status") or doc.get("state")
    colour = "green" if state == "finished" else "red" if state == "failed" else "yellow"
    reason = f": {printable(str(doc.get('reason')))}" if doc.get("reason") else ""
    console.print(f"[{colour}]session {sid} {state}[/]" + escape(
        f" after {doc.get('rounds_done', 0)} round(s){reason}; model "
        f"{str(doc.get('model_id') or '')[:16]}"))
    if as_json:
        click.echo(json_text({k: doc.get(k) for k in ("session_id", "status", "rounds_done",
                                                      "rounds_planned", "model_id", "reason",
                                                      "stopped_by")}))
    if state != "finished":
        sys.exit(SessionError.exit_code)


def _follow(fed, sid: str, console: Console) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedray.api import Session

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} rounds"),
                        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                        console=console, transient=True)
    shown: set[int] = set()
    with progress:
        bar = progress.add_task(f"session {sid}", total=None, detail="queued")

        def show(status: dict[str, Any]) -> None:
            for record in status.get("history", []):
                number = int(record.get("round", 0))
                if number not in shown and record.get("updates"):
                    shown.add(number)
                    progress.console.print(_round_line(record, status["rounds_planned"]))
            detail = "waiting for clients" if status["state"] == "waiting" else \
                f"round {status['round']} {status['round_state']} · " \
                f"{status['clients_online']} clients online"
            progress.update(bar, total=status["rounds_planned"], completed=status["rounds_done"],
                            detail=detail)

        return Session(fed.http, sid).wait(on_status=show)


def _round_line(record: dict[str, Any], rounds: int) -> str:
    from fedray.deploy.runner import round_line

    return round_line(record, rounds)


@session.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 5000))
@api_options
def list_sessions(as_json: bool, limit: int, data_dir: Path | None, api_url: str | None) -> None:
    """The federation's sessions, newest first (queued ones on top)."""
    docs = connect_to(data_dir, api_url).sessions(limit)
    if as_json:
        click.echo(json_text(docs))
        return
    table = Table(title="sessions")
    for column in ("session", "state", "strategy", "rounds", "created", "by", "reason"):
        table.add_column(column)
    for d in docs:
        state = d.get("status") or d.get("state") or ""
        rounds = f"{d.get('rounds_done', 0)}/{d.get('rounds_planned', '?')}"
        created = str(d.get("created_at") or d.get("submitted_at") or "")[:19]
        strategy = d.get("strategy") or (d.get("config") or {}).get("aggregator", "")
        table.add_row(*(escape(printable(str(v), newlines=False)) for v in (
            d.get("session_id", ""), state, strategy, rounds, created,
            d.get("submitted_by") or d.get("stopped_by") or "", d.get("reason") or "")))
    Console().print(table)


@session.command("show")
@click.argument("session_id", metavar="ID")
@api_options
def show(session_id: str, data_dir: Path | None, api_url: str | None) -> None:
    """A session's document and its rounds, as JSON."""
    fed = connect_to(data_dir, api_url)
    handle = fed.session(session_id)
    doc = handle.info()
    if doc.get("status"):
        doc["rounds"] = handle.rounds()
    click.echo(json_text(doc))


@session.command("stop")
@click.argument("session_id", metavar="ID")
@click.option("--reason", default="", help="Recorded with the stop.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the session has ended.")
@api_options
def stop(session_id: str, reason: str, wait: bool, data_dir: Path | None,
         api_url: str | None) -> None:
    """Stop a session: a queued one never runs; a running one finishes its current round
    (within session.round_timeout_s) and ends stopped."""
    from fedray.api import Session

    fed = connect_to(data_dir, api_url)
    answer = fed.http.json("POST", f"/sessions/{quote(session_id, safe='')}/stop",
                           {"reason": reason, "by": _who()})
    console = stderr_console()
    sid = answer["session_id"]
    if answer.get("was") == "running":
        console.print(escape(f"session {sid} is stopping: its current round finishes first"))
        if wait:
            doc = Session(fed.http, sid).wait()
            console.print(escape(f"session {sid} {doc.get('status')} after "
                                 f"{doc.get('rounds_done', 0)} round(s)"))
    else:
        console.print(escape(f"session {sid}: {answer.get('state')} (it was {answer.get('was')})"))
