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


def _digits_data_folders(text: str) -> set[str]:
    return (set(re.findall(r"--data (\S+)/client-\d+\.npz", text))
            | set(re.findall(r"write_partitions as w; print\(w\('([^']+)'", text))
            | set(re.findall(r"`([^`\s]+)/(?:client-<i>|test)\.npz`", text)))


def test_the_digits_data_has_one_folder_in_the_readme_and_the_config(tmp_path):
    import os
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    # The cluster walk-through is the test's own commands, with its /tmp paths.
    before, _, rest = readme.partition("### On a Ray cluster")
    user_docs = before + rest.partition("\n### When things fail")[2]
    config = (ROOT / "configs" / "digits.yaml").read_text()
    assert _digits_data_folders(user_docs) | _digits_data_folders(config) == \
        {"~/.fedray/digits-data"}
    # The README's command writes the files where the edge example reads them.
    command = re.search(r'```bash\n(python -c "from examples\.digits\.data import .+?)\n```',
                        readme).group(1)
    env = {**os.environ, "HOME": str(tmp_path),
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}
    subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, check=True, capture_output=True)
    assert (tmp_path / ".fedray" / "digits-data" / "client-0.npz").is_file()


def test_no_example_puts_a_token_on_the_command_line():
    """ps shows command lines to every user; the client reads FEDRAY_TOKEN by default."""
    from fedray.edge.cli import start

    (option,) = [p for p in start.params if p.name == "token"]
    assert option.envvar == "FEDRAY_TOKEN"
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh|console)?\n(.+?)\n```", path.read_text(),
                                re.DOTALL):
            assert not re.search(r"--token[ =]\S", block), (path.name, block)
