"""Print the HTTP API's OpenAPI document: ``python -m fedray.service.openapi > docs/openapi.json``.

The repo keeps it (tests/test_api_contract.py checks that the served one is the same)."""

from __future__ import annotations

import json

from fedray.service.app import make_app
from fedray.service.reader import TrackingReader


def document() -> dict:
    return make_app(TrackingReader("", None, ""), None, "").openapi()


if __name__ == "__main__":
    print(json.dumps(document(), indent=2, sort_keys=True))
