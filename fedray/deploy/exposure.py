"""How exposed a federation is, and whether it may start so: who could join it, and
who could read what crosses the network.

The shared token must be strong; without one, and without per-client credentials that
this federation's secret vouches for, anyone who reaches the gateway could join, which is
refused unless nothing off this machine reaches it (loopback hosts) or the operator said
so (``--insecure``). A bridge that binds anything but loopback serves TLS: with the
config's ``tls.cert``, else with the federation's own CA (``fedray.deploy.certificates``);
plaintext there needs ``--insecure`` and is warned about on every start.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedray.bridge.addresses import is_loopback
from fedray.config import FederationConfig
from fedray.errors import ConfigError


def federation_token(config: FederationConfig) -> str | None:
    """The shared token from ``$auth.token_env``; a guessable one stops `fedray run`."""
    from fedray.bridge.keys import check_shared_token

    token = os.environ.get(config.auth.token_env) or None
    check_shared_token(token, config.auth.token_env)
    return token


# With it, Ray takes 127.0.0.1 as the node's address and every Ray server binds it (Ray
# 2.60, measured: the GCS, raylets, workers, the dashboard agent and its metrics port;
# without it they bind every interface). Ray reads it when it is first imported.
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


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


def client_tokens_vouched(tracking_uri: str, config: FederationConfig,
                          data_dir: Path) -> tuple[bool, int]:
    """(whether the bridge will require per-client tokens, how many token rows in tracking
    do not verify): exactly what the gates decide (``fedray.bridge.client_tokens``), so
    that a forged or keyless row no longer passes for a closed bridge."""
    from fedray.bridge.keys import load_token_secret, tokens_issued
    from fedray.tracking.store import TrackingStore
    from fedray.tracking.tokens import read_token_rows

    secret = load_token_secret(data_dir, create=False)
    store = TrackingStore.from_uri(tracking_uri, config.tracking.database)
    try:
        rows = read_token_rows(store)
    finally:
        store.close()
    vouched = sum(1 for row in rows if row.verifies(secret))
    return vouched > 0 or tokens_issued(data_dir), len(rows) - vouched


def bridge_transport(config: FederationConfig, insecure: bool) -> tuple[str, str | None]:
    """How the bridge serves: ``"config"`` (the config's tls.cert), ``"plaintext"``
    (loopback, or off loopback with ``--insecure``) or ``"auto"`` (the federation's own
    CA); and a warning to print on every start, if any."""
    if config.tls.cert is not None:
        return "config", None
    if is_loopback(config.controller.host) and is_loopback(config.combiners.host):
        return "plaintext", None
    if insecure:
        return "plaintext", (
            f"the gateway and combiners serve plaintext on {config.controller.host} and "
            f"{config.combiners.host} (--insecure): tokens, models and updates cross the "
            "network unencrypted and can be read or changed on the way")
    return "auto", None
