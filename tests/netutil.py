"""Small network helpers shared by the tests."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_block(size: int, avoid: tuple[int, ...] = ()) -> int:
    """A port p with p .. p + size - 1 all free on 127.0.0.1 a moment ago (combiner i
    listens on ``combiners.base_port + i``), none of them in ``avoid``."""
    for _ in range(100):
        (base,) = free_ports(1)
        block = range(base, base + size)
        if base + size > 65535 or any(port in avoid for port in block):
            continue
        socks = []
        try:
            for port in block[1:]:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError(f"no {size} consecutive free ports on 127.0.0.1")
