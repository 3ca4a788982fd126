"""The digits dataset cut into federated clients, from scikit-learn's bundled copy.

The demo must run offline, so the data is ``sklearn.datasets.load_digits`` (1,797 8x8
images shipped inside scikit-learn; nothing is downloaded). A stratified split keeps a
held-out test set that no client ever sees; the rest is the training pool, which
``partition`` deals out to clients either IID or with Dirichlet label skew. Files are plain
``.npz`` (read back with ``allow_pickle=False``) so an edge process or the compute package
can load them with numpy alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

Scheme = Literal["iid", "label_skew"]
LOCAL_VAL_FRACTION = 0.15
MIN_CLIENT_EXAMPLES = 10


class Split(NamedTuple):
    X_pool: np.ndarray
    y_pool: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


class ClientData(NamedTuple):
    X: np.ndarray
    y: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray


def load_split(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Features scaled to [0, 1] as float32, labels int64; the test split is stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    X_pool, X_test, y_pool, y_test = train_test_split(
        X, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Split(X_pool, y_pool, X_test, y_test)


def partition_indices(
    y: np.ndarray,
    n_clients: int,
    scheme: Scheme = "iid",
    seed: int = 0,
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """Disjoint index sets covering ``range(len(y))``, one per client.

    ``iid`` shuffles and deals evenly. ``label_skew`` draws, for each class, the share each
    client gets from Dirichlet(alpha) (smaller alpha, more skew) and redraws until every
    client holds at least ``MIN_CLIENT_EXAMPLES`` examples.
    """
    if n_clients < 1:
        raise ValueError(f"n_clients must be at least 1, got {n_clients}")
    if len(y) < n_clients * MIN_CLIENT_EXAMPLES:
        raise ValueError(f"{len(y)} examples are too few for {n_clients} clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(y)), n_clients)]
    if scheme != "label_skew":
        raise ValueError(f"unknown partition scheme {scheme!r} (use 'iid' or 'label_skew')")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for label in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == label))
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(r) for r in result) >= MIN_CLIENT_EXAMPLES:
            return result
    raise ValueError(f"could not draw a label-skewed partition with alpha={alpha}")


def partition(
    n_clients: int,
    scheme: Scheme = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each client's (X, y) drawn from the training pool of ``load_split``."""
    split = load_split(test_fraction=test_fraction, seed=seed)
    parts = partition_indices(split.y_pool, n_clients, scheme=scheme, seed=seed, alpha=alpha)
    return [(split.X_pool[idx], split.y_pool[idx]) for idx in parts]


def write_partitions(
    out_dir: Path | str,
    n_clients: int,
    scheme: Scheme = "iid",
    seed: int = 0,
    alpha: float = 0.5,
) -> list[Path]:
    """Write ``client-<i>.npz`` (X, y, X_val, y_val) per client and ``test.npz`` (X, y).

    Returns the client files in order; the test set is ``out_dir / "test.npz"``. A leading
    ``~`` in ``out_dir`` is the home directory (as in the README's command).
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    split = load_split(seed=seed)
    parts = partition_indices(split.y_pool, n_clients, scheme=scheme, seed=seed, alpha=alpha)
    rng = np.random.default_rng(seed + 1)
    paths = []
    for i, idx in enumerate(parts):
        idx = rng.permutation(idx)
        n_val = max(1, int(round(len(idx) * LOCAL_VAL_FRACTION)))
        val, fit = idx[:n_val], idx[n_val:]
        path = out / f"client-{i}.npz"
        np.savez(
            path,
            X=split.X_pool[fit],
            y=split.y_pool[fit],
            X_val=split.X_pool[val],
            y_val=split.y_pool[val],
        )
        paths.append(path)
    np.savez(out / "test.npz", X=split.X_test, y=split.y_test)
    return paths


def load_client_data(path: Path | str) -> ClientData:
    """Read a file written by ``write_partitions``; ``test.npz`` has an empty val split."""
    with np.load(Path(path).expanduser(), allow_pickle=False) as f:
        X = np.asarray(f["X"], dtype=np.float32)
        y = np.asarray(f["y"], dtype=np.int64)
        if "X_val" in f.files:
            X_val = np.asarray(f["X_val"], dtype=np.float32)
            y_val = np.asarray(f["y_val"], dtype=np.int64)
        else:
            X_val = np.empty((0, X.shape[1]), dtype=np.float32)
            y_val = np.empty(0, dtype=np.int64)
    return ClientData(X, y, X_val, y_val)
