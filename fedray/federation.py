"""Driver-side handle on a federation: join or start Ray, deploy the actors, follow, tear down.

`fedray run`, `fedray demo`, the tests and the benchmark all deploy through this one class,
so they exercise exactly the path users take.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import ray

from fedray.actors.auth import BridgeKeys
from fedray.actors.combiner import Combiner
from fedray.actors.controller import Controller
from fedray.config import FederationConfig, RayConfig
from fedray.errors import SessionError
from fedray.keys import load_token_secret, tokens_issued
from fedray.tls import server_tls

log = logging.getLogger(__name__)

CONTROLLER = "controller"
FOLLOW_POLL_S = 5.0
CONTROLLER_RESTART_S = 120.0


def combiner_name(index: int) -> str:
    return f"combiner-{index}"


def connect_ray(rc: RayConfig, namespace: str) -> bool:
    """Join or start Ray; True when this process started a private local instance."""
    if ray.is_initialized():
        return False
    if rc.address == "local" and not os.environ.get("RAY_ADDRESS"):
        ray.init(address="local", num_cpus=rc.num_cpus, include_dashboard=rc.include_dashboard,
                 namespace=namespace, logging_level=logging.WARNING, log_to_driver=False)
        return True
    address = None if rc.address == "local" else rc.address  # None: RAY_ADDRESS of a Ray job
    ray.init(address=address, namespace=namespace, logging_level=logging.WARNING,
             log_to_driver=False)
    return False


# Credentials the actors need (the model store's keys). Actors of a cluster that was joined
# rather than started here do not inherit the driver's environment, so pass them along.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


class Federation:
    def __init__(self, config: FederationConfig, token: str | None, tracking_uri: str | None) -> None:
        self.config = config
        self.token = token
        self.tracking_uri = tracking_uri
        self.namespace = config.namespace
        self.combiners: list[Any] = []
        self.combiner_info: list[dict[str, Any]] = []
        self.controller: Any = None
        self.gateway = ""
        self.resumed_after: int | None = None

    def deploy(self, package: tuple[str, bytes] | None = None) -> Federation:
        """Start combiners and controller; ``package`` is (sha256, .tgz bytes) to serve."""
        tls = server_tls(self.config.tls, self.config.source)  # PEM bytes, read here once
        data_dir = self.config.resolved_data_dir()  # the token secret's bytes travel to the actors
        keys = BridgeKeys(self.token, load_token_secret(data_dir), tokens_issued(data_dir))
        self._remove_stale()
        c = self.config.combiners
        names = [combiner_name(i) for i in range(c.count)]
        common = {"namespace": self.namespace, "lifetime": "detached",
                  "runtime_env": {"env_vars": forwarded_env()}}
        for i, name in enumerate(names):
            port = c.base_port + i if c.base_port else 0
            self.combiners.append(Combiner.options(name=name, **common).remote(
                name, self.config.federation, c, port, keys, self.tracking_uri,
                self.config.tracking.database, package, tls=tls))
        self.combiner_info = ray.get([h.ready.remote() for h in self.combiners])
        self.controller = Controller.options(name=CONTROLLER, **common).remote(
            self.config, names, keys, self.tracking_uri, tls=tls)
        self.gateway = ray.get(self.controller.ready.remote())["address"]
        return self

    def _remove_stale(self) -> None:
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] != self.namespace:
                continue
            log.warning("removing actor %s left over from an earlier run of %s", entry["name"],
                        self.config.federation)
            ray.kill(ray.get_actor(entry["name"], namespace=self.namespace), no_restart=True)

    def serve_package(self, sha256: str, data: bytes) -> None:
        """Make every combiner serve this compute package (for the next session)."""
        ray.get([h.set_package.remote(sha256, data) for h in self.combiners])

    def start_session(self, seed_model_id: str, package_sha256: str = "",
                      resume: bool = False, package_size: int = 0) -> str:
        """Start a session; with ``resume``, continue the federation's unfinished one if any
        (``self.resumed_after`` then says after which round)."""
        started = ray.get(self.controller.start_session.remote(seed_model_id, package_sha256,
                                                               resume, package_size))
        self.resumed_after = started["resumed_after"]
        return started["session_id"]

    def follow(self, on_status: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Call ``on_status`` on every change until the session ends; return the last status."""
        version, seen, lost_since = -1, False, None
        while True:
            try:
                version, status = ray.get(self.controller.watch.remote(version, FOLLOW_POLL_S))
                lost_since = None
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                # Ray restarts the controller, which resumes the session: wait for it.
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > CONTROLLER_RESTART_S:
                    raise SessionError(f"the controller of {self.config.federation} is gone and "
                                       f"did not come back: {exc}") from None
                log.warning("controller unavailable (%s); waiting for Ray to restart it", exc)
                version = -1
                time.sleep(1.0)
                continue
            if status is None:
                if seen:  # a restarted controller that no longer knows the session
                    raise SessionError(f"the controller of {self.config.federation} restarted "
                                       "and lost the running session; start it again")
                continue
            seen = True
            on_status(status)
            if status["state"] in {"finished", "failed"}:
                return status

    def shutdown(self) -> None:
        handles = [h for h in [self.controller, *self.combiners] if h is not None]
        stops = [h.stop.remote() for h in handles]
        try:
            ray.get(stops, timeout=20)
        except Exception as exc:  # noqa: BLE001 - tearing down: report and go on
            log.warning("actors did not stop cleanly: %s", exc)
        for handle in handles:
            ray.kill(handle, no_restart=True)
        self.combiners, self.controller = [], None


def require_finished(status: dict[str, Any]) -> None:
    if status["state"] != "finished":
        raise SessionError(f"session {status['session_id']} failed: {status.get('reason', '')}")
