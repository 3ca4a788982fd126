"""The digits federation's initial global model, as arrays or as a safetensors file.

Every session starts from the same seed model so runs are comparable; it is the compute
package's ``init_model(0)``. Write it with ``python -m examples.digits.seed OUT.safetensors``
(the file named by ``seed_model:`` in ``configs/digits.yaml``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from examples.digits.client.model import init_model
from fedray.serialization import encode


def seed_model() -> dict[str, np.ndarray]:
    return init_model(0)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m examples.digits.seed OUT.safetensors", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode(seed_model()))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
