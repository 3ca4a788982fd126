"""Server commands on an install without their extra: one line naming it, and the exit
code of ``MissingExtra`` (11, apart from ConfigError's 2).

tests/test_slim_install.py checks this in a real `pip install .` venv; here a missing
module is faked, so the partial-install wording and the late-import fallback are covered.
"""

from __future__ import annotations

import importlib.util

from click.testing import CliRunner

from fedray.cli import extras
from fedray.cli.main import main
from fedray.errors import MissingExtra


def _without(monkeypatch, *gone: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec",
                        lambda name, *a: None if name in gone else real(name, *a))


def test_a_partly_installed_extra_is_named_with_what_is_missing(monkeypatch, tmp_path):
    _without(monkeypatch, "ray")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "x.yaml")])
    assert result.exit_code == MissingExtra.exit_code == 11
    assert result.output == ('fedray run needs the server parts: pip install "fedray[server]" '
                             "(not installed here: ray)\n")


def test_an_extra_missing_altogether_is_one_plain_line(monkeypatch):
    _without(monkeypatch, *extras.EXTRAS["server"], *extras.EXTRAS["examples"])
    result = CliRunner().invoke(main, ["demo"])
    assert (result.exit_code, result.output) == (
        11, 'fedray demo needs the server parts and the examples: '
           'pip install "fedray[server,examples]"\n')
    assert CliRunner().invoke(main, ["token", "list", "--help"]).exit_code == 0  # help works


def test_an_extra_imported_past_the_checks_still_gets_the_hint(monkeypatch, tmp_path):
    import fedray.tracking.query as query

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'pymongo'", name="pymongo")

    monkeypatch.setattr(query, "query_page", broken)
    result = CliRunner().invoke(main, ["rounds", "--tracking", "mongodb://127.0.0.1:1/x"])
    assert (result.exit_code, result.output) == (
        11, 'fedray rounds needs the server parts: pip install "fedray[server]" '
           "(not installed here: pymongo)\n")


def test_a_missing_module_of_no_extra_is_a_bug_not_a_hint(monkeypatch):
    import fedray.tracking.query as query

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'nosuch'", name="nosuch")

    monkeypatch.setattr(query, "query_page", broken)
    result = CliRunner().invoke(main, ["rounds", "--tracking", "mongodb://127.0.0.1:1/x"])
    assert result.exit_code == 70 and "internal error" in result.output
