"""`fedray edge ...`: start an edge client from the command line.

Kept apart from the server CLI and free of Ray/pymongo/minio imports, so an edge machine
needs only what a client needs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import click

from fedray.bridge.credential import ENV as CREDENTIALS_ENV
from fedray.bridge.credential import CredentialBundle, read_bundle
from fedray.bridge.tls import client_tls
from fedray.edge.apps import load_app
from fedray.edge.client import EdgeRunner, EdgeSettings
from fedray.edge.downloads import DEFAULT_MAX_MODEL_MB, DEFAULT_MAX_PACKAGE_MB, MiB
from fedray.edge.workers import PackageWorker, RemotePackageWorker, Worker
from fedray.errors import ConfigError
from fedray.packages.archive import is_sha256


@click.group()
def edge() -> None:
    """Run an edge client next to your data (it only dials out; it opens no port)."""


@edge.command("start")
@click.option("--gateway", default=None, metavar="HOST:PORT",
              help="The federation's gateway (default: the one in --credentials).")
@click.option("--credentials", "credentials", envvar=CREDENTIALS_ENV, default=None,
              metavar="FILE", help="This client's credential bundle, from fedray client add "
                                   f"(default: ${CREDENTIALS_ENV}): its name, key, gateway and "
                                   "the federation's CA.")
@click.option("--token", envvar="FEDRAY_TOKEN", default=None,
              help="Federation token (default: $FEDRAY_TOKEN), when there are no --credentials.")
@click.option("--name", default=None,
              help="This client's name, unique in the federation (default: the one in "
                   "--credentials).")
@click.option("--app", "app", default=None, metavar="MODULE[:OBJECT]",
              help="Python code with train(params, config) and validate(params, config).")
@click.option("--package", "package", default=None, metavar="PATH|remote",
              help="A compute package folder or .tgz with a fedray.yaml (or FEDn's fedn.yaml), "
                   "or 'remote' (the default without --app) to run the package the "
                   "federation serves.")
@click.option("--package-sha256", "pin", default=None, metavar="HEX",
              help="Run the federation's package only if it has this sha256, and nothing else.")
@click.option("--insecure", is_flag=True,
              help="Allow plaintext off loopback: send the token or signed calls, and run the "
                   "federation's package without --package-sha256 (anyone on the network "
                   "path could read them or swap it).")
@click.option("--data", default="", help="Path to this client's data (passed to the code; "
              "$FEDRAY_DATA, and $FEDN_DATA_PATH for a FEDn package).")
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE",
              help="Something about this client the federation may select by (repeatable).")
@click.option("--ca", default=None, metavar="CA.pem",
              help="Use TLS and verify the servers' certificates against this CA.")
@click.option("--tls", "system_roots", is_flag=True,
              help="Use TLS, verifying the servers against the system's trusted CAs.")
@click.option("--cert", default=None, metavar="CERT.pem",
              help="Client certificate for mutual TLS (with --key).")
@click.option("--key", default=None, metavar="KEY.pem", help="Private key of --cert.")
@click.option("--tls-server-name", default="", metavar="NAME",
              help="The name the servers' certificates carry, when it differs from the host "
                   "dialed (implies TLS).")
@click.option("--max-model-mb", type=click.IntRange(min=1), default=DEFAULT_MAX_MODEL_MB,
              show_default=True, help="Refuse models larger than this.")
@click.option("--max-package-mb", type=click.IntRange(min=1), default=DEFAULT_MAX_PACKAGE_MB,
              show_default=True, help="Refuse compute packages larger than this.")
@click.option("--no-env", "no_env", is_flag=True,
              help="Run a compute package's entrypoints in this environment even when its "
                   "fedray.yaml declares a python_env (by default that venv is built once "
                   "and reused).")
@click.option("--share-tracebacks", is_flag=True,
              help="Send failed tasks' tracebacks to the federation (they name local files); "
                   "by default it gets the error's class and first line.")
@click.option("--allow-client-half", "client_halves", multiple=True, metavar="MODULE",
              help="Run the client half a session's strategy names from MODULE (repeatable); "
                   "fedray's own (fedray.*) always run.")
def start(gateway: str | None, credentials: str | None, token: str | None, name: str | None,
          app: str | None, package: str | None,
          pin: str | None, insecure: bool, data: str, attrs: tuple[str, ...], ca: str | None,
          system_roots: bool, cert: str | None, key: str | None, tls_server_name: str,
          max_model_mb: int, max_package_mb: int, no_env: bool, share_tracebacks: bool,
          client_halves: tuple[str, ...]) -> None:
    """Connect to a federation and serve its train/validate tasks until stopped."""
    if app is not None and package is not None:
        raise ConfigError("give one of --app MODULE[:OBJECT] or --package PATH|remote, not both")
    tls = client_tls(ca, cert, key, tls_server_name, system_roots)
    bundle = read_bundle(credentials) if credentials else None
    name, gateway = identity(bundle, name, gateway)
    check_gateway(gateway)
    if bundle is not None:
        token = None  # the key pair is the identity; a token in the environment is not sent
        attrs = tuple(f"{k}={v}" for k, v in bundle.attrs.items()
                      if not any(a.startswith(f"{k}=") for a in attrs)) + attrs
        tls = tls or bundle.tls(tls_server_name)
    remote = app is None and package in (None, "remote")
    pin = remote_code_policy(remote, tls is not None, pin, insecure)
    data = resolve_data(data)
    hide_token_from_children()  # the arguments are checked; no app or package is loaded yet
    if data:
        os.environ["FEDRAY_DATA"] = data
    secrets = (token,) if token else ()
    if app is not None:
        worker = load_app(app)
    elif remote:
        worker = RemotePackageWorker(data, pinned_sha256=pin, secrets=secrets,
                                     use_env=not no_env)
    else:
        worker = load_package_worker(Path(package), data, secrets, use_env=not no_env)
    settings = EdgeSettings(gateway=gateway, name=name, token=token, tls=tls,
                            attrs=parse_attrs(attrs), max_model_bytes=max_model_mb * MiB,
                            max_package_bytes=max_package_mb * MiB,
                            share_tracebacks=share_tracebacks, client_halves=client_halves,
                            signer=bundle.signer() if bundle else None, insecure=insecure,
                            ca_from_credentials=bundle is not None and tls is not None
                            and bundle.ca is not None and tls.ca == bundle.ca)
    runner = EdgeRunner(worker, settings)
    who = f" as {name} (key pair of {credentials})" if bundle else ""
    click.echo(f"[{name}] starting{who}; gateway {gateway}{' over TLS' if tls else ''}; "
               "Ctrl-C to stop")
    asyncio.run(_serve(runner))
    click.echo(f"[{name}] stopped after {runner.tasks_done} task(s)")


def identity(bundle: CredentialBundle | None, name: str | None,
             gateway: str | None) -> tuple[str, str]:
    """This client's name and gateway: the options, else the credential bundle's."""
    if bundle is not None and name is not None and name != bundle.name:
        raise ConfigError(f"--name {name}: the credentials are {bundle.name!r}'s (a client's "
                          "name is its credential's); drop --name")
    name = name or (bundle.name if bundle else None)
    gateway = gateway or (bundle.gateway if bundle else None)
    if not name:
        raise ConfigError("give --name NAME (or --credentials FILE from fedray client add)")
    if not gateway:
        raise ConfigError("give --gateway HOST:PORT (the federation's gateway" +
                          (": these credentials name none)" if bundle else ")"))
    return name, gateway


def check_gateway(gateway: str) -> None:
    """``HOST:PORT``, or one line saying what is missing."""
    host, sep, port = gateway.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 \
            or (host.count(":") and not host.startswith("[")):
        raise ConfigError(f"--gateway {gateway}: expected HOST:PORT, e.g. 127.0.0.1:12080 (the "
                          "controller.port of the federation's config)")


def hide_token_from_children() -> bool:
    """Keep the token (already read by click) from the code this client runs.

    ``FEDRAY_TOKEN`` leaves ``os.environ``, so no child inherits it. That does not hide it
    in ``/proc/<pid>/environ``, which keeps the environment the process started with; so
    on Linux the process also becomes non-dumpable: a process of the same non-root user
    can then no longer read its environ, memory or maps, nor ptrace it. Root (or
    CAP_SYS_PTRACE) still can, and ``--token`` stays visible in ``ps``. True when the
    process is non-dumpable.

    A client that a fedray command started on its own machine (``fedray demo``: it carries
    that command's ``FEDRAY_RUN`` mark, and the command's own token) stays dumpable, so
    that the command can still find it by its mark, however it ends."""
    os.environ.pop("FEDRAY_TOKEN", None)
    if os.environ.get(RUN_MARK):
        return False
    return set_not_dumpable()


def set_not_dumpable() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)`` on Linux (no core dumps either); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc prctl (an unusual libc or a sandbox)
        return False


_PR_SET_DUMPABLE = 4  # linux/prctl.h
RUN_MARK = "FEDRAY_RUN"  # fedray.deploy.lifecycle.RUN_ENV (not imported: it needs fcntl, Unix only)


def remote_code_policy(remote: bool, tls: bool, pin: str | None, insecure: bool) -> str | None:
    """The pinned sha256, if any; refuses to run the federation's code over plaintext,
    where the package and the sha256 it is checked against come down the same
    unauthenticated channel, unless it is pinned or the operator says --insecure."""
    if pin is not None:
        pin = pin.lower()
        if not is_sha256(pin):
            raise ConfigError(f"--package-sha256: {pin!r} is not a sha256 (64 hex characters)")
        if not remote:
            raise ConfigError("--package-sha256 pins the package the federation serves; it "
                              "goes with --package remote (or neither --app nor --package)")
    if remote and not tls and pin is None and not insecure:
        raise ConfigError("refusing to run the federation's package over plaintext (anyone on "
                          "the path could swap it and its sha256): add --package-sha256 HEX "
                          "or --insecure, or dial over TLS with --ca / --tls")
    return pin


def resolve_data(data: str) -> str:
    """``--data`` as an absolute path: a package runs in its own folder, not in ours."""
    if not data:
        return ""
    path = Path(data).expanduser()
    if not path.exists():
        raise ConfigError(f"--data: {data} does not exist")
    return str(path.resolve())


def parse_attrs(items: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` options as a mapping (``EdgeSettings`` checks keys and values)."""
    attrs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--attr {item}: expected KEY=VALUE")
        if key in attrs:
            raise ConfigError(f"--attr {key}: given twice")
        attrs[key] = value
    return attrs


async def _serve(runner: EdgeRunner) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runner.stop.set)
    await runner.run()


def load_package_worker(path: Path, data: str, secrets: tuple[str, ...] = (),
                        use_env: bool = True) -> Worker:
    from fedray.packages import load_package

    if not path.exists():
        raise ConfigError(f"--package {path}: no such folder or file")
    return PackageWorker(load_package(path), data, secrets, use_env=use_env)


@edge.command("swarm")
@click.option("--count", required=True, type=click.IntRange(1, 100_000),
              help="How many edge clients to run.")
@click.option("--gateway", required=True, metavar="HOST:PORT", help="The federation's gateway.")
@click.option("--app", "app", required=True, metavar="MODULE[:OBJECT]",
              help="train(params, config) (and validate) shared by all, or a factory "
                   "OBJECT(data) -> (train, validate) called per client.")
@click.option("--procs", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Processes to spread the clients over (each runs one event loop).")
@click.option("--data", default="", metavar="PATH",
              help="Each client's data for a factory --app; {i} is the client's index.")
@click.option("--name-prefix", default="swarm-", show_default=True,
              help="Client i is named PREFIX + i (five digits).")
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE",
              help="Something every client says about itself (repeatable).")
@click.option("--token", envvar="FEDRAY_TOKEN", default=None,
              help="Federation token for every client (default: $FEDRAY_TOKEN).")
@click.option("--heartbeat-s", default=2.0, show_default=True, type=click.FloatRange(0.1, 600),
              help="Seconds between each client's heartbeats.")
@click.option("--duration", default=None, type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="Stop after this long (default: until Ctrl-C or SIGTERM).")
@click.option("--verbose", is_flag=True, help="Print every client's lines, not only trouble.")
def swarm(count: int, gateway: str, app: str, procs: int, data: str, name_prefix: str,
          attrs: tuple[str, ...], token: str | None, heartbeat_s: float,
          duration: float | None, verbose: bool) -> None:
    """Run COUNT real edge clients (load-testing a federation), PROCS processes of them.

    Each client has its own channel, name, heartbeats and tasks. Ctrl-C or SIGTERM stops
    them all."""
    import time

    from rich.console import Console

    from fedray.edge.apps import load_target
    from fedray.edge.swarm import Swarm

    check_gateway(gateway)
    load_target(app)  # a typo is told here, once, not by every child
    if "{i}" not in data and data:
        resolve_data(data)
    env_name = "FEDRAY_SWARM_TOKEN"
    if token:
        os.environ[env_name] = token  # children read it from the environment, not argv
    spec = {"gateway": gateway, "app": app, "data": data, "prefix": name_prefix,
            "attrs": parse_attrs(attrs), "heartbeat_s": heartbeat_s, "verbose": verbose,
            "token_env": env_name}
    flock = Swarm(spec, count, procs)
    console = Console(stderr=True)
    started = time.monotonic()
    stopped = False

    def stop(signum=None, frame=None) -> None:  # noqa: ANN001 - signal handler
        nonlocal stopped
        stopped = True
        flock.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    flock.start()
    with console.status(f"swarm: starting {count} clients in {len(flock.parts)} process(es)"
                        ) as status:
        def show(counts) -> None:  # noqa: ANN001 - swarm.Counts
            status.update(f"swarm: {counts.total_connected}/{count} connected · "
                          f"{counts.total_tasks} task(s) done · "
                          f"{time.monotonic() - started:.0f}s")
            if duration is not None and time.monotonic() - started > duration and not stopped:
                stop()

        flock.watch(show)
    c = flock.counts
    click.echo(f"swarm: {count} clients stopped after {time.monotonic() - started:.1f}s; "
               f"{c.total_tasks} task(s) done, {c.errors} client error(s)", err=True)
    if c.errors or any(p.returncode not in (0, -signal.SIGTERM) for p in flock.procs):
        sys.exit(1)
