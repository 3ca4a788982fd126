"""The strategies' client halves an edge client runs: imported by name, one per session.

Every task of a session whose strategy has a client half names it
(``package.module:Class``). A half runs code on this machine, so only some may be
imported: fedray's own (modules under ``fedray.``) always, any other only when the user
allowed its module (``fedray edge start --allow-client-half MODULE``, or
``EdgeSettings.client_halves``). A half is made once per session and kept while that
session (or the one before it) runs: a protocol's stages share its state.
"""

from __future__ import annotations

from collections import OrderedDict

from fedray.errors import ConfigError
from fedray.messages import Task
from fedray.strategies.client_half import ClientHalf
from fedray.strategies.declaration import CLIENT_HALF
from fedray.strategies.loading import load_object

KEPT = 2  # sessions whose halves are kept (the one running and the one before)


def allowed(name: str, allow: tuple[str, ...]) -> bool:
    """Whether the client half ``name`` may be imported here."""
    module = name.partition(":")[0]
    return any(module == m or module.startswith(m + ".") for m in ("fedray", *allow))


class ClientHalves:
    def __init__(self, allow: tuple[str, ...] = ()) -> None:
        self.allow = tuple(m.strip() for m in allow if m.strip())
        self._halves: OrderedDict[tuple[str, str], ClientHalf] = OrderedDict()

    def for_task(self, task: Task) -> ClientHalf | None:
        """The half this task's strategy runs here (None: it has none); ConfigError when
        the half is not allowed or does not load, and the task fails."""
        name = task.client_half
        if not name:
            return None
        key = (task.session_id, name)
        half = self._halves.get(key)
        if half is None:
            half = self._make(name)
            self._halves[key] = half
            while len(self._halves) > KEPT:
                self._halves.popitem(last=False)
        return half

    def _make(self, name: str) -> ClientHalf:
        if not CLIENT_HALF.fullmatch(name):
            raise ConfigError(f"the task names client half {name[:100]!r}, which is not "
                              "package.module:Class")
        module = name.partition(":")[0]
        if not allowed(name, self.allow):
            raise ConfigError(f"the session's strategy runs client half {name!r} on its "
                              f"clients; this client does not run it unless you allow it: "
                              f"--allow-client-half {module}")
        cls = load_object(name, "client half")
        if not (isinstance(cls, type) and issubclass(cls, ClientHalf)):
            raise ConfigError(f"client half {name!r} is not a "
                              "fedray.strategies.ClientHalf subclass")
        return cls()
