"""Command-line entrypoints of the digits-torch compute package (see ``fedray.yaml``).

fedray runs these with the package directory as the working directory, so ``model.py`` is
imported from beside this file. ``fedray.packages.entrypoint`` serves the contract shared
by every compute package (``train IN_MODEL OUT_MODEL OUT_META DATA CONFIG``, ``validate
IN_MODEL OUT_META DATA CONFIG``) with the ``TorchClient`` that ``model.make_client``
builds on DATA, a ``.npz`` written by ``examples/digits/data.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model  # noqa: E402  (imported from this package's own folder)

from fedray.packages.entrypoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], model.make_client, "digits-torch"))
