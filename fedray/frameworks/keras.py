"""Keras 3 models as fedray's named arrays, and a client from two training functions.

Names are paths of the layer tree, built the way Keras itself addresses weights inside a
``.weights.h5`` file: each sublayer is named after its class in snake case, with ``_1``,
``_2``… for the second and third of that class under the same parent, and each variable
by its own name; a variable Keras named itself (``add_weight()`` without ``name=``, which
Keras numbers per process: ``variable_4``) by its position among its layer's own weights
(``variable``, ``variable_1``…). So a model of two ``Conv2D``, a ``BatchNormalization``
and a ``Dense`` gives ``conv2d/kernel``, ``conv2d_1/bias``, ``batch_normalization/moving_mean``,
``dense/kernel``… Layer *names* (``dense_7``) are not used: Keras numbers them per process,
so a fresh instance of the same model would get new ones. Non-trainable weights
(BatchNormalization's moving statistics) travel too; random-seed state does not (it is
not in ``model.weights``). Each weight keeps its dtype and comes back bit for bit.

Importing this module imports keras, with the torch backend unless ``KERAS_BACKEND`` is
set (``pip install 'fedray[keras]'`` brings keras and torch); the helpers themselves work
with any backend.

    arrays = get_arrays(model)          # {path: np.ndarray}; the model must be built
    set_arrays(model, arrays)           # same names, shapes and dtypes, or a clear error
    client = KerasClient(model, (x, y), train_one_round, evaluate, val_data=(x_val, y_val))
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedray.errors import ConfigError, FedrayError
from fedray.frameworks.base import (
    FRAMEWORKS,
    Arrays,
    FrameworkClient,
    check_same_layout,
    check_wire_dtype,
    count_examples,
)

if "keras" not in sys.modules:  # once keras is imported, its backend is fixed
    os.environ.setdefault("KERAS_BACKEND", "torch")
try:
    import keras
except ImportError as exc:
    raise ImportError(FRAMEWORKS["keras"].hint("fedray.frameworks.keras")) from exc
if int(keras.__version__.split(".")[0]) < 3:
    raise ImportError(f"fedray.frameworks.keras needs Keras 3, found {keras.__version__}: "
                      f"pip install '{FRAMEWORKS['keras'].extra}'")

__all__ = ["KerasClient", "check_model_file", "get_arrays", "load_model_file", "named_weights",
           "save_model_file", "set_arrays", "weight_names"]

_HINT = "use a float32 policy for the weights (mixed precision keeps them float32)"


def to_snake_case(name: str) -> str:
    """``BatchNormalization`` -> ``batch_normalization``, ``Conv2D`` -> ``conv2d`` (as Keras)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _unique(name: str, taken: set[str]) -> str:
    """``name``, else the first free ``name_1``, ``name_2``…: a loop, because ``w_1`` may
    itself already be taken (weights ``w``, ``w``, ``w_1``)."""
    candidate, n = name, 0
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


# What Keras calls an add_weight() given no name=; it numbers these per process.
_AUTO_NAME = re.compile(r"variable(_\d+)?")


def _own_name(weight: keras.Variable, position: int) -> str:
    """A weight's name inside its layer: its own, unless Keras made it up (``variable_4``),
    then ``variable`` / ``variable_N`` by its position among the layer's own weights."""
    if _AUTO_NAME.fullmatch(weight.name) is None:
        return weight.name
    return "variable" if position == 0 else f"variable_{position}"


def named_weights(model: keras.layers.Layer) -> dict[str, keras.Variable]:
    """Every weight of ``model`` (trainable or not) under its stable path, in
    ``model.weights`` order: a layer's own weights first, then its sublayers'."""
    out: dict[str, keras.Variable] = {}
    seen_vars: set[int] = set()
    _walk(model, "", out, set(), seen_vars)
    if len(out) != len(seen_vars):  # a bug in the naming, never the user's model
        raise FedrayError(f"fedray named {len(seen_vars)} weights of {model.name!r} with "
                          f"{len(out)} names; please report this")
    if not out:
        raise FedrayError(f"the Keras model {model.name!r} has no weights yet: build it first "
                          "(start it with keras.Input(shape) or call model.build(shape))")
    return out


def _walk(layer: keras.layers.Layer, prefix: str, out: dict[str, keras.Variable],
          seen_layers: set[int], seen_vars: set[int]) -> None:
    if id(layer) in seen_layers:  # a layer used twice is named where it first appears
        return
    seen_layers.add(id(layer))
    children = list(getattr(layer, "_layers", ()))  # what Layer.weights itself walks
    inner = {id(w) for child in children for w in child.weights}
    own = [w for w in layer.weights if id(w) not in inner]
    taken: set[str] = set()
    for position, weight in enumerate(own):
        if id(weight) in seen_vars:
            continue
        seen_vars.add(id(weight))
        out[prefix + _unique(_own_name(weight, position), taken)] = weight
    used: set[str] = set()
    for child in children:
        segment = _unique(to_snake_case(type(child).__name__), used)
        _walk(child, f"{prefix}{segment}/", out, seen_layers, seen_vars)


def weight_names(model: keras.layers.Layer) -> list[str]:
    return list(named_weights(model))


def _numpy_dtype(name: str, weight: keras.Variable) -> np.dtype:
    try:
        dtype = np.dtype(weight.dtype)
    except TypeError:
        raise FedrayError(f"weight {name!r} is {weight.dtype}, which numpy and fedray cannot "
                          f"carry; {_HINT}") from None
    check_wire_dtype(name, dtype, _HINT)
    return dtype


def get_arrays(model: keras.layers.Layer) -> Arrays:
    """The model's weights as named numpy copies, each in its own dtype."""
    arrays: Arrays = {}
    for name, weight in named_weights(model).items():
        _numpy_dtype(name, weight)
        arrays[name] = _to_numpy(weight)
    return arrays


def _to_numpy(weight: keras.Variable) -> np.ndarray:
    value = weight.value
    if keras.backend.backend() == "torch":  # np.array() of a torch tensor warns under numpy 2
        return np.array(value.detach().cpu().numpy(), copy=True)
    return np.array(keras.ops.convert_to_numpy(value), copy=True)


def set_arrays(model: keras.layers.Layer, arrays: Mapping[str, np.ndarray]) -> None:
    """Assign ``arrays`` to the model's weights; they must have exactly its names, shapes
    and dtypes."""
    weights = named_weights(model)
    layout = {name: (_numpy_dtype(name, w), tuple(w.shape)) for name, w in weights.items()}
    check_same_layout(layout, arrays, "Keras model")
    for name, weight in weights.items():
        weight.assign(np.asarray(arrays[name]))


class KerasClient(FrameworkClient[keras.Model, Any]):
    """fedray callbacks for a built Keras 3 model.

    ``train_one_round(model, data, config)`` trains in place (``model.fit``…) and returns
    metrics (or None); ``evaluate(model, data)`` returns metrics (``model.evaluate(...,
    return_dict=True)`` fits). ``data`` is whatever these functions take; examples are
    counted for ``(x, y)`` pairs and sized datasets, otherwise give ``num_examples`` /
    ``val_examples`` (a ``keras.utils.PyDataset``'s length counts batches, not examples).
    """

    def get_arrays(self) -> Arrays:
        return get_arrays(self.model)

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        set_arrays(self.model, arrays)

    def count(self, data: Any) -> int | None:
        if isinstance(data, keras.utils.PyDataset):
            return None
        return count_examples(data)


def save_model_file(arrays: Mapping[str, np.ndarray], path: Any, build: Any = None) -> None:
    """``fedray models get --format keras --model pkg.module:build``: the model ``build()``
    returns, with these weights, saved whole as a ``.keras`` file (architecture and
    weights, no pickle): ``keras.models.load_model(path)`` needs no fedray to read it."""
    check_model_file(path, build)
    model = build()
    set_arrays(model, arrays)
    model.save(str(path))


def check_model_file(path: Any, build: Any = None) -> None:
    """What ``save_model_file`` would refuse, refused before the model is fetched."""
    if build is None:
        raise ConfigError("--format keras needs --model package.module:function that builds "
                          "the Keras model (a .keras file holds the architecture too); or write "
                          "--format npz and load it with fedray.frameworks.keras.load_model_file")
    if path is not None and not str(path).endswith(".keras"):
        raise ConfigError(f"-o {path}: Keras saves whole models to a .keras file; name it "
                          f"{Path(str(path)).stem}.keras")


def load_model_file(model: keras.layers.Layer, path: Any) -> None:
    """Load a safetensors or npz file written by ``fedray models get`` into ``model``."""
    if str(path).endswith(".npz"):
        with np.load(str(path), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    else:
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
    set_arrays(model, arrays)
