"""Driver-side handle on a federation: join or start Ray, deploy the actors, follow, tear down.

`fedray run`, `fedray demo`, the tests and the benchmark all deploy through this one class,
so they exercise exactly the path users take.

This is the driver's Ray boundary: every ``ray.get`` on an actor call runs inside
``ray_errors``, so what reaches the user is a ``FedrayError`` with a one-line message (the
actor's own FedrayError when it raised one), never a remote traceback. A federation in a
joined cluster is held by a ``Lease``: a named actor that is *not* detached, so Ray removes
it as soon as the driver that took it is gone. A second driver of the same federation finds
the name taken and is refused, and the actors of a live federation are never removed as
leftovers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray

from fedray.actors.combiner.actor import Combiner
from fedray.actors.controller.actor import Controller
from fedray.actors.hosting import FORWARDED_ENV, forwarded_env  # noqa: F401 - FORWARDED_ENV: tests read it here
from fedray.bridge.auth import BridgeKeys
from fedray.bridge.keys import load_token_secret, tokens_issued
from fedray.bridge.tls import ServerTls, server_tls
from fedray.config import FederationConfig, RayConfig
from fedray.deploy import lifecycle, nodes
from fedray.errors import AlreadyRunning, FedrayError, ListenError, SessionError, TransportError

log = logging.getLogger(__name__)

CONTROLLER = "controller"
LEASE = "lease"
FOLLOW_POLL_S = 5.0
CONTROLLER_RESTART_S = 120.0
STOP_TIMEOUT_S = 20.0
LEASE_WAIT_S = 10.0  # a lease whose driver just died goes within about a second
# Ray logs this at WARNING on every ray.init; fedray's own output has no room for it.
QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def ray_errors(what: str) -> Iterator[None]:
    """Translate Ray's failures around actor calls into fedray's tree.

    A task that raised a FedrayError re-raises that error; any other failure in the task, a
    dead, restarting or silent actor becomes a SessionError, and a broken connection to
    Ray a TransportError, each one line that starts with ``what``.
    """
    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, FedrayError):
            raise cause from None
        raise SessionError(f"{what}: {type(cause).__name__}: {_first_line(cause)}") from None
    except ray.exceptions.GetTimeoutError:
        raise SessionError(f"{what}: no answer in time") from None
    except ray.exceptions.RayActorError as exc:
        raise SessionError(f"{what}: {_first_line(exc)}") from None
    except ray.exceptions.RayError as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from None


@ray.remote(num_cpus=0, max_restarts=0)
class Lease:
    """Held by the driver that runs a federation; Ray ends it with that driver."""

    def __init__(self, holder: dict[str, Any]) -> None:
        self.holder = holder

    def who(self) -> dict[str, Any]:
        return self.holder


def combiner_name(index: int) -> str:
    return f"combiner-{index}"


def starts_ray(rc: RayConfig) -> bool:
    """Whether ``connect_ray`` will start a private local Ray (rather than join one)."""
    return not ray.is_initialized() and rc.address == "local" and not os.environ.get("RAY_ADDRESS")


def connect_ray(rc: RayConfig, namespace: str, loopback: bool = False) -> bool:
    """Join or start Ray; True when this process started a private local instance.

    A local Ray for a federation whose every host is loopback (``loopback``) is kept
    private: it takes 127.0.0.1 as its node's address (with ``LOOPBACK_RAY_ENV``, set
    before Ray is imported, its GCS, raylet, workers and agents bind it alone), and its
    auth token file is made 0600 (Ray writes it 0644)."""
    if ray.is_initialized():
        return False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    local = starts_ray(rc)
    private_ray_token()
    try:
        with lifecycle.ours_kept():
            _init_ray(rc, local, namespace, loopback)
    except SystemExit as exc:  # a handler Ray installed anyway: sys.exit(SIGTERM)
        if exc.code == signal.SIGTERM:
            raise lifecycle.stop_by(signal.SIGTERM) from None
        raise
    finally:
        lifecycle.claim_signals()  # ray.init may have replaced them (its C++ handlers too)
    private_ray_token()  # ray.init may have written it just now
    lifecycle.checkpoint()  # a signal that landed where its exception was swallowed
    return local


RAY_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def private_ray_token() -> None:
    """Ray's token file (whoever reads it can run code in the cluster) readable by its
    owner only."""
    with contextlib.suppress(OSError):
        info = RAY_TOKEN_FILE.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            RAY_TOKEN_FILE.chmod(0o600)


def _init_ray(rc: RayConfig, local: bool, namespace: str, loopback: bool = False) -> None:
    if local:
        extra = {"_node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1"} \
            if loopback else {}
        with _init_errors("cannot start a local Ray", "check ray.num_cpus and the free space "
                          "in /tmp, or join a running cluster (ray.address: auto)"):
            ray.init(address="local", num_cpus=rc.num_cpus, include_dashboard=rc.include_dashboard,
                     namespace=namespace, logging_level=logging.WARNING, log_to_driver=False,
                     **extra)
        return
    address = None if rc.address == "local" else rc.address  # None: a Ray job's
    if address not in (None, "auto") and "://" not in address:
        from fedray.deploy.status import preflight

        preflight(address)  # ray.init would retry an unreachable address for minutes
    shown = address or os.environ.get("RAY_ADDRESS") or "the Ray job's cluster"
    with _init_errors(f"cannot join Ray at {shown}", "is a cluster running there (ray start "
                      "--head), and is ray.address its GCS address, HOST:PORT?"):
        ray.init(address=address, namespace=namespace, logging_level=logging.WARNING,
                 log_to_driver=False)


@contextlib.contextmanager
def _init_errors(what: str, hint: str) -> Iterator[None]:
    """``ray.init``'s failures (any type: Ray has no base class for them) in one line."""
    try:
        yield
    except FedrayError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Ray raises, say it with a hint
        raise TransportError(f"{what}: {_first_line(exc)}; {hint}") from None


class Federation:
    def __init__(self, config: FederationConfig, token: str | None, tracking_uri: str | None,
                 tls: ServerTls | None = None) -> None:
        self.config = config
        self.tls = tls  # the bridge's TLS when the driver made it (else the config's tls)
        self.token = token
        self.tracking_uri = tracking_uri
        self.namespace = config.namespace
        self.combiners: list[Any] = []
        self.combiner_info: list[dict[str, Any]] = []
        self.controller: Any = None
        self.gateway = ""
        self.resumed_after: int | None = None
        self.lease: Any = None
        self._serving: list[Any] = []  # actors whose server came up: those have one to stop

    def deploy(self, package: tuple[str, bytes] | None = None,
               exclusive: bool = False) -> Federation:
        """Start combiners and controller; ``package`` is (sha256, .tgz bytes) to serve.

        With ``exclusive`` this driver first takes the federation's lease in the cluster
        (``AlreadyRunning`` if a live driver holds it). Either way, actors of a federation
        whose lease is held are never removed as leftovers.
        """
        tls = self.tls or server_tls(self.config.tls, self.config.source)  # PEM, read once
        data_dir = self.config.resolved_data_dir()  # the token secret's bytes travel to the actors
        keys = BridgeKeys(self.token, load_token_secret(data_dir), tokens_issued(data_dir))
        if exclusive:
            self._take_lease()
        self._remove_stale()
        c = self.config.combiners
        names = [combiner_name(i) for i in range(c.count)]
        common = {"namespace": self.namespace, "lifetime": "detached",
                  "runtime_env": {"env_vars": forwarded_env()}}
        placed = nodes.place_combiners(self.config)  # a placement group: one bundle each
        for i, (name, where) in enumerate(zip(names, placed, strict=True)):
            port = c.base_port + i if c.base_port else 0
            self.combiners.append(Combiner.options(name=name, **common, **where).remote(
                name, self.config.federation, c, port, keys, self.tracking_uri,
                self.config.tracking.database, package, tls=tls))
        with self._listen_errors("combiners", c.base_port), ray_errors("starting the combiners"):
            self.combiner_info = ray.get([h.ready.remote() for h in self.combiners])
        self._serving = list(self.combiners)
        self.controller = Controller.options(name=CONTROLLER, **common).remote(
            self.config, names, keys, self.tracking_uri, tls=tls)
        port = self.config.controller.port
        with self._listen_errors("controller", port), ray_errors("starting the controller"):
            self.gateway = ray.get(self.controller.ready.remote())["address"]
        self._serving.append(self.controller)
        return self

    @contextlib.contextmanager
    def _listen_errors(self, section: str, port: int) -> Iterator[None]:
        """A server that could not bind, told as the config field to change."""
        try:
            yield
        except ListenError as exc:
            where = (f"{section}.{'base_port' if section == 'combiners' else 'port'} {port}"
                     if exc.in_use and port else f"{section}.host {getattr(self.config, section).host}")
            who = f"{section[:-1]}-{self._index(exc.address)}" if section == "combiners" \
                else "the controller"
            raise TransportError(f"{self.config.source}: {where}: {who} {exc}") from None

    def _index(self, address: str) -> int:
        base = self.config.combiners.base_port
        port = int(address.rpartition(":")[2] or 0)
        return port - base if base and port >= base else 0

    def _take_lease(self) -> None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "data_dir": str(self.config.resolved_data_dir())}
        deadline = time.monotonic() + LEASE_WAIT_S
        while True:
            try:
                self.lease = Lease.options(name=LEASE, namespace=self.namespace).remote(holder)
                return
            except ValueError:  # the name is taken (ActorAlreadyExistsError)
                pass
            other = self._lease_holder()
            if other is not None:
                raise AlreadyRunning(
                    f"federation {self.config.federation} is already running in the Ray cluster "
                    f"(driver pid {other.get('pid')} on {other.get('host')}, data "
                    f"{other.get('data_dir')}); stop it first")
            if time.monotonic() > deadline:  # pragma: no cover - a lease that never goes
                raise AlreadyRunning(f"federation {self.config.federation}: its lease in the "
                                     "Ray cluster is held by a driver that does not answer")
            time.sleep(0.3)  # its driver has just died: Ray is removing the lease

    def _lease_holder(self) -> dict[str, Any] | None:
        """Who holds the federation's lease, if a live driver does."""
        try:
            lease = ray.get_actor(LEASE, namespace=self.namespace)
            with ray_errors("asking the federation's lease"):
                return ray.get(lease.who.remote(), timeout=5)
        except (ValueError, FedrayError):
            return None  # none, or going away with its driver

    def _remove_stale(self) -> None:
        entries = [e for e in ray.util.list_named_actors(all_namespaces=True)
                   if e["namespace"] == self.namespace and e["name"] != LEASE]
        if entries and self.lease is None:
            other = self._lease_holder()
            if other is not None:
                raise AlreadyRunning(
                    f"federation {self.config.federation} is already running in the Ray cluster "
                    f"(driver pid {other.get('pid')} on {other.get('host')}); stop it first")
        for entry in entries:
            log.warning("removing actor %s left over from an earlier run of %s", entry["name"],
                        self.config.federation)
            with contextlib.suppress(ValueError):  # gone meanwhile
                ray.kill(ray.get_actor(entry["name"], namespace=self.namespace), no_restart=True)
        nodes.release(self.config)  # the combiners' placement group an earlier run left

    def serve_package(self, sha256: str, data: bytes) -> None:
        """Make every combiner serve this compute package too (for a session to come):
        the ones the elastic tier added since the deploy as well, not the ones it drained."""
        handles = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] == self.namespace and entry["name"].startswith("combiner-"):
                with contextlib.suppress(ValueError):  # drained meanwhile
                    handles.append(ray.get_actor(entry["name"], namespace=self.namespace))
        with ray_errors("sending the compute package to the combiners"):
            ray.get([h.add_package.remote(sha256, data) for h in handles])

    def start_session(self, seed_model_id: str, package_sha256: str = "",
                      resume: bool = False, package_size: int = 0,
                      resume_only: bool = False) -> str | None:
        """Start a session; with ``resume``, continue the federation's unfinished one if any
        (``self.resumed_after`` then says after which round); with ``resume_only``, start
        none when there is none (None)."""
        with ray_errors("starting the session"):
            started = ray.get(self.controller.start_session.remote(
                seed_model_id, package_sha256, resume or resume_only, package_size,
                resume_only))
        self.resumed_after = started["resumed_after"]
        return started["session_id"]

    def follow(self, on_status: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Call ``on_status`` on every change until the session ends; return the last status.

        The controller sends only the round records this driver does not have yet; the
        statuses given to ``on_status`` carry every record since following began.
        """
        version, seen, lost_since = -1, False, None
        history: list[dict[str, Any]] = []
        known = 0  # records of the controller's current status that are in ``history``
        while True:
            lifecycle.checkpoint()  # a signal whose exception was lost stops us here
            with ray_errors(f"following the session of {self.config.federation}"):
                try:
                    version, status = ray.get(self.controller.watch.remote(
                        version, FOLLOW_POLL_S, known))
                    lost_since = None
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                    # Ray restarts the controller, which resumes the session: wait for it.
                    lost_since = lost_since or time.monotonic()
                    if time.monotonic() - lost_since > CONTROLLER_RESTART_S:
                        raise SessionError(f"the controller of {self.config.federation} is gone "
                                           f"and did not come back: {_first_line(exc)}") from None
                    log.info("controller unavailable (%s); waiting for Ray to restart it",
                             _first_line(exc))
                    version = -1
                    time.sleep(1.0)
                    continue
            if status is None:
                if seen:  # a restarted controller that no longer knows the session
                    raise SessionError(f"the controller of {self.config.federation} restarted "
                                       "and lost the running session; start it again")
                continue
            seen = True
            known = _merge_history(history, known, status)
            on_status(status)
            if status["state"] in {"finished", "failed"}:
                return status

    def _live(self, handles: list[Any]) -> list[Any]:
        """``handles`` without the deploy's combiners the elastic tier drained (and removed)."""
        live = {e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
                if e["namespace"] == self.namespace}
        drained = {id(h) for i, h in enumerate(self.combiners) if combiner_name(i) not in live}
        return [h for h in handles if id(h) not in drained]

    def shutdown(self, signum: int | None = None) -> None:
        """Stop and remove the federation's actors, also those a deploy cut short left.
        Stopped by a signal (``signum``), the controller first records its running session
        as stopped by it, before the combiners' clients leave."""
        handles = [h for h in [self.controller, *self.combiners] if h is not None]
        if signum is not None and self.controller in self._serving:
            why = f"stopped by {signal.Signals(signum).name} (fedray pid {os.getpid()})"
            try:
                with ray_errors("stopping the session"):
                    ray.get(self.controller.halt.remote(why), timeout=STOP_TIMEOUT_S)
            except FedrayError as exc:
                log.warning("the session was not stopped cleanly: %s", exc)
        serving = self._live(self._serving)
        if serving:
            try:
                with ray_errors("stopping the actors"):
                    ray.get([h.stop.remote() for h in serving], timeout=STOP_TIMEOUT_S)
            except FedrayError as exc:  # tearing down: report and go on
                log.warning("actors did not stop cleanly: %s", exc)
        for handle in handles:
            with contextlib.suppress(ValueError, ray.exceptions.RayError):
                ray.kill(handle, no_restart=True)
        if self.lease is not None or handles:  # this namespace is ours: nothing in it survives
            for entry in ray.util.list_named_actors(all_namespaces=True):
                if entry["namespace"] == self.namespace:
                    with contextlib.suppress(ValueError, ray.exceptions.RayError):
                        ray.kill(ray.get_actor(entry["name"], namespace=self.namespace),
                                 no_restart=True)
            with contextlib.suppress(ray.exceptions.RayError):
                nodes.release(self.config)  # the combiners' placement group
        self.combiners, self.controller, self.lease, self._serving = [], None, None, []


def _merge_history(history: list[dict[str, Any]], known: int, status: dict[str, Any]) -> int:
    """Add the status's new records to ``history`` and make them its ``history``; return
    how many records of the controller's status that covers now."""
    total = int(status.get("history_total", len(status["history"])))
    fresh = status["history"]
    if total < known:  # a restarted controller: a new status, sent whole
        known = 0
    first = total - len(fresh)  # the number of the first record sent
    history.extend(fresh[max(0, known - first):])
    status["history"] = history
    return total
