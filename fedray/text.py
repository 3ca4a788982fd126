"""Text that came from another machine, made safe to store and to show on a terminal.

A client's event message or name may carry terminal escape sequences (clear the screen,
retitle the window, fake a hyperlink), carriage returns that overwrite a line, or Unicode
direction overrides that reorder it. ``printable`` drops them all, whole sequences
included, and keeps newlines and tabs. ``json_text`` is JSON that any parser accepts: a
client's NaN or infinity becomes null, never Python's ``NaN``/``Infinity``. ``redact``
masks the secrets of a URI (a password, ``secret_key=``, ...) before it is shown. Imports
nothing heavy, so every side can use it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# CSI (ESC [ or its 8-bit form), OSC up to BEL or ST (bounded, never past a line end),
# and the other two-character ESC sequences; each is removed with its parameters.
_SEQUENCES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b\n]{0,512}(?:\x07|\x1b\\)?"
    r"|\x1b[@-_]"
)
# C0 and C1 controls but newline and tab, DEL, and bidirectional marks and overrides.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, newlines: bool = True) -> str:
    """``text`` without control characters or escape sequences; with ``newlines=False``
    also without newlines and tabs (for one-line fields)."""
    text = _CONTROLS.sub("", _SEQUENCES.sub("", text))
    return text if newlines else re.sub(r"[\n\t]", " ", text)


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts, lists and tuples) as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def json_text(value: Any, **options: Any) -> str:
    """``json.dumps`` that never writes NaN or Infinity (invalid JSON): they become null."""
    return json.dumps(finite(value), allow_nan=False, **options)


# Where a URI's host list may start: an '@' followed by host characters up to a '/', a '?'
# or the end. The last such '@' ends the userinfo, so a password with unescaped '@', '/' or
# '?' in it is masked whole.
_USERINFO_END = re.compile(r"@(?=[A-Za-z0-9._~%,:\[\]-]*(?:[/?#]|$))")
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|credential|signature|authmechanismprop"
                           r"|access_?key", re.IGNORECASE)


def redact(uri: str) -> str:
    """``uri`` fit for messages, logs and reprs: the password of its userinfo (up to the
    host, however many '@' it holds) and the values of query parameters that carry
    secrets (``password=``, ``tlsCertificateKeyFilePassword=``, ``secret_key=``,
    ``authMechanismProperties=AWS_SESSION_TOKEN:...``) become ``***``."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    ends = [m for m in _USERINFO_END.finditer(rest)
            if "=" not in rest[: m.start()].partition("?")[2]]  # not an '@' of a query value
    end = ends[-1] if ends else None
    if end is not None:
        user, colon, _ = rest[: end.start()].partition(":")
        rest = f"{user}{':***' if colon else ''}@{rest[end.end():]}"
    head, qmark, query = rest.partition("?")
    if not qmark:
        return f"{scheme}://{head}"
    params = [_masked(param) for param in re.split(r"([&;])", query)]
    return f"{scheme}://{head}?{''.join(params)}"


def _masked(param: str) -> str:
    key, eq, _ = param.partition("=")
    return f"{key}=***" if eq and _SECRET_PARAM.search(key) else param
