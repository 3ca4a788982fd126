"""How the actors keep their own memory flat over a long session (glibc's allocator).

A round allocates model-sized temporaries (upload buffers, float64 sums, the new model and
its encoding) in several threads. By default glibc hands each thread its own arena, keeps
freed blocks there for reuse, and raises its mmap threshold every time a mapped block of
up to 32 MiB is freed, so that later blocks of that size stay in an arena as well. The
effect is an actor whose resident memory climbs, in jumps of tens of MB, for the first
tens or hundreds of rounds, to a level set by which threads happened to do the work.

Two settings make it what the actor actually holds, measured with
``bench/round_overhead.py --rss-every``:

- ``tune_allocator`` (once, when an actor starts): a fixed mmap threshold of
  ``MMAP_THRESHOLD`` bytes. Larger blocks (the big tensors of a big model) get their own
  mapping, returned to the system when freed; the threshold no longer moves.
- ``release_free_memory`` (after each round): ``malloc_trim``, which gives the free pages
  of every arena back.

Both cost page faults when the memory is used again (about 30 ms per round for an 8 MB
model on the reference machine). Where the C library has neither call (musl, macOS),
both do nothing.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 16 << 20  # above the 8 MiB float64 blocks aggregation works in
M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def _libc(name: str, argtypes: list[Any]) -> Any:
    try:
        function = getattr(ctypes.CDLL(None), name)  # the C library this process uses
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


_MALLOPT = _libc("mallopt", [ctypes.c_int, ctypes.c_int])
_TRIM = _libc("malloc_trim", [ctypes.c_size_t])


def tune_allocator() -> None:
    """A fixed mmap threshold for this process (glibc stops adjusting it)."""
    if _MALLOPT is not None and not _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused")


def release_free_memory() -> None:
    """Give the pages of freed heap memory back to the system (a few ms; thread-safe)."""
    if _TRIM is not None:
        _TRIM(0)
