"""Framework helpers: models of PyTorch and Keras as fedray's named numpy arrays, and back.

numpy needs nothing (a fedray model already is ``dict[str, np.ndarray]``). The helpers
live in their own modules, which import their framework when they are imported and not
before: importing ``fedray`` or ``fedray.frameworks`` imports neither torch nor keras.

    fedray.frameworks.torch   get_arrays / set_arrays (state_dict, buffers included),
                              state_dict_to_arrays / arrays_to_state_dict, TorchClient
    fedray.frameworks.keras   get_arrays / set_arrays (stable layer paths, non-trainable
                              weights included), weight_names, KerasClient

Both clients share ``FrameworkClient``: ``train_one_round(model, data, config)`` and
``evaluate(model, data)`` become fedray's ``train``/``validate`` callbacks. See
docs/frameworks.md for the naming and dtype rules.
"""

from fedray.frameworks.base import FRAMEWORKS, Framework, FrameworkClient, require

__all__ = ["FRAMEWORKS", "Framework", "FrameworkClient", "require"]
