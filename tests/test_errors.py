"""The exception registry: every FedrayError lives in fedray.errors with its own exit code,
the docstring's tree and the README's table say the same, and every class survives a
pickle round trip with its fields (they cross actor boundaries)."""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import pkgutil
import re
from pathlib import Path

import pytest

import fedray
from fedray import errors
from fedray.errors import FedrayError

ROOT = Path(__file__).resolve().parent.parent
NOT_IMPORTED = {"fedray.__main__"}  # running it is the CLI
NEEDS = {"fedray.frameworks.torch": ("torch",), "fedray.frameworks.keras": ("keras", "torch")}

# The codes of the top-level classes are promises to scripts: they never change.
TOP_LEVEL = {"FedrayError": 1, "ConfigError": 2, "SerializationError": 3, "PackageError": 4,
             "StorageError": 5, "TrackingError": 6, "TransportError": 7, "AuthError": 8,
             "SessionError": 9, "AlreadyRunning": 10}

# class name -> (constructor arguments, the fields they must come back as)
SAMPLES: dict[str, tuple[tuple, dict]] = {
    "UpdateRejected": (("wrong_shape", "w is (2, 3)"), {"reason": "wrong_shape",
                                                         "detail": "w is (2, 3)"}),
    "SchemaError": (("rounds", "status", "must be one of running"),
                    {"collection": "rounds", "field": "status",
                     "problem": "must be one of running"}),
    "ListenError": (("127.0.0.1:1", "the port is in use", True),
                    {"address": "127.0.0.1:1", "reason": "the port is in use", "in_use": True}),
    "UnknownTaskKind": ((7, "t1"), {"kind": 7, "task_id": "t1"}),
    "CombinerError": (("combiner-1", 3, "died (ActorDiedError)"),
                      {"combiner": "combiner-1", "round": 3, "why": "died (ActorDiedError)"}),
    "CombinerLost": (("combiner-1", 3, "died (ActorDiedError)"),
                     {"combiner": "combiner-1", "round": 3, "why": "died (ActorDiedError)"}),
    "CombinerTimeout": (("combiner-0", None, "no answer within 90 s"),
                        {"combiner": "combiner-0", "round": None,
                         "why": "no answer within 90 s"}),
    "SecAggError": (("too_few_survivors", "3 of 10 clients sent masked inputs"),
                    {"reason": "too_few_survivors",
                     "detail": "3 of 10 clients sent masked inputs"}),
    "CombinerFailed": (("combiner-2", 7, "ValueError: bad spec"),
                       {"combiner": "combiner-2", "round": 7, "why": "ValueError: bad spec"}),
}


def _all_modules() -> list[str]:
    names = ["fedray"]
    for info in pkgutil.walk_packages(fedray.__path__, "fedray."):
        if info.name in NOT_IMPORTED:
            continue
        if any(importlib.util.find_spec(m) is None for m in NEEDS.get(info.name, ())):
            continue  # an optional framework that is not installed here
        names.append(info.name)
    return names


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


@pytest.fixture(scope="module")
def every_error() -> list[type[FedrayError]]:
    """Every FedrayError subclass that fedray defines, once every module is imported."""
    for name in _all_modules():
        importlib.import_module(name)
    return [FedrayError, *(c for c in dict.fromkeys(_subclasses(FedrayError))
                           if c.__module__.split(".")[0] == "fedray")]


def test_every_error_lives_in_fedray_errors_with_an_exit_code_of_its_own(every_error):
    elsewhere = [f"{c.__module__}.{c.__qualname__}" for c in every_error
                 if c.__module__ != "fedray.errors"]
    assert elsewhere == [], "define these in fedray/errors.py"
    inherited = [c.__name__ for c in every_error if "exit_code" not in vars(c)]
    assert inherited == [], "each class needs an exit_code of its own"
    codes: dict[int, list[str]] = {}
    for cls in every_error:
        codes.setdefault(cls.exit_code, []).append(cls.__name__)
    assert {code: names for code, names in codes.items() if len(names) > 1} == {}
    assert all(isinstance(code, int) and 1 <= code < 64 for code in codes)  # 64+: sysexits, 70


def test_the_top_level_codes_keep_their_numbers(every_error):
    assert {c.__name__: c.exit_code for c in every_error if c.__name__ in TOP_LEVEL} == TOP_LEVEL
    new = sorted(c.exit_code for c in every_error if c.__name__ not in TOP_LEVEL)
    assert new == list(range(11, 11 + len(new)))  # numbered from 11 up, without gaps


def test_the_hierarchy_is_kept_for_isinstance_checks():
    assert issubclass(errors.MissingExtra, errors.ConfigError)
    assert issubclass(errors.PythonEnvError, errors.PackageError)
    assert issubclass(errors.SchemaError, errors.TrackingError)
    assert issubclass(errors.ListenError, errors.TransportError)
    assert issubclass(errors.AuthError, errors.TransportError)
    for name in ("UnknownSession", "AttemptFailed", "CombinerError"):
        assert issubclass(getattr(errors, name), errors.SessionError), name
    for name in ("CombinerLost", "CombinerTimeout", "CombinerFailed"):
        assert issubclass(getattr(errors, name), errors.CombinerError), name
    for name in ("UpdateRejected", "AlreadyRunning", "AggregateRefused", "NotRunning"):
        assert getattr(errors, name).__bases__ == (FedrayError,), name


def test_every_error_pickles_with_its_fields_and_message(every_error):
    for cls in every_error:
        args, fields = SAMPLES.get(cls.__name__, (("something went wrong: here",), {}))
        error = cls(*args)
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is cls and str(again) == str(error), cls
        assert {name: getattr(again, name) for name in fields} == fields, cls
        assert again.exit_code == cls.exit_code


def test_a_combiner_error_says_which_combiner_round_and_why():
    assert str(errors.CombinerLost("combiner-1", 3, "died (ActorDiedError)")) == \
        "combiner combiner-1 (round 3): died (ActorDiedError)"
    assert str(errors.CombinerTimeout("combiner-0", None, "no answer")) == \
        "combiner combiner-0: no answer"


def test_the_docstring_tree_is_the_registry(every_error):
    drawn = dict(re.findall(r"^\s+(\d+)\s+[│├└─ ]*([A-Z]\w+)", errors.__doc__, re.MULTILINE))
    assert {name: int(code) for code, name in drawn.items()} == \
        {c.__name__: c.exit_code for c in every_error}
    for cls in every_error:  # drawn under its parent: deeper than the class it subclasses
        if cls is not FedrayError:
            line, above = (next(x for x in errors.__doc__.splitlines()
                                if re.search(rf"^\s+\d+\s.*\b{name}\b", x))
                           for name in (cls.__name__, cls.__bases__[0].__name__))
            assert line.index(cls.__name__) > above.index(cls.__bases__[0].__name__), cls


def test_the_readme_table_agrees_with_the_registry():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| (\d+) \| .*\(`(\w+)`\) \|$", section, re.MULTILINE)
    assert len(rows) >= 12
    for code, name in rows:
        assert getattr(errors, name).exit_code == int(code), name
