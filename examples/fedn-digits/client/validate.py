import sys

from data import load_data
from model import evaluate, load_parameters

from fedn.utils.helpers.helpers import save_metrics


def validate(in_model_path, out_json_path, data_path=None):
    """Accuracy and loss of the global model on this client's local validation split."""
    X, y = load_data(data_path, validation=True)
    save_metrics(evaluate(load_parameters(in_model_path), X, y), out_json_path)


if __name__ == "__main__":
    validate(sys.argv[1], sys.argv[2])
