"""Child processes that die with the thread that started them, even if it is SIGKILLed.

``fate_shared()`` is the ``preexec_fn`` for that (Linux's ``PR_SET_PDEATHSIG``). Kept out
of ``fedray.deploy.lifecycle``, whose teardown relies on it, because lower layers start
children too: ``fedray.tracking.embedded`` launches nx-27017 with it, and tracking must
not import the deploy layer.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def fate_shared(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel send ``sig`` to the child when the thread that
    started it ends (Linux; None elsewhere). Start such children from a long-lived thread."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)

    return preexec
