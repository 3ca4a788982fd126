"""Text that came from another machine, made safe to store and to show on a terminal.

A client's event message or name may carry terminal escape sequences (clear the screen,
retitle the window, fake a hyperlink), carriage returns that overwrite a line, or Unicode
direction overrides that reorder it. ``printable`` drops them all, whole sequences
included, and keeps newlines and tabs. ``json_text`` is JSON that any parser accepts: a
client's NaN or infinity becomes null, never Python's ``NaN``/``Infinity``. Imports
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
