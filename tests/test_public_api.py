"""The public API is what __all__ says, and importing it pulls in no server dependency."""

import subprocess
import sys

import fedray


def test_all_names_exist_and_public_names_are_listed():
    for name in fedray.__all__:
        assert hasattr(fedray, name), name
    public = {n for n in dir(fedray) if not n.startswith("_") and not _is_module(getattr(fedray, n))}
    assert public <= set(fedray.__all__), public - set(fedray.__all__)


def _is_module(obj) -> bool:
    return type(obj).__name__ == "module"


def test_edge_side_imports_no_ray_pymongo_or_minio_nor_server_code():
    code = ("import sys, fedray, fedray.edge.cli, fedray.packages; "
            "bad = [m for m in ('ray', 'pymongo', 'minio', 'nx_27017') if m in sys.modules]; "
            "bad += [m for m in sys.modules if m.startswith('fedray.actors')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_pickle_family_imports_in_the_package():
    from pathlib import Path

    root = Path(fedray.__file__).parent
    offenders = [str(p) for p in root.rglob("*.py")
                 if any(line.strip().startswith(("import pickle", "from pickle", "import cloudpickle",
                                                 "import dill", "import marshal"))
                        for line in p.read_text().splitlines())]
    assert offenders == []


def test_the_extras_fedray_checks_for_are_the_extras_pyproject_installs():
    """``fedray.cli.extras.EXTRAS`` (what a server command checks before it runs) names the
    top-level modules of exactly the requirements of each extra in pyproject.toml."""
    import importlib.metadata
    import re
    import tomllib
    from pathlib import Path

    from fedray.cli.extras import EXTRAS

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    project = tomllib.loads((Path(fedray.__file__).parent.parent / "pyproject.toml")
                            .read_text())["project"]
    extras = project["optional-dependencies"]
    owners: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            owners.setdefault(norm(dist), set()).add(module)
    for extra, modules in EXTRAS.items():
        dists = [norm(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in extras[extra]]
        found = [[m for m in sorted(owners.get(d, ())) if m in modules] for d in dists]
        assert all(found) and [m for ms in found for m in ms] == list(modules), \
            (extra, dists, modules)
    base = {norm(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in project["dependencies"]}
    assert base.isdisjoint({norm(m) for modules in EXTRAS.values() for m in modules})
