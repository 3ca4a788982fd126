import sys

from data import load_data
from model import evaluate, load_parameters, save_parameters, sgd

from fedn.utils.helpers.helpers import load_metadata, save_metadata

DEFAULTS = {"epochs": 5, "lr": 0.3, "batch_size": 32, "seed": 0}


def train(in_model_path, out_model_path, data_path=None):
    """Load the global model, train on this client's data, and write the update and its
    metadata (num_examples is what the federation weighs the update by)."""
    # The round's settings: FEDn's client writes them next to the input model.
    try:
        settings = {**DEFAULTS, **load_metadata(in_model_path)}
    except FileNotFoundError:
        settings = dict(DEFAULTS)
    X, y = load_data(data_path)
    weights = sgd(load_parameters(in_model_path), X, y, epochs=settings["epochs"],
                  lr=settings["lr"], batch_size=settings["batch_size"], seed=settings["seed"])

    metadata = {"num_examples": len(y), **evaluate(weights, X, y),
                "epochs": settings["epochs"], "lr": settings["lr"]}
    save_metadata(metadata, out_model_path)
    save_parameters(weights, out_model_path)


if __name__ == "__main__":
    train(sys.argv[1], sys.argv[2])
