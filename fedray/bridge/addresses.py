"""Which addresses are this machine's alone, and which one other hosts reach it by.

Shared by the driver (who may join, what a certificate names), the actors (what to
advertise) and the edge (where a credential may go over plaintext). No grpc, no Ray.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket

LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or name): nothing off this machine reaches it."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback_target(target: str) -> bool:
    """Whether ``HOST:PORT`` names this machine's loopback."""
    host = target.rsplit(":", 1)[0] if ":" in target else target
    return is_loopback(host)


def primary_ip() -> str:
    """The address other hosts most likely reach this one by: the source address of the
    default route (a UDP connect sends no packet), else what the host name resolves to."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
        return s.getsockname()[0]
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"
