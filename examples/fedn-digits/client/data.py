"""The client's data: a .npz with X (n, 64) in [0, 1], y, and a local X_val, y_val.

The ``startup`` entry point: when $FEDN_DATA_PATH names no file, it splits scikit-learn's
bundled digits (nothing is downloaded) into $FEDN_NUM_DATA_SPLITS parts (default 2) under
data/clients/<i>/digits.npz, as FEDn's examples split MNIST.
"""

import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def data_path(data_path=None):
    return data_path or os.environ.get("FEDN_DATA_PATH") or \
        os.path.join(HERE, "data", "clients", "1", "digits.npz")


def load_data(data_path_=None, validation=False):
    with np.load(data_path(data_path_), allow_pickle=False) as f:
        X, y = f["X"], f["y"]
        if validation and "X_val" in f.files and len(f["y_val"]):
            X, y = f["X_val"], f["y_val"]
        return X.astype(np.float32), y.astype(np.int64)


def split(out_dir=os.path.join(HERE, "data"), parts=None, seed=0):
    from sklearn.datasets import load_digits

    parts = parts or int(os.environ.get("FEDN_NUM_DATA_SPLITS", 2))
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    for i, idx in enumerate(np.array_split(order, parts), 1):
        n_val = max(1, int(0.15 * len(idx)))
        folder = os.path.join(out_dir, "clients", str(i))
        os.makedirs(folder, exist_ok=True)
        np.savez(os.path.join(folder, "digits.npz"), X=X[idx[n_val:]], y=y[idx[n_val:]],
                 X_val=X[idx[:n_val]], y_val=y[idx[:n_val]])


if __name__ == "__main__":
    if not os.path.isfile(data_path()):
        split()
