"""What the framework helpers share: which frameworks exist, and the client shape.

``FrameworkClient`` turns a model, its data and two user functions,
``train_one_round(model, data, config) -> metrics`` and ``evaluate(model, data) ->
metrics``, into fedray's callbacks ``train(params, config) -> (params, num_examples,
metrics)`` and ``validate(params, config) -> (num_examples, metrics)``. A framework
subclass says only how named arrays go into and out of its model (``get_arrays`` /
``set_arrays``) and, if it must, how its data is run or counted. Nothing here imports a
framework: this module is numpy only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from fedray.errors import ConfigError, FedrayError
from fedray.serialization import _DTYPES

M = TypeVar("M")  # the framework's model
D = TypeVar("D")  # whatever the user's functions take as data: a loader, (x, y), ...
Arrays = dict[str, np.ndarray]
Metrics = dict[str, float]
TrainOneRound = Callable[[M, D, dict[str, Any]], Mapping[str, Any] | None]
Evaluate = Callable[[M, D], Mapping[str, Any] | None]

# The numpy dtypes fedray's wire format carries (safetensors' numeric types without bf16/fp8).
WIRE_DTYPES = frozenset(d.newbyteorder("=") for d in _DTYPES.values())


@dataclass(frozen=True, slots=True)
class Framework:
    """A framework fedray has helpers for: what must be importable, and the pip extra."""

    name: str
    label: str
    modules: tuple[str, ...]
    extra: str

    def missing(self) -> str | None:
        """The first needed module that cannot be imported, without importing any."""
        for module in self.modules:
            if importlib.util.find_spec(module) is None:
                return module
        return None

    def hint(self, who: str) -> str:
        return f"{who} needs {self.label}: pip install '{self.extra}'"


FRAMEWORKS: dict[str, Framework] = {
    "torch": Framework("torch", "PyTorch", ("torch",), "fedray[torch]"),
    "keras": Framework("keras", "Keras 3 with PyTorch", ("keras", "torch"), "fedray[keras]"),
}


def require(framework: str, who: str) -> None:
    """Raise ``ConfigError`` (exit code 2) with the install line if ``framework`` is absent."""
    if framework in FRAMEWORKS and FRAMEWORKS[framework].missing() is not None:
        raise ConfigError(FRAMEWORKS[framework].hint(who))


def check_wire_dtype(name: str, dtype: np.dtype, hint: str) -> None:
    """Refuse, naming the tensor, a dtype the wire format cannot carry (bfloat16, complex…)."""
    if np.dtype(dtype).newbyteorder("=") not in WIRE_DTYPES:
        raise FedrayError(f"tensor {name!r} is {dtype}, which fedray cannot send (it carries "
                          f"float16/32/64, (u)int8-64 and bool); {hint}")


def check_same_layout(model: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
                      arrays: Mapping[str, np.ndarray], what: str) -> None:
    """``arrays`` have exactly the model's names, shapes and dtypes, else one clear error."""
    missing = [n for n in model if n not in arrays]
    unexpected = [n for n in arrays if n not in model]
    if missing or unexpected:
        parts = [f"missing {_few(missing)}" if missing else "",
                 f"unexpected {_few(unexpected)}" if unexpected else ""]
        raise FedrayError(f"the arrays do not fit this {what}: "
                          + "; ".join(p for p in parts if p))
    for name, (dtype, shape) in model.items():
        arr = arrays[name]
        if tuple(arr.shape) != tuple(shape):
            raise FedrayError(f"tensor {name!r}: the {what} has shape {tuple(shape)}, "
                              f"the arrays {tuple(arr.shape)}")
        if np.dtype(arr.dtype) != np.dtype(dtype):
            raise FedrayError(f"tensor {name!r}: the {what} has dtype {np.dtype(dtype)}, "
                              f"the arrays {arr.dtype} (fedray never casts silently)")


def _few(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more"
                                                     if len(names) > 5 else "")


def count_examples(data: Any) -> int | None:
    """How many examples ``data`` holds, when that is plain: an ``(x, y)`` tuple (``x`` an
    array or a dict of arrays), a sized, indexable dataset (``len(data)``: a torch
    ``Subset`` is its own size, not its parent's), or a torch ``DataLoader`` (what its
    sampler draws, else its ``dataset``: ``len(loader)`` counts batches). ``None`` when it
    cannot tell (a mapping, an iterator...)."""
    if isinstance(data, tuple):
        return _length(data[0]) if data else None
    if isinstance(data, Mapping):
        return None
    if hasattr(data, "__getitem__"):
        return _length(data)
    dataset = getattr(data, "dataset", None)
    if dataset is None:
        return None
    drawn = _length(getattr(data, "sampler", None))  # a SubsetRandomSampler draws a part
    return drawn if drawn is not None else _length(dataset)


def _length(x: Any) -> int | None:
    if isinstance(x, Mapping):  # a multi-input model's {"name": array}
        return _length(next(iter(x.values()))) if x else None
    return len(x) if hasattr(x, "__len__") else None


def as_metrics(value: Any, where: str) -> Metrics:
    """A user function's metrics as ``{name: float}`` (tensors and numpy scalars included)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FedrayError(f"{where} must return a mapping of metric names to numbers (or "
                          f"None), got {type(value).__name__}")
    out: Metrics = {}
    for key, metric in value.items():
        try:
            out[str(key)] = float(metric)
        except (TypeError, ValueError):
            raise FedrayError(f"{where}: metric {key!r} is not a number ({metric!r:.40})") from None
    return out


class FrameworkClient(Generic[M, D]):
    """fedray's ``train``/``validate`` callbacks around one framework model.

    Each call loads the global arrays into ``model``, runs the user's function on it and,
    for ``train``, returns the model's arrays (same names, shapes and dtypes), the number
    of examples in ``train_data`` and the metrics. ``validate`` evaluates on ``val_data``
    (``train_data`` when not given). Give ``num_examples`` / ``val_examples`` when the
    data cannot be counted (an iterable dataset, a generator).
    """

    def __init__(self, model: M, train_data: D, train_one_round: TrainOneRound,
                 evaluate: Evaluate | None = None, *, val_data: D | None = None,
                 num_examples: int | None = None, val_examples: int | None = None) -> None:
        if not callable(train_one_round):
            raise TypeError("train_one_round must be a callable (model, data, config) -> metrics")
        if evaluate is not None and not callable(evaluate):
            raise TypeError("evaluate must be a callable (model, data) -> metrics")
        self.model = model
        self.train_data = train_data
        self.val_data = val_data
        self.train_one_round = train_one_round
        self.evaluate = evaluate
        self.num_examples = num_examples
        self.val_examples = val_examples

    # What a framework provides.
    def get_arrays(self) -> Arrays:
        raise NotImplementedError

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        raise NotImplementedError

    def run_train(self, config: dict[str, Any]) -> Mapping[str, Any] | None:
        return self.train_one_round(self.model, self.train_data, config)

    def run_evaluate(self, data: D) -> Mapping[str, Any] | None:
        return self.evaluate(self.model, data)

    def count(self, data: D) -> int | None:
        return count_examples(data)

    # fedray's callbacks.
    def train(self, params: Mapping[str, np.ndarray],
              config: dict[str, Any]) -> tuple[Arrays, int, Metrics]:
        self.set_arrays(params)
        metrics = as_metrics(self.run_train(dict(config)), "train_one_round")
        return self.get_arrays(), self._examples(self.train_data, self.num_examples,
                                                 "num_examples"), metrics

    def validate(self, params: Mapping[str, np.ndarray],
                 config: dict[str, Any]) -> tuple[int, Metrics]:
        if self.evaluate is None:
            raise FedrayError(f"this {type(self).__name__} has no evaluate function")
        data, given = ((self.val_data, self.val_examples) if self.val_data is not None
                       else (self.train_data, self.num_examples))
        self.set_arrays(params)
        metrics = as_metrics(self.run_evaluate(data), "evaluate")
        return self._examples(data, given, "val_examples"), metrics

    def _examples(self, data: D, given: int | None, option: str) -> int:
        count = given if given is not None else self.count(data)
        if count is None:
            raise FedrayError(f"cannot count the examples in a {type(data).__name__}: give "
                              f"{type(self).__name__}(..., {option}=N)")
        return int(count)
