"""Which optional parts of fedray are installed, and the one-line hint when one is missing.

``pip install fedray`` is the edge: the client, ``fedray edge``, ``fedray package``. The
federation itself is the ``server`` extra, the bundled workloads the ``examples`` extra
(see pyproject.toml; a test keeps ``EXTRAS`` in step with it). Commands that need an extra
check for its modules before they do anything, with ``importlib.util.find_spec`` (nothing
is imported), and ``hint_for`` turns an import that fails later anyway into the same line.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from fedray.errors import MissingExtra

# extra -> the top-level modules of its requirements, in pyproject.toml's order
EXTRAS: dict[str, tuple[str, ...]] = {
    "server": ("ray", "pymongo", "minio", "nx_27017", "matplotlib", "fastapi", "uvicorn",
               "plotly"),
    "examples": ("sklearn",),
}
WHAT = {"server": "the server parts", "examples": "the examples"}

F = TypeVar("F", bound=Callable[..., Any])


def hint(command: str, extras: Iterable[str], missing: Iterable[str] = ()) -> str:
    """``fedray run needs the server parts: pip install "fedray[server]"``; when the extra
    is installed in part (some of its modules are here), also which are missing."""
    extras = tuple(extras)
    what = " and ".join(WHAT[e] for e in extras)
    line = f'{command} needs {what}: pip install "fedray[{",".join(extras)}]"'
    everything = [m for e in extras for m in EXTRAS[e]]
    missing = sorted(set(missing))
    if missing and len(missing_modules(everything)) < len(everything):
        line += f" (not installed here: {', '.join(missing)})"
    return line


def missing_modules(modules: Iterable[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(command: str, extras: Iterable[str], modules: Iterable[str] | None = None) -> None:
    """Raise ``MissingExtra`` unless ``modules`` (default: all of ``extras``') are present."""
    extras = tuple(extras)
    wanted = tuple(modules) if modules is not None else tuple(m for e in extras for m in EXTRAS[e])
    missing = missing_modules(wanted)
    if missing:
        raise MissingExtra(hint(command, extras, missing))


def needs(command: str, *extras: str, modules: Iterable[str] | None = None) -> Callable[[F], F]:
    """Decorate a click callback: check for the extra first (``--help`` still works)."""
    wanted = tuple(modules) if modules is not None else None

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            require(command, extras, wanted)
            return fn(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return wrap


def hint_for(command: str, exc: ModuleNotFoundError) -> str | None:
    """The hint for an import of an extra's module that failed, else None (a real bug)."""
    root = (exc.name or "").partition(".")[0]
    for extra, modules in EXTRAS.items():
        if root in modules:
            return hint(command, (extra,), (root,))
    return None
