"""The HTTP API's contract: the OpenAPI document in the repo is the one served, and no
input schemathesis generates from it makes a real federation's API answer 500."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from test_federation import DeltaWorker
from test_service import _attach, _config, served

from fedray.api.endpoint import api_token
from fedray.service.openapi import document

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "openapi.json"


def test_the_repo_keeps_the_openapi_document_the_api_serves():
    assert json.loads(SPEC.read_text()) == json.loads(json.dumps(document())), \
        "docs/openapi.json is stale: python -m fedray.service.openapi > docs/openapi.json"


@pytest.mark.integration
def test_no_generated_request_makes_the_api_answer_500(ray_session, tracking_uri, fleet,
                                                       tmp_path):
    config = _config("api-contract", tmp_path, tracking_uri, min_clients=2)
    with served(config) as fed:
        _attach(fleet, fed, {"a": DeltaWorker(1.0, 10), "b": DeltaWorker(1.0, 10)})
        assert fed.start_session(rounds=2).wait(timeout=60)["status"] == "finished"
        url = fed.endpoint.url
        with urllib.request.urlopen(f"{url}/api/v1/openapi.json", timeout=10) as response:
            assert json.loads(response.read()) == json.loads(SPEC.read_text())
        st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
        assert st, "schemathesis is in the test extra"
        token = api_token(config.resolved_data_dir())
        # Streams and the long poll never answer "at once" by design (tested on their own
        # in test_service); shutdown would end the federation under test.
        run = subprocess.run(
            [st, "run", f"{url}/api/v1/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "30", "--seed", "1", "--request-timeout", "20",
             "-H", f"Authorization: Bearer {token}",
             "--exclude-path-regex", r".*/(stream|shutdown|status)$",
             "--suppress-health-check", "all"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "passed" in run.stdout.lower(), run.stdout[-3000:]
