"""``package.module:attr`` names, imported: how a config names user code (a strategy, a
selection policy, a staleness function) without fedray importing it by itself."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from fedray.errors import ConfigError


def load_object(target: str, what: str) -> Any:
    """``package.module:attr``, imported; a ConfigError that says what failed otherwise.

    The working directory is importable, as it is for ``ray job submit --working-dir .``.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {target!r} must be package.module:name")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {target!r}: cannot import {module_name} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - user code failed while importing
        raise ConfigError(f"{what} {target!r}: importing {module_name} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{what} {target!r}: {module_name} has no {attr!r}") from None
    return obj
