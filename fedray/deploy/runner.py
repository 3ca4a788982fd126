"""`fedray run`: bring up tracking, store and actors, run one session, show it, tear down.

Progress goes to stderr (a rich progress bar and one line per round), the summary to
stdout, so ``--json`` output stays machine-readable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedray.config import FederationConfig
from fedray.deploy import lifecycle
from fedray.deploy.certificates import tls_dir
from fedray.deploy.exposure import (
    LOOPBACK_RAY_ENV,
    bridge_transport,
    client_tokens_vouched,
    federation_token,
    is_loopback,
    open_federation,
)
from fedray.deploy.lifecycle import RunLock, Teardown
from fedray.deploy.seeds import committed_seed_ref, load_seed, resolve_seed, session_package
from fedray.errors import FedrayError
from fedray.text import printable


@dataclass
class RunResult:
    status: dict[str, Any]
    data_dir: Path
    tracking_uri: str
    gateway: str
    embedded_tracking: bool = True

    @property
    def ok(self) -> bool:
        return self.status["state"] == "finished"

    def summary(self) -> dict[str, Any]:
        s = self.status
        return {"session_id": s["session_id"], "state": s["state"], "reason": s.get("reason", ""),
                "rounds": s["rounds_done"], "rounds_planned": s["rounds_planned"],
                "model_id": s["model_id"], "history": s["history"],
                "data_dir": str(self.data_dir), "tracking_uri": _shown(self.tracking_uri)}


def run_federation(config: FederationConfig, *, console: Console,
                   on_ready: Callable[[str], None] | None = None,
                   resume: bool = True, teardown: Teardown | None = None,
                   insecure: bool = False,
                   on_status: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Deploy ``config``'s federation, run one session and tear everything down again.

    With ``resume`` (the default for `fedray run`), a session of this federation that an
    earlier run left unfinished continues after its last committed round. Everything
    started is registered on ``teardown`` (``on_ready`` may add its own, as the demo's
    edge clients), and all of it is stopped before this returns or raises. ``on_status``
    is called with every status the session reports while it runs (the benchmark samples
    the actors' memory there).
    """
    teardown = teardown if teardown is not None else Teardown()
    try:
        return _run(config, console, on_ready, resume, teardown, insecure, on_status)
    finally:
        teardown.close()


@dataclass
class Deployment:
    """A federation that is up: its actors, tracking, store, seed and package (what
    ``bring_up`` started; ``fedray serve`` and ``fedray run`` both begin with it)."""

    config: FederationConfig
    federation: Any  # fedray.deploy.federation.Federation
    data_dir: Path
    tracking_uri: str
    store: Any  # ModelStore
    seed_id: str
    package: tuple[str, bytes, str] | None  # (sha256, .tgz bytes, name)
    ray_address: str
    transport: str  # "config" | "plaintext" | "auto" (fedray.deploy.exposure)


def _run(config: FederationConfig, console: Console, on_ready: Callable[[str], None] | None,
         resume: bool, teardown: Teardown, insecure: bool,
         on_status: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    up = bring_up(config, console, teardown, insecure)
    federation, package = up.federation, up.package
    if on_ready is not None:
        on_ready(federation.gateway)
    session_id = federation.start_session(up.seed_id, package[0] if package else "", resume,
                                          len(package[1]) if package else 0)
    if federation.resumed_after is not None:
        console.print(f"[yellow]resuming[/] unfinished session {session_id} after round "
                      f"{federation.resumed_after} (start a new one with --new-session)")
    status = _follow(federation, session_id, config, console, on_status)
    return RunResult(status=status, data_dir=up.data_dir, tracking_uri=up.tracking_uri,
                     gateway=federation.gateway,
                     embedded_tracking=config.tracking.uri == "embedded")


def bring_up(config: FederationConfig, console: Console, teardown: Teardown,
             insecure: bool = False) -> Deployment:
    """Start what the federation needs (tracking, Ray, the actors) and say where it is;
    everything started is registered on ``teardown``."""
    loopback = is_loopback(config.controller.host) and is_loopback(config.combiners.host)
    private_ray = loopback or (config.ray.listen == "loopback" and config.ray.address == "local"
                               and not os.environ.get("RAY_ADDRESS"))
    if private_ray and "ray" not in sys.modules:  # read once, when Ray is first imported
        os.environ.update(LOOPBACK_RAY_ENV)

    import ray

    from fedray.bridge.keys import private_dir
    from fedray.deploy.federation import Federation, connect_ray, starts_ray
    from fedray.storage import open_model_store
    from fedray.tracking.embedded import connect_or_start

    data_dir = private_dir(config.resolved_data_dir())
    # Before anything starts: one live run per data directory (and so per tracking).
    teardown.add(lifecycle.LOCK, "", RunLock(data_dir, config.federation).acquire().release)
    store = open_model_store(config.storage.uri, data_dir)
    seed_ref = committed_seed_ref(config.seed_model)
    # A file or a function is checked before anything starts; model:latest or a prefix is
    # looked up in tracking once that is up.
    seed_id = None if seed_ref is not None and len(seed_ref) != 64 else \
        store.put(load_seed(config.seed_model, store))
    package = session_package(config.package, data_dir)
    token = federation_token(config)
    if config.tracking.uri == "embedded":  # never a server another command will stop
        tracking_uri, server = connect_or_start(data_dir, own=True)
        if server is not None:  # ours: keep it alive while the federation runs
            supervised = _supervisor(server, config)
            teardown.add(lifecycle.TRACKING, "tracking server", supervised.stop)
            supervised.start()
    else:
        tracking_uri = config.tracking.uri
    if seed_id is None:
        seed_id = store.put(load_seed(config.seed_model, store,
                                      lambda ref: resolve_seed(tracking_uri, config, ref)))
    vouched, unverified = client_tokens_vouched(tracking_uri, config, data_dir)
    if unverified:
        console.print(f"[yellow]warning:[/] tracking holds {unverified} token row(s) that do not "
                      "verify under this federation's token secret (forged, altered, or from "
                      "another federation); they are ignored and let nobody in")
    warning = open_federation(config, token, vouched, insecure)
    if warning is not None:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    transport, warning = bridge_transport(config, insecure)
    if warning is not None:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    with console.status("starting Ray and the federation actors..."):
        local = starts_ray(config.ray)
        if local:
            teardown.add(lifecycle.RAY, "Ray", ray.shutdown)
        connect_ray(config.ray, config.namespace, loopback=private_ray)
        ray_address = ray.get_runtime_context().gcs_address
        teardown.add(lifecycle.LOCK, "", lifecycle.record_run(data_dir, config.federation, ray_address))
        tls = own_tls(config, data_dir) if transport == "auto" else None
        federation = Federation(config, token, tracking_uri, tls=tls)
        teardown.add(lifecycle.FEDERATION, f"federation {config.federation}",
                     lambda: federation.shutdown(teardown.signum))
        federation.deploy(package[:2] if package else None, exclusive=not local)
        lifecycle.record_gateway(data_dir, federation.gateway, transport != "plaintext")
    console.print(f"gateway listening at [bold]{escape(federation.gateway)}[/]; combiners: "
                  + escape(", ".join(f"{c['name']}@{c['address']}"
                                     for c in federation.combiner_info)))
    if transport != "plaintext":
        ca = f"; clients verify it with {tls_dir(data_dir) / 'ca.pem'}, which fedray client " \
             "add puts in their credentials" if transport == "auto" else ""
        console.print(escape(f"the bridge serves TLS{ca}"))
    console.print(escape(tracking_line(tracking_uri, config.tracking.database, data_dir)))
    console.print(escape(f"Ray at {ray_address}{' (loopback only)' if local and private_ray else ''}"
                         f": fedray status --address {ray_address}"))
    lifecycle.checkpoint()
    if package is not None:
        _record_package(tracking_uri, config, package)
        console.print(escape(f"serving compute package {package[2]!r} (sha256 {package[0][:12]})"))
    return Deployment(config, federation, data_dir, tracking_uri, store, seed_id, package,
                      ray_address, transport)


def own_tls(config: FederationConfig, data_dir: Path):
    """The bridge's certificate from the federation's CA, naming every address clients
    may dial (this machine's, the configured hosts', and each Ray node's)."""
    import ray

    from fedray.deploy.certificates import dialable_hosts, server_tls_for

    nodes = [n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")]
    hosts = [config.controller.host, config.combiners.host, config.combiners.advertise, *nodes]
    return server_tls_for(data_dir, dialable_hosts(hosts))


def _supervisor(server, config: FederationConfig):
    from fedray.tracking.store import TrackingStore
    from fedray.tracking.supervisor import SupervisedMongo

    def restarted(code: int | None) -> None:
        store = TrackingStore.from_uri(server.uri, config.tracking.database)
        try:
            store.event("warning", "driver", f"the embedded tracking server died (exit code "
                        f"{code}) and was restarted on the same data")
        finally:
            store.close()

    return SupervisedMongo(server, on_restart=restarted)  # start(): no-op if running


def _record_package(tracking_uri: str, config: FederationConfig,
                    package: tuple[str, bytes, str]) -> None:
    from fedray.tracking.store import TrackingStore

    store = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    try:
        store.add_package(package[0], name=package[2], size=len(package[1]),
                          source=str(config.package), federation=config.federation)
    finally:
        store.close()


def _follow(federation, session_id: str, config: FederationConfig, console: Console,
            on_status: Callable[[dict[str, Any]], None] | None = None) -> dict:
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} rounds"),
                        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                        console=console, transient=True)
    shown = 0
    with progress:
        bar = progress.add_task(f"session {session_id}", total=config.session.rounds, detail="")

        def show(status: dict[str, Any]) -> None:
            nonlocal shown
            for record in status["history"][shown:]:
                progress.console.print(round_line(record, config.session.rounds))
            shown = len(status["history"])
            if status["state"] == "waiting":
                detail = f"waiting for clients ({status['clients_online']}/{config.session.min_clients})"
            else:
                detail = f"round {status['round']} {status['round_state']} · " \
                         f"{status['clients_online']} clients online"
            progress.update(bar, completed=status["rounds_done"], detail=detail)
            if on_status is not None:
                on_status(status)

        return federation.follow(show)


def _shown(uri: str) -> str:
    """``uri`` fit to print: no password (summaries, logs and terminals are shared)."""
    from fedray.text import redact

    return redact(uri)


def tracking_line(uri: str, database: str, data_dir: Path) -> str:
    return f"tracking: {_shown(uri)} (database {database}); data: {data_dir}"


def round_line(record: dict[str, Any], rounds: int) -> str:
    """One finished round as console markup; clients name the metrics, so their names are
    escaped (a metric called ``loss[/]`` must not end the run with a MarkupError)."""
    metrics = {**{f"train {k}": v for k, v in record["train_metrics"].items()},
               **{f"val {k}": v for k, v in record["validation_metrics"].items()}}
    shown = " · ".join(f"{escape(printable(k, newlines=False))} {_number(v)}"
                       for k, v in metrics.items())
    if not record["updates"] and not record["train_metrics"]:  # a model validated, not built
        return f"validated model {record['model_id'][:10]}" + (f" · {shown}" if shown else "")
    return (f"round {record['round']}/{rounds} · {record['updates']} updates · "
            f"{record['seconds']:.2f}s · model {record['model_id'][:10]}" + (f" · {shown}" if shown else ""))


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else escape(str(value))


def print_summary(result: RunResult, console: Console) -> None:
    s = result.summary()
    if result.ok:
        console.print(f"[green]session {s['session_id']} finished[/]: {s['rounds']} rounds, "
                      f"final model {s['model_id'][:16]}")
    else:  # a failure's reason can quote what clients sent: never markup
        console.print(f"[red]session {s['session_id']} failed[/]: "
                      f"{escape(printable(str(s['reason'])))}")
    where = f"--data-dir {s['data_dir']}" if result.embedded_tracking \
        else f"--tracking {s['tracking_uri']}"
    console.print(escape(f"inspect it with: fedray rounds {where}"))


__all__ = ["Deployment", "FedrayError", "RunResult", "bring_up", "print_summary",
           "run_federation"]
