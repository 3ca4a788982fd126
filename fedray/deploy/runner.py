"""`fedray run`: bring up tracking, store and actors, run one session, show it, tear down.

Progress goes to stderr (a rich progress bar and one line per round), the summary to
stdout, so ``--json`` output stays machine-readable.
"""

from __future__ import annotations

import importlib
import ipaddress
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
from fedray.deploy.lifecycle import RunLock, Teardown
from fedray.errors import ConfigError, FedrayError, SerializationError
from fedray.serialization import encode, read_layout
from fedray.storage.base import ModelStore, is_model_ref
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


MODEL_SEED = "model:"


def committed_seed_ref(spec: str) -> str | None:
    """The model reference of ``seed_model: model:REF`` (an id, a prefix of 6+ hex
    characters, or ``latest``), else None (``model:name`` stays a module:function)."""
    if not spec.startswith(MODEL_SEED):
        return None
    ref = spec[len(MODEL_SEED):].strip().lower()
    return ref if is_model_ref(ref) else None


def load_seed(spec: str, store: ModelStore | None = None,
              resolve: Callable[[str], str] | None = None) -> bytes:
    """Seed model bytes from a ``.safetensors`` file, a ``module:function`` returning arrays,
    or ``model:REF``, a committed model in ``store`` (``resolve`` turns ``latest`` or an id
    prefix into an id, through tracking)."""
    ref = committed_seed_ref(spec)
    if ref is not None:
        return _committed_seed(spec, ref, store, resolve)
    path = Path(spec)
    if path.suffix == ".safetensors" or path.exists():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"seed_model: cannot read {spec} ({exc.strerror})") from None
        try:
            read_layout(data)
        except SerializationError as exc:
            raise ConfigError(f"seed_model: {spec} is not a safetensors model ({exc})") from None
        return data
    if ":" not in spec:
        raise ConfigError(f"seed_model: {spec!r} is neither a .safetensors file nor module:function")
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        return encode(factory())
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"seed_model: cannot load {spec!r} ({exc})") from None


def _committed_seed(spec: str, ref: str, store: ModelStore | None,
                    resolve: Callable[[str], str] | None) -> bytes:
    if store is None:
        raise ConfigError(f"seed_model: {spec} needs the federation's model store")
    if len(ref) != 64:
        if resolve is None:
            raise ConfigError(f"seed_model: {spec} needs tracking to find that model")
        ref = resolve(ref)
    if not store.exists(ref):
        raise ConfigError(f"seed_model: {spec}: no model {ref} in {store.uri(ref)}")
    return store.get(ref)  # checks the bytes against the id: StorageError if corrupt


def resolve_seed(tracking_uri: str, config: FederationConfig, ref: str) -> str:
    """``latest`` (this federation's) or an id prefix, as a model id from tracking."""
    from fedray.tracking.models import resolve_model
    from fedray.tracking.store import TrackingStore

    store = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    try:
        return resolve_model(store, ref, federation=config.federation,
                             what=f"{config.source}: seed_model: model:{ref}").model_id
    finally:
        store.close()


def session_package(spec: str | None, data_dir: Path) -> tuple[str, bytes, str] | None:
    """The config's compute package as (sha256, .tgz bytes, name), checked before serving."""
    if not spec:
        return None
    from fedray.packages import build_package, load_package, sha256_file

    src = Path(spec)
    if src.is_dir():
        archive = data_dir / "packages" / f"{src.resolve().name}.tgz"
        archive.parent.mkdir(parents=True, exist_ok=True)
        sha = build_package(src, archive)
    elif src.is_file():
        archive, sha = src, sha256_file(src)
    else:
        raise ConfigError(f"package: {spec} is neither a folder nor a .tgz file")
    package = load_package(archive, expected_sha256=sha)  # refuses unsafe archives now
    return sha, archive.read_bytes(), package.manifest.name


def federation_token(config: FederationConfig) -> str | None:
    """The shared token from ``$auth.token_env``; a guessable one stops `fedray run`."""
    from fedray.bridge.keys import check_shared_token

    token = os.environ.get(config.auth.token_env) or None
    check_shared_token(token, config.auth.token_env)
    return token


LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or name): nothing off this machine reaches it."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_federation(config: FederationConfig, token: str | None, client_tokens: bool,
                    insecure: bool) -> str | None:
    """Whether a federation may start: None if it may (and says nothing), a warning to print
    if it may but anyone reaching it could join, or ``ConfigError`` if it must not start.

    Without ``$FEDRAY_TOKEN`` and without any per-client token the bridge accepts every
    caller. That is refused unless nothing off this machine can reach it (both hosts
    loopback) or the operator said so (``--insecure``).
    """
    if token is not None or client_tokens:
        return None
    env = config.auth.token_env
    if is_loopback(config.controller.host) and is_loopback(config.combiners.host):
        return (f"${env} is not set and no client has a token: any process on this machine "
                "may join (the gateway and combiners listen on loopback only)")
    if insecure:
        return (f"${env} is not set and no client has a token: anyone who reaches "
                f"{config.controller.host}:{config.controller.port} may join (--insecure)")
    raise ConfigError(
        f"{config.source}: ${env} is not set and no client has a token (fedray token create), "
        f"so anyone who reaches {config.controller.host}:{config.controller.port} could join. "
        f"Set ${env}, bind controller.host and combiners.host to 127.0.0.1, or pass --insecure")


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


def _run(config: FederationConfig, console: Console, on_ready: Callable[[str], None] | None,
         resume: bool, teardown: Teardown, insecure: bool,
         on_status: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
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
    with console.status("starting Ray and the federation actors..."):
        local = starts_ray(config.ray)
        if local:
            teardown.add(lifecycle.RAY, "Ray", ray.shutdown)
        connect_ray(config.ray, config.namespace)
        federation = Federation(config, token, tracking_uri)
        teardown.add(lifecycle.FEDERATION, f"federation {config.federation}",
                     lambda: federation.shutdown(teardown.signum))
        federation.deploy(package[:2] if package else None, exclusive=not local)
    console.print(f"gateway listening at [bold]{escape(federation.gateway)}[/]; combiners: "
                  + escape(", ".join(f"{c['name']}@{c['address']}"
                                     for c in federation.combiner_info)))
    console.print(escape(tracking_line(tracking_uri, config.tracking.database, data_dir)))
    lifecycle.checkpoint()
    if on_ready is not None:
        on_ready(federation.gateway)
    if package is not None:
        _record_package(tracking_uri, config, package)
        console.print(escape(f"serving compute package {package[2]!r} (sha256 {package[0][:12]})"))
    session_id = federation.start_session(seed_id, package[0] if package else "", resume,
                                          len(package[1]) if package else 0)
    if federation.resumed_after is not None:
        console.print(f"[yellow]resuming[/] unfinished session {session_id} after round "
                      f"{federation.resumed_after} (start a new one with --new-session)")
    status = _follow(federation, session_id, config, console, on_status)
    return RunResult(status=status, data_dir=data_dir, tracking_uri=tracking_uri,
                     gateway=federation.gateway,
                     embedded_tracking=config.tracking.uri == "embedded")


def client_tokens_vouched(tracking_uri: str, config: FederationConfig,
                          data_dir: Path) -> tuple[bool, int]:
    """(whether the bridge will require per-client tokens, how many token rows in tracking
    do not verify): exactly what the gates decide (``fedray.bridge.client_tokens``), so
    that a forged or keyless row no longer passes for a closed bridge."""
    from fedray.bridge.keys import load_token_secret, tokens_issued, verifies
    from fedray.tracking.store import TrackingStore
    from fedray.tracking.tokens import read_token_hashes

    secret = load_token_secret(data_dir, create=False)
    store = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    try:
        rows = read_token_hashes(store)
    finally:
        store.close()
    vouched = sum(1 for digest, name, _, mac in rows if verifies(secret, digest, name, mac))
    return vouched > 0 or tokens_issued(data_dir), len(rows) - vouched


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


__all__ = ["FedrayError", "RunResult", "load_seed", "print_summary", "run_federation"]
