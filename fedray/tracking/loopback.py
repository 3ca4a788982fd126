"""This machine as the embedded tracking server sees it: its loopback address and probes.

Whether a recorded server can be reused, or a new one started where the old one was,
comes down to a few questions about this machine: does a process with that PID live, is
a loopback port free, does a MongoDB-speaking server answer there. ``embedded`` asks
them; they are kept here so that module is only the server's lifecycle and the hand-over
between commands.
"""

from __future__ import annotations

import os
import socket

from pymongo import MongoClient
from pymongo.errors import PyMongoError

HOST = "127.0.0.1"


def mongo_uri(port: int) -> str:
    return f"mongodb://{HOST}:{port}/"


def ping(uri: str, timeout_s: float = 1.0) -> bool:
    """Whether a MongoDB-speaking server answers ``ping`` at ``uri`` within ``timeout_s``."""
    ms = max(1, int(timeout_s * 1000))
    client: MongoClient = MongoClient(
        uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms
    )
    try:
        client.admin.command("ping")
        return True
    except PyMongoError:
        return False
    finally:
        client.close()


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (signal 0; nothing is sent)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    if not 1024 <= port <= 65535:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True
