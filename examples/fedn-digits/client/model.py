"""A one-hidden-layer MLP for scikit-learn's 8x8 digits, in numpy, as a FEDn package.

The model is FEDn's numpy-helper list of arrays: [hidden weight (64, 32), hidden bias (32,),
output weight (32, 10), output bias (10,)], all float32. Run as a script (the ``build``
entry point) it writes the seed model to ``../seed.npz``.
"""

import numpy as np

from fedn.utils.helpers.helpers import get_helper

HELPER_MODULE = "numpyhelper"
helper = get_helper(HELPER_MODULE)

N_FEATURES, HIDDEN, N_CLASSES = 64, 32, 10


def init_weights(seed=0):
    """He-initialised weights and zero biases, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0.0, np.sqrt(2.0 / N_FEATURES), size=(N_FEATURES, HIDDEN))
    w2 = rng.normal(0.0, np.sqrt(2.0 / HIDDEN), size=(HIDDEN, N_CLASSES))
    return [w1.astype(np.float32), np.zeros(HIDDEN, np.float32),
            w2.astype(np.float32), np.zeros(N_CLASSES, np.float32)]


def load_parameters(model_path):
    return [np.asarray(w, dtype=np.float32) for w in helper.load(model_path)]


def save_parameters(weights, out_path):
    helper.save(weights, out_path)


def forward(weights, X):
    """Hidden activations and class probabilities."""
    w1, b1, w2, b2 = weights
    h = np.maximum(X @ w1 + b1, 0.0)
    logits = h @ w2 + b2
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return h, exp / exp.sum(axis=1, keepdims=True)


def sgd(weights, X, y, epochs=5, lr=0.3, batch_size=32, seed=0):
    """Mini-batch SGD on cross-entropy; returns new weights."""
    w1, b1, w2, b2 = (np.array(w, dtype=np.float32, copy=True) for w in weights)
    rng = np.random.default_rng(seed)
    for _ in range(int(epochs)):
        order = rng.permutation(len(X))
        for start in range(0, len(X), int(batch_size)):
            idx = order[start : start + int(batch_size)]
            xb, yb = X[idx], y[idx]
            h, probs = forward((w1, b1, w2, b2), xb)
            grad = probs
            grad[np.arange(len(yb)), yb] -= 1.0
            grad /= len(yb)
            grad_h = (grad @ w2.T) * (h > 0)
            w2 -= lr * (h.T @ grad)
            b2 -= lr * grad.sum(axis=0)
            w1 -= lr * (xb.T @ grad_h)
            b1 -= lr * grad_h.sum(axis=0)
    return [w1, b1, w2, b2]


def evaluate(weights, X, y):
    """Accuracy and mean cross-entropy on (X, y)."""
    if len(X) == 0:
        return {"accuracy": 0.0, "loss": 0.0}
    _, probs = forward(weights, X)
    picked = probs[np.arange(len(y)), y]
    return {"accuracy": float((probs.argmax(axis=1) == y).mean()),
            "loss": float(-np.log(np.clip(picked, 1e-12, None)).mean())}


def init_seed(out_path="../seed.npz"):
    save_parameters(init_weights(0), out_path)


if __name__ == "__main__":
    init_seed("../seed.npz")
