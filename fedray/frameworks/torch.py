"""PyTorch models as fedray's named arrays, and a client from two training functions.

Names are the ``state_dict`` keys (``conv.weight``, ``bn.running_mean``,
``bn.num_batches_tracked``): PyTorch derives them from the module's attribute names, so a
fresh instance of the same class has the same names. Everything ``state_dict`` holds
travels, buffers included, in its own dtype; values come back bit for bit. A dtype the
wire cannot carry (bfloat16, complex, float8) is refused with its tensor's name, never
cast silently. Importing this module imports torch; ``pip install 'fedray[torch]'``.

    arrays = get_arrays(model)          # {name: np.ndarray}, copies on the CPU
    set_arrays(model, arrays)           # same names, shapes and dtypes, or a clear error
    client = TorchClient(model, loader, train_one_round, evaluate, val_data=val_loader)
    fedray.EdgeClient(train=client.train, validate=client.validate)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedray.errors import FedrayError
from fedray.frameworks.base import (
    FRAMEWORKS,
    Arrays,
    FrameworkClient,
    check_same_layout,
    check_wire_dtype,
)

try:
    import torch
except ImportError as exc:
    raise ImportError(FRAMEWORKS["torch"].hint("fedray.frameworks.torch")) from exc

__all__ = ["TorchClient", "arrays_to_state_dict", "get_arrays", "load_model_file",
           "save_model_file", "set_arrays", "state_dict_to_arrays"]

_HINT = "convert it first (for example model.float())"


def _numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    try:
        return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
    except (TypeError, RuntimeError):  # bfloat16, float8, quantized: no numpy twin
        return None


def state_dict_to_arrays(state_dict: Mapping[str, torch.Tensor]) -> Arrays:
    """Each tensor as a numpy copy on the CPU, in the state_dict's order and dtypes."""
    arrays: Arrays = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise FedrayError(f"state_dict entry {name!r} is a {type(tensor).__name__}, "
                              "not a tensor")
        if tensor.layout != torch.strided:
            raise FedrayError(f"tensor {name!r} is {tensor.layout}; fedray sends dense tensors")
        dtype = _numpy_dtype(tensor.dtype)
        if dtype is None:
            raise FedrayError(f"tensor {name!r} is {tensor.dtype}, which numpy and fedray "
                              f"cannot carry; {_HINT}")
        check_wire_dtype(name, dtype, _HINT)
        value = tensor.detach().cpu().resolve_conj().resolve_neg()
        arrays[name] = np.array(value.numpy(), copy=True)
    return arrays


def arrays_to_state_dict(arrays: Mapping[str, np.ndarray]) -> OrderedDict[str, torch.Tensor]:
    """CPU tensors that own their memory (the runtime's arrays may be read-only views)."""
    return OrderedDict((name, torch.from_numpy(np.array(arr, copy=True)))
                       for name, arr in arrays.items())


def get_arrays(model: torch.nn.Module) -> Arrays:
    """``model.state_dict()`` as named numpy arrays: parameters and persistent buffers."""
    return state_dict_to_arrays(model.state_dict())


def set_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load ``arrays`` into ``model`` in place (on whatever device it is). They must have
    exactly the state_dict's names, shapes and dtypes."""
    current = model.state_dict()
    layout = {}
    for name, tensor in current.items():
        dtype = _numpy_dtype(tensor.dtype)
        if dtype is None:
            raise FedrayError(f"tensor {name!r} of the model is {tensor.dtype}, which fedray "
                              f"cannot carry; {_HINT}")
        layout[name] = (dtype, tuple(tensor.shape))
    check_same_layout(layout, arrays, "torch model")
    model.load_state_dict(arrays_to_state_dict(arrays), strict=True)


class TorchClient(FrameworkClient[torch.nn.Module, Any]):
    """fedray callbacks for a ``torch.nn.Module``.

    ``train_one_round(model, loader, config)`` trains in place and returns metrics (or
    None); it runs with the model in training mode. ``evaluate(model, loader)`` returns
    metrics; it runs in eval mode under ``torch.no_grad()``. The number of examples is
    ``len(loader.sampler)`` (else ``len(loader.dataset)``) unless
    ``num_examples``/``val_examples`` say otherwise.
    """

    def get_arrays(self) -> Arrays:
        return get_arrays(self.model)

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        set_arrays(self.model, arrays)

    def run_train(self, config: dict[str, Any]) -> Mapping[str, Any] | None:
        self.model.train()
        return self.train_one_round(self.model, self.train_data, config)

    def run_evaluate(self, data: Any) -> Mapping[str, Any] | None:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.evaluate(self.model, data)
        finally:
            self.model.train(was_training)


def save_model_file(arrays: Mapping[str, np.ndarray], path: Any, build: Any = None) -> None:
    """``fedray models get --format torch``: the arrays as a torch ``state_dict`` in a
    safetensors file (no pickle). Load it with ``load_model_file(model, path)`` or
    ``model.load_state_dict(safetensors.torch.load_file(path))``. With ``build`` (a function
    returning the model) the arrays are loaded into it first, so a mismatch is refused now.
    Each tensor is saved as its own copy of the arrays, not from the model's state_dict:
    safetensors refuses tensors that share memory, as tied weights do."""
    from safetensors.torch import save_file

    if build is not None:
        set_arrays(build(), arrays)
    save_file(dict(arrays_to_state_dict(arrays)), str(path))


def load_model_file(model: torch.nn.Module, path: Any) -> None:
    """Load a file written by ``fedray models get`` (safetensors, any format) into ``model``."""
    from safetensors.numpy import load_file

    set_arrays(model, load_file(str(path)))
