"""The README's quick start is what CI runs: keep them from drifting apart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_quick_start_is_exactly_two_commands_and_ci_runs_the_test_one():
    demo, tests = _quick_start_commands()
    assert "fedray demo" in demo and "\n" not in demo
    assert "pytest" in tests and "\n" not in tests
    assert tests in (ROOT / ".ci" / "run").read_text()
