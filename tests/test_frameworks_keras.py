"""fedray.frameworks.keras: Keras 3 weights as named arrays and back (bit for bit,
non-trainable weights and dtypes kept), names from the layer tree that survive a rebuild,
clear refusals, and the KerasClient on the digits CNN, as a Python app and as a compute
package. Skipped when Keras 3 or PyTorch (its backend here) is not installed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="PyTorch is not installed: pip install 'fedray[keras]'")
os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", minversion="3",
                            reason="Keras 3 is not installed: pip install 'fedray[keras]'")

from keras import layers  # noqa: E402

# Keras 3.15's own fit() converts torch tensors with np.array(), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

from fedray.errors import FedrayError  # noqa: E402
from fedray.frameworks.keras import (  # noqa: E402
    KerasClient,
    get_arrays,
    named_weights,
    set_arrays,
    weight_names,
)
from fedray.serialization import decode, encode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # examples/ imports from the repository root


class Counter(layers.Layer):
    """A layer with a non-trainable int32 weight next to a trainable float one."""

    def build(self, input_shape) -> None:
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")
        self.calls = self.add_weight(shape=(), initializer="zeros", dtype="int32",
                                     trainable=False, name="calls")

    def call(self, x):
        return x * self.scale


def _small() -> keras.Model:
    return keras.Sequential([keras.Input((4,)), layers.Dense(3), layers.BatchNormalization(),
                             Counter(), layers.Dropout(0.1), layers.Dense(2)])


def _bits(arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple, bytes]]:
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in arrays.items()}


def test_round_trip_through_the_wire_is_bit_exact_with_non_trainable_weights() -> None:
    trained = _small()
    trained.compile(optimizer="sgd", loss="mse")
    trained.fit(np.random.default_rng(0).normal(size=(16, 4)).astype("float32"),
                np.zeros((16, 2), "float32"), epochs=1, verbose=0)  # moves the moving stats
    trained.layers[2].calls.assign(5)
    arrays = get_arrays(trained)

    fresh = _small()
    set_arrays(fresh, decode(encode(arrays)))  # read-only views, as the runtime hands them over

    assert len(arrays) == len(trained.weights)  # every weight, the seed generator's state not
    assert not np.allclose(arrays["batch_normalization/moving_mean"], 0.0)
    assert arrays["counter/calls"].dtype == np.int32 and int(arrays["counter/calls"]) == 5
    assert _bits(get_arrays(fresh)) == _bits(arrays)
    assert all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), trained.get_weights(),
                                                    strict=True))


def test_names_are_layer_paths_that_survive_a_rebuild_in_the_same_process() -> None:
    first, second = _small(), _small()  # Keras names the second one's layers dense_2, dense_3…
    assert first.layers[0].name != second.layers[0].name
    assert weight_names(first) == weight_names(second) == [
        "dense/kernel", "dense/bias", "batch_normalization/gamma", "batch_normalization/beta",
        "batch_normalization/moving_mean", "batch_normalization/moving_variance",
        "counter/scale", "counter/calls", "dense_1/kernel", "dense_1/bias"]


def test_nested_and_subclassed_models_get_paths_and_shared_layers_one_name() -> None:
    class Tower(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.shared = layers.Dense(4)
            self.inner = keras.Sequential([layers.Dense(4), layers.Dense(2)])
            self.offset = self.add_weight(shape=(2,), initializer="zeros", name="offset")

        def call(self, x):
            return self.inner(self.shared(self.shared(x))) + self.offset

    tower = Tower()
    tower(np.zeros((1, 4), "float32"))
    names = weight_names(tower)
    assert names == ["offset", "dense/kernel", "dense/bias", "sequential/dense/kernel",
                     "sequential/dense/bias", "sequential/dense_1/kernel",
                     "sequential/dense_1/bias"]
    assert len(named_weights(tower)) == len(tower.weights)


class Unnamed(layers.Layer):
    """add_weight() without name=: Keras numbers these per process (variable_4…)."""

    def build(self, input_shape) -> None:
        self.a = self.add_weight(shape=(input_shape[-1],), initializer="ones")
        self.named = self.add_weight(shape=(2,), initializer="zeros", name="scale")
        self.b = self.add_weight(shape=(3,), initializer="zeros")

    def call(self, x):
        return x * self.a


def test_unnamed_weights_of_a_custom_layer_get_the_same_names_in_every_build() -> None:
    def build() -> keras.Model:
        return keras.Sequential([keras.Input((4,)), Unnamed()])

    first, second = build(), build()
    assert first.weights[0].name != second.weights[0].name  # Keras's own names moved on
    assert weight_names(first) == weight_names(second) == [
        "unnamed/variable", "unnamed/scale", "unnamed/variable_2"]
    arrays = get_arrays(first)
    arrays["unnamed/variable_2"] = np.full(3, 7.0, np.float32)
    set_arrays(second, arrays)
    np.testing.assert_array_equal(get_arrays(second)["unnamed/variable_2"], 7.0)


def test_a_name_made_unique_never_takes_one_already_given() -> None:
    class Clash(layers.Layer):
        def build(self, input_shape) -> None:
            for n, name in enumerate(["w", "w", "w_1"]):
                setattr(self, f"v{n}", self.add_weight(shape=(n + 1,), name=name))

        def call(self, x):
            return x

    model = keras.Sequential([keras.Input((4,)), Clash()])
    assert weight_names(model) == ["clash/w", "clash/w_1", "clash/w_1_1"]
    assert len(named_weights(model)) == len(model.weights) == 3


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("dense/bias"), "missing 'dense/bias'"),
    (lambda a: a.update(extra=np.zeros(1, np.float32)), "unexpected 'extra'"),
    (lambda a: a.update({"dense/bias": np.zeros(4, np.float32)}), "shape (3,)"),
    (lambda a: a.update({"counter/calls": np.array(5.0)}), "dtype int32, the arrays float64"),
])
def test_arrays_that_do_not_fit_are_refused_by_name(change, message) -> None:
    model = _small()
    arrays = get_arrays(model)
    change(arrays)
    with pytest.raises(FedrayError) as err:
        set_arrays(model, arrays)
    assert message in str(err.value)


def test_an_unbuilt_model_is_refused_with_what_to_do() -> None:
    with pytest.raises(FedrayError, match="no weights yet: build it first"):
        get_arrays(keras.Sequential([layers.Dense(2)]))


def test_keras_client_trains_a_round_with_the_global_arrays(tmp_path: Path) -> None:
    from examples.digits.data import load_client_data, write_partitions
    from examples.digits_keras.app import make_client
    from examples.digits_keras.seed import seed_model

    path = write_partitions(tmp_path, n_clients=3, seed=0)[0]
    data = load_client_data(path)
    client = make_client(path)
    params = decode(encode(seed_model()))

    new, num_examples, metrics = client.train(params, {"epochs": 1})
    count, val = client.validate(new, {})

    assert sorted(params) == sorted(weight_names(client.model))  # decode: the file's order
    assert {k: (v.shape, v.dtype) for k, v in new.items()} == \
        {k: (v.shape, v.dtype) for k, v in params.items()}
    assert not np.array_equal(new["batch_normalization/moving_mean"],
                              params["batch_normalization/moving_mean"])
    assert num_examples == len(data.y) and count == len(data.y_val)
    assert set(metrics) == {"loss", "accuracy"} and set(val) == {"accuracy", "loss"}


def test_keras_client_counts_pairs_and_asks_for_counts_it_cannot_make() -> None:
    model = _small()
    arrays = get_arrays(model)
    pairs = (np.zeros((5, 4), "float32"), np.zeros((5, 2), "float32"))
    client = KerasClient(model, pairs, lambda m, d, c: {"loss": np.float32(1.5)})
    assert client.train(arrays, {})[1:] == (5, {"loss": 1.5})

    class Batches(keras.utils.PyDataset):  # its len() counts batches, not examples
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i):
            return pairs

    with pytest.raises(FedrayError, match="num_examples=N"):
        KerasClient(model, Batches(), lambda m, d, c: None).train(arrays, {})
    assert KerasClient(model, Batches(), lambda m, d, c: None,
                       num_examples=10).train(arrays, {})[1] == 10


def test_the_digits_keras_compute_package_trains_and_validates(tmp_path: Path) -> None:
    from examples.digits.data import write_partitions
    from examples.digits_keras.seed import seed_model
    from fedray.packages import load_package

    path = write_partitions(tmp_path / "data", n_clients=2, seed=0)[0]
    package = load_package(ROOT / "examples" / "digits_keras" / "client")
    seed = encode(seed_model())

    new, num_examples, metrics = package.train(seed, {"epochs": 1}, str(path))
    count, val = package.validate(new, {}, str(path))

    assert decode(new).keys() == decode(seed).keys() and num_examples > 0 and count > 0
    assert set(metrics) == set(val) == {"loss", "accuracy"}
