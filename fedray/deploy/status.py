"""What `fedray status` shows: a running federation, looked at from another shell.

`fedray run` (often as a `ray job submit` job) owns the federation's lifetime and shows
progress only in its own output. Operators on another machine or shell need the same
picture: which combiners are up, where edge clients should dial, how far the session is.
Everything lives in named, detached actors in namespace ``fedray-<federation>``, so
``describe`` joins the cluster as a short-lived driver, asks those actors read-only
questions (``ready``, ``watch(-1, ...)``, ``info``, ``online_clients``) and leaves again.
It never changes the federation. Each actor says which Ray node it runs on (its id and IP). Named by neither a config nor ``--federation``, the
federation is the one whose controller runs in the cluster (several: it asks which).
The command itself, its options and its extra check, is ``fedray.cli.status``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fedray.bridge.addresses import is_loopback
from fedray.deploy.exposure import LOOPBACK_RAY_ENV
from fedray.errors import AuthError, ConfigError, NotRunning, TransportError
from fedray.text import printable

CALL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0


def preflight(address: str) -> None:
    """Fail fast, in one line, where ``ray.init`` would hang or spam retries.

    ``ray.init`` retries an unreachable GCS forever (Ray swapping 127.0.0.1 for this
    machine's IP makes that easy to hit) and a refused token for about 20 s. A TCP connect
    and one GCS call with Ray's own client, with the same auth settings, answer in < 1 s.
    """
    from ray._private import services
    from ray._private.authentication import authentication_token_setup as auth
    from ray._raylet import GcsClient

    if "://" in address:
        raise ConfigError(f"Ray address {address}: fedray status joins Ray's GCS (HOST:PORT, port "
                          "6379 by default), not the dashboard URL that `ray job` takes")
    if address == "auto":  # found on this machine, as ray.init finds it
        try:
            resolved = services.canonicalize_bootstrap_address_or_die(address)
        except (ConnectionError, ValueError) as exc:
            raise NotRunning(f"no Ray cluster at {address!r}: {_first_line(exc)}") from None
    else:  # an address given is used as given: never swapped for this machine's IP
        resolved = address
    host, _, port = resolved.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r}: expected HOST:PORT (Ray's GCS address)")
    if not _accepts(host.strip("[]"), port, CONNECT_TIMEOUT_S):
        raise NotRunning(f"no Ray cluster answers at {resolved}")
    # As ray.init does for a cluster of this machine: a local token file turns token auth
    # on (a local fedray run's Ray, found or named, uses the one in ~/.ray).
    logging.getLogger(auth.__name__).setLevel(logging.ERROR)
    asked = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    found = auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        with _quiet_stderr():
            GcsClient(address=resolved, cluster_id=None)
    except Exception as exc:  # noqa: BLE001 - Ray's auth errors have no stable base class
        if "auth" in type(exc).__name__.lower() or "token" in str(exc).lower():
            if asked:
                fix = "the token is not the head's (check RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
            elif found:
                fix = ("this machine's Ray token (~/.ray/auth_token) is not the head's: set "
                       "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN to the "
                       "head's")
            else:
                fix = ("the cluster uses token auth: set RAY_AUTH_MODE=token (the token is read "
                       "from ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)")
            raise AuthError(f"Ray at {resolved} refused to authenticate us: {fix}") from None
        raise TransportError(f"cannot talk to Ray at {resolved}: {_first_line(exc)}") from None


def _accepts(host: str, port: str, timeout: float) -> bool:
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence Ray's C++ retry warnings (written to fd 2) while probing."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _connect(address: str, namespace: str | None) -> None:
    import ray

    preflight(address)
    try:
        ray.init(address=address, namespace=namespace, logging_level=logging.ERROR,
                 log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - whatever Ray raises, say it in one line
        raise TransportError(f"cannot join Ray at {address!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _combiner(name: str, namespace: str) -> dict[str, Any]:
    import ray

    try:
        handle = ray.get_actor(name, namespace=namespace)
        info, clients = ray.get([handle.info.remote(), handle.online_clients.remote()],
                                timeout=CALL_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - a dead or restarting combiner is a status, not a crash
        return {"name": name, "address": "", "status": "unreachable", "clients": 0,
                "client_names": [], "node_id": "", "node_ip": "", "error": _first_line(exc)}
    return {"name": name, "address": info["address"], "status": "online",
            "clients": len(clients), "client_names": sorted(clients),
            "node_id": info.get("node_id", ""), "node_ip": info.get("node_ip", "")}


def running_federations() -> list[str]:
    """Names of the federations with a controller in the joined cluster."""
    import ray

    return sorted({e["namespace"].removeprefix("fedray-")
                   for e in ray.util.list_named_actors(all_namespaces=True)
                   if e["namespace"].startswith("fedray-") and e["name"] == "controller"})


def _only_federation(address: str) -> str:
    names = running_federations()
    if not names:
        raise NotRunning(f"no federation is running in the Ray cluster at {address}")
    if len(names) > 1:
        raise ConfigError(f"{len(names)} federations are running in the Ray cluster at "
                          f"{address} ({', '.join(names)}): name one with --federation NAME")
    return names[0]


def describe(federation: str | None, address: str) -> dict[str, Any]:
    """Join Ray at ``address`` and describe ``federation``'s actors and session as a dict
    (``None``: the one federation running there)."""
    host = address.rpartition(":")[0].strip("[]")
    if is_loopback(host) and "ray" not in sys.modules:  # a loopback-only Ray, as runs keep it
        os.environ.update(LOOPBACK_RAY_ENV)
    import ray

    _connect(address, f"fedray-{federation}" if federation else None)
    try:
        if federation is None:
            federation = _only_federation(address)
        namespace = f"fedray-{federation}"
        try:
            controller = ray.get_actor("controller", namespace=namespace)
        except ValueError:
            raise NotRunning(f"no federation {federation!r} is running in the Ray cluster at "
                             f"{address} (no actor 'controller' in namespace {namespace})") from None
        try:
            gateway, (_, session) = ray.get(
                [controller.ready.remote(), controller.watch.remote(-1, 0.1)],
                timeout=CALL_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - dead, restarting or stuck controller
            raise NotRunning(f"the controller of {federation!r} does not answer: "
                             f"{_first_line(exc)}") from None
        names = sorted((e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
                        if e["namespace"] == namespace and e["name"].startswith("combiner-")),
                       key=lambda n: int(n.rpartition("-")[2]) if n[-1:].isdigit() else 0)
        combiners = [_combiner(n, namespace) for n in names]
        try:  # the elastic tier: its size and last change
            tier = ray.get(controller.tier_status.remote(), timeout=CALL_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a controller without one, or one restarting
            tier = None
        return {"federation": federation, "namespace": namespace, "ray_address": address,
                "gateway": gateway.get("address", ""), "combiners": combiners,
                "controller": {"node_id": gateway.get("node_id", ""),
                               "node_ip": gateway.get("node_ip", "")},
                "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
                "clients_connected": sum(c["clients"] for c in combiners), "session": session,
                "tier": tier}
    finally:
        ray.shutdown()


def render(status: dict[str, Any], console: Console) -> None:
    """Print ``status`` as a panel. Clients choose their names, metric names and what ends
    up in a failure's reason, so every such string is shown as text, never as markup."""
    table = Table(title="combiners", title_justify="left")
    for column in ("name", "address", "node", "status", "clients", "client names"):
        table.add_column(column, justify="right" if column == "clients" else "left")
    for c in status["combiners"]:
        shown = ", ".join(c["client_names"][:6]) + (" …" if len(c["client_names"]) > 6 else "")
        style = "green" if c["status"] == "online" else "bold red"
        table.add_row(_text(c["name"]), _text(c["address"] or "-"), _text(_node(c)),
                      Text(_plain(c["status"]), style=style), str(c["clients"]), _text(shown))
    lines = [f"gateway  [bold]{_shown(status['gateway'] or 'unknown')}[/]   "
             f"(namespace {_shown(status['namespace'])}, Ray {_shown(status['ray_address'])})",
             f"nodes    {status.get('nodes', '?')} in the Ray cluster; the controller on "
             f"{_shown(_node(status.get('controller', {})))}"]
    lines.extend(_tier_lines(status.get("tier")))
    s = status["session"]
    if s is None:
        lines.append("session  none started yet")
    else:
        color = {"finished": "green", "failed": "bold red"}.get(s["state"], "yellow")
        lines.append(f"session  {_shown(s['session_id'])}  [{color}]{_shown(s['state'])}[/]  "
                     f"round {s['round']}"
                     f"{' ' + _shown(s['round_state']) if s['round_state'] else ''}  ·  rounds "
                     f"{s['rounds_done']}/{s['rounds_planned']}  ·  {s['clients_online']} "
                     "clients online")
        if s.get("model_id"):
            lines.append(f"model    {_shown(s['model_id'][:16])}")
        if s.get("reason"):
            lines.append(f"reason   {_shown(s['reason'])}")
        if s.get("history"):
            last = s["history"][-1]
            metrics = {**last.get("train_metrics", {}),
                       **{f"val {k}": v for k, v in last.get("validation_metrics", {}).items()}}
            lines.append(f"last     round {last['round']}: {last['updates']} updates"
                         + "".join(f" · {_shown(k)} {_number(v)}" for k, v in metrics.items()))
    title = Text(f"federation {_plain(status['federation'])}")
    console.print(Panel(Group(*lines, "", table), title=title, title_align="left", expand=False))


def _tier_lines(tier: dict[str, Any] | None) -> list[str]:
    """The elastic tier: its size and bounds, what drains, and its last change."""
    if not tier:
        return []
    line = (f"tier     {tier['size']} combiner(s) (min {tier['min']}, max {tier['max']}, "
            f"{tier['clients_per_combiner']} clients each)")
    if tier.get("draining"):
        line += f"; draining {_shown(', '.join(tier['draining']))}"
    if tier.get("adding"):
        line += f"; adding {tier['adding']}"
    lines = [line]
    last = tier.get("last_change")
    if last:
        when = time.strftime("%H:%M:%S", time.gmtime(last["at"]))
        lines.append(f"change   {when} UTC  {_shown(last['action'])} "
                     f"{_shown(last['combiner'])} -> {last['size']} combiner(s): "
                     f"{_shown(last['reason'])}")
    return lines


def _node(where: dict[str, Any]) -> str:
    """A Ray node as `ray list nodes` starts its id, with its IP: ``3f2a9c1b@10.0.0.5``."""
    node = where.get("node_id", "")
    return f"{node[:8]}@{where.get('node_ip', '')}" if node else "-"


def _plain(value: Any) -> str:
    return printable(str(value), newlines=False)


def _shown(value: Any) -> str:
    """``value`` fit to paste into console markup: one line, no escapes, no tags."""
    return escape(_plain(value))


def _text(value: Any) -> Text:
    return Text(_plain(value))


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else _shown(value)


def default_address(config_address: str | None = None) -> str:
    """Where to look without ``--address``: $RAY_ADDRESS, the config's HOST:PORT, or auto."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    if config_address and config_address not in {"local", "auto"}:
        return config_address
    return "auto"
