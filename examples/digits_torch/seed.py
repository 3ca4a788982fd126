"""The digits-torch federation's initial global model, as arrays or a safetensors file.

``seed_model()`` is the CNN of ``client/model.py`` built from seed 0 (the config's
``seed_model: examples.digits_torch.seed:seed_model``; it imports torch where the
federation runs). For a server without torch, write the file once with ``python -m
examples.digits_torch.seed OUT.safetensors`` and point ``seed_model:`` at it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from fedray.serialization import encode


def seed_model() -> dict[str, np.ndarray]:
    from examples.digits_torch.client.model import seed_arrays

    return seed_arrays(0)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m examples.digits_torch.seed OUT.safetensors", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode(seed_model()))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
