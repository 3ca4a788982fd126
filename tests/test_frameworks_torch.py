"""fedray.frameworks.torch: state_dicts as named arrays and back (bit for bit, buffers and
dtypes kept), stable names, clear refusals, and the TorchClient on the digits CNN, as a
Python app and as a compute package. Skipped when PyTorch is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install 'fedray[torch]'")

from fedray.errors import FedrayError  # noqa: E402
from fedray.frameworks.torch import (  # noqa: E402
    TorchClient,
    arrays_to_state_dict,
    get_arrays,
    set_arrays,
    state_dict_to_arrays,
)
from fedray.serialization import decode, encode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # examples/ imports from the repository root


class Mixed(torch.nn.Module):
    """BatchNorm (float running stats, int64 num_batches_tracked) and buffers of other dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3)
        self.head = torch.nn.Linear(12, 2).to(torch.float64)
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int32))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("halves", torch.randn(4).to(torch.float16))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)  # not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.bn(self.conv(x)), 1).to(torch.float64))


def _bits(arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple, bytes]]:
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in arrays.items()}


def test_round_trip_through_the_wire_is_bit_exact_with_buffers_and_dtypes() -> None:
    torch.manual_seed(1)
    trained = Mixed()
    for _ in range(3):  # moves the running stats and num_batches_tracked off their defaults
        trained(torch.randn(5, 1, 4, 4))
    arrays = get_arrays(trained)

    fresh = Mixed()
    set_arrays(fresh, decode(encode(arrays)))  # read-only views, as the runtime hands them over

    assert list(arrays) == list(trained.state_dict())  # names and order are the state_dict's
    assert "scratch" not in arrays
    assert arrays["bn.num_batches_tracked"].dtype == np.int64
    assert arrays["bn.num_batches_tracked"].shape == () and int(arrays["bn.num_batches_tracked"]) == 3
    assert {k: v.dtype.name for k, v in arrays.items() if k in ("steps", "mask", "halves")} == \
        {"steps": "int32", "mask": "bool", "halves": "float16"}
    assert arrays["head.weight"].dtype == np.float64
    assert _bits(get_arrays(fresh)) == _bits(arrays)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, trained.state_dict()[name]), name


def test_arrays_are_copies_and_state_dicts_own_their_memory() -> None:
    model = Mixed()
    arrays = get_arrays(model)
    with torch.no_grad():
        model.conv.weight.add_(1.0)
    assert not np.array_equal(arrays["conv.weight"], get_arrays(model)["conv.weight"])

    state = arrays_to_state_dict(decode(encode(arrays)))
    state["conv.weight"].add_(1.0)  # would fail on a read-only view
    assert state_dict_to_arrays(state)["conv.bias"].dtype == np.float32


def test_names_are_stable_when_the_model_is_rebuilt() -> None:
    from examples.digits_torch.client.model import DigitsCNN, build_model

    first, again = get_arrays(build_model(0)), get_arrays(DigitsCNN())
    assert list(first) == list(again) == [
        "conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean",
        "bn1.running_var", "bn1.num_batches_tracked", "conv2.weight", "conv2.bias",
        "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
        "bn2.num_batches_tracked", "fc.weight", "fc.bias"]
    assert _bits(first) == _bits(get_arrays(build_model(0)))  # the seed is reproducible
    assert _bits(first) != _bits(get_arrays(build_model(1)))


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("bn.running_var"), "missing 'bn.running_var'"),
    (lambda a: a.update(extra=np.zeros(1, np.float32)), "unexpected 'extra'"),
    (lambda a: a.update({"conv.bias": np.zeros(4, np.float32)}), "shape (3,)"),
    (lambda a: a.update({"bn.num_batches_tracked": np.array(3.0)}),
     "dtype int64, the arrays float64"),
])
def test_arrays_that_do_not_fit_are_refused_by_name(change, message) -> None:
    model = Mixed()
    arrays = get_arrays(model)
    change(arrays)
    with pytest.raises(FedrayError) as err:
        set_arrays(model, arrays)
    assert message in str(err.value)


def test_a_dtype_the_wire_cannot_carry_is_refused_by_name() -> None:
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with pytest.raises(FedrayError, match=r"'weight' is torch.bfloat16.*model.float\(\)"):
        get_arrays(model)


def _digits_client(tmp_path: Path) -> tuple[TorchClient, int, int]:
    from examples.digits.data import load_client_data, write_partitions
    from examples.digits_torch.app import make_client

    path = write_partitions(tmp_path, n_clients=3, seed=0)[0]
    data = load_client_data(path)
    return make_client(path), len(data.y), len(data.y_val)


def test_torch_client_trains_a_round_with_the_global_arrays(tmp_path: Path) -> None:
    from examples.digits_torch.seed import seed_model

    client, n_train, n_val = _digits_client(tmp_path)
    params = decode(encode(seed_model()))

    new, num_examples, metrics = client.train(params, {"epochs": 1, "round": 1})
    count, val = client.validate(new, {})

    assert {k: (v.shape, v.dtype) for k, v in new.items()} == \
        {k: (v.shape, v.dtype) for k, v in params.items()}
    assert int(new["bn1.num_batches_tracked"]) > 0  # the buffers trained too
    assert not np.array_equal(new["fc.weight"], params["fc.weight"])
    assert num_examples == n_train and count == n_val
    assert set(metrics) == {"loss", "accuracy"} and set(val) == {"accuracy", "loss"}
    assert all(isinstance(v, float) for v in [*metrics.values(), *val.values()])


def test_torch_client_runs_evaluate_in_eval_mode_without_grad_and_counts_its_data() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    seen = {}

    def train_one_round(m, loader, config):
        seen["train"] = m.training
        return None

    def evaluate(m, loader):
        seen["eval"] = (m.training, torch.is_grad_enabled())
        return {"accuracy": torch.tensor(0.5)}

    data = torch.utils.data.TensorDataset(torch.zeros(6, 2), torch.zeros(6))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    client = TorchClient(model, loader, train_one_round, evaluate)
    arrays = get_arrays(model)
    assert client.train(arrays, {})[1:] == (6, {})  # len(loader.dataset), not batches
    assert client.validate(arrays, {}) == (6, {"accuracy": 0.5})
    assert seen == {"train": True, "eval": (False, False)}
    assert model.training  # the mode it had before validate

    stream = TorchClient(model, iter([]), train_one_round)
    with pytest.raises(FedrayError, match="num_examples=N"):
        stream.train(arrays, {})
    with pytest.raises(FedrayError, match="no evaluate function"):
        stream.validate(arrays, {})


def test_a_piece_of_a_dataset_counts_its_own_examples_not_its_parents() -> None:
    from fedray.frameworks.base import count_examples

    data = torch.utils.data.TensorDataset(torch.zeros(10, 2), torch.zeros(10))
    part = torch.utils.data.Subset(data, [0, 3, 5])
    left, right = torch.utils.data.random_split(data, [7, 3])
    sampled = torch.utils.data.DataLoader(
        data, batch_size=2, sampler=torch.utils.data.SubsetRandomSampler([1, 2, 4, 8]))
    assert count_examples(part) == 3 and (count_examples(left), count_examples(right)) == (7, 3)
    assert count_examples(torch.utils.data.DataLoader(part, batch_size=2)) == 3
    assert count_examples(sampled) == 4  # what its sampler draws, not the whole dataset
    assert count_examples(torch.utils.data.DataLoader(data, batch_size=4)) == 10


class Tied(torch.nn.Module):
    """A language-model head that shares its weight with the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight


def test_a_model_with_tied_weights_is_saved_and_loaded(tmp_path: Path) -> None:
    from fedray.frameworks.torch import load_model_file, save_model_file

    torch.manual_seed(0)
    arrays = get_arrays(Tied())
    assert sorted(arrays) == ["embed.weight", "out.weight"]
    out = tmp_path / "tied.safetensors"
    save_model_file(arrays, out, build=Tied)  # safetensors refused the shared state_dict
    fresh = Tied()
    load_model_file(fresh, out)
    assert fresh.out.weight is fresh.embed.weight  # still tied
    assert _bits(get_arrays(fresh)) == _bits(arrays)


def test_the_digits_torch_compute_package_trains_and_validates(tmp_path: Path) -> None:
    from examples.digits.data import write_partitions
    from examples.digits_torch.seed import seed_model
    from fedray.packages import load_package

    path = write_partitions(tmp_path / "data", n_clients=2, seed=0)[0]
    package = load_package(ROOT / "examples" / "digits_torch" / "client")
    seed = encode(seed_model())

    new, num_examples, metrics = package.train(seed, {"epochs": 1}, str(path))
    count, val = package.validate(new, {}, str(path))

    assert decode(new).keys() == decode(seed).keys() and num_examples > 0 and count > 0
    assert set(metrics) == set(val) == {"loss", "accuracy"}
