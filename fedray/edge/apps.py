"""``--app MODULE[:OBJECT]``: the Python code an edge client (or a swarm of them) runs."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from fedray.edge.workers import CallbackWorker, Worker
from fedray.errors import ConfigError


def load_target(target: str) -> Any:
    """The object ``module[:object]`` names (imported from the working directory too)."""
    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
        if attr:
            obj = getattr(obj, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--app {target}: cannot import it ({exc})") from None
    return obj


def load_app(target: str) -> Worker:
    """``module[:object]`` whose ``train`` (and optionally ``validate``) are callbacks."""
    obj = load_target(target)
    train = getattr(obj, "train", None)
    if not callable(train):
        raise ConfigError(f"--app {target}: has no train(params, config) function")
    return CallbackWorker(train, getattr(obj, "validate", None))
