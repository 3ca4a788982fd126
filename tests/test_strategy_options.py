"""Strategy options from the constructor's signature: a missing option is named with a
``--set`` example that works, an unknown one with its near miss; every built-in strategy
but the DP ones and secagg needs none (docs/strategies.md, "Defaults")."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fedray.cli.main import main
from fedray.deploy.config_file import load_config, parse_override
from fedray.errors import ConfigError
from fedray.strategies import REGISTRY, make_strategy, options_problem, strategy_class
from fedray.strategies.fedavg import FedAvg
from fedray.strategies.options import flow_yaml

DIGITS = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"
# no safe default: docs/privacy.md, "No defaults" (secagg: the clip decides what it learns)
NEEDS_OPTIONS = {"dp_fixed", "dp_adaptive", "secagg"}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_built_in_strategy_but_dp_needs_no_option(name):
    problem = options_problem(name, strategy_class(name), {})
    assert bool(problem) is (name in NEEDS_OPTIONS), problem
    if not problem:
        assert make_strategy(name).declare() is not None


@pytest.mark.parametrize(("name", "message"), [
    ("dp_fixed", "--set session.aggregator: dp_fixed needs session.aggregator_kwargs "
                 "noise_multiplier and clipping_norm, e.g. --set 'session.aggregator_kwargs="
                 "{noise_multiplier: 1.0, clipping_norm: 1.0}'"),
    ("dp_adaptive", "--set session.aggregator: dp_adaptive needs session.aggregator_kwargs "
                    "noise_multiplier, e.g. --set 'session.aggregator_kwargs="
                    "{noise_multiplier: 0.5}'"),
])
def test_a_dp_strategy_names_the_options_to_set_with_an_example(name, message):
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS, {"session.aggregator": name})
    assert str(info.value) == message


@pytest.mark.parametrize("name", sorted(NEEDS_OPTIONS))
def test_the_example_in_the_message_loads_when_pasted(name):
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS, {"session.aggregator": name})
    pasted = str(info.value).split("e.g. --set ", 1)[1].strip("'")
    field, value = parse_override(pasted)
    config = load_config(DIGITS, {"session.aggregator": name, field: value})
    assert config.session.aggregator == name and config.session.strategy_options == value


def test_secaggs_options_are_a_block_of_their_own():
    config = load_config(DIGITS, {"session.aggregator": "secagg", "session.min_clients": 3,
                                  "session.secagg": {"clip": 5.0, "quantization_bits": 12}})
    assert config.session.strategy_options == {"clip": 5.0, "quantization_bits": 12}
    strategy = make_strategy("secagg", config.session.strategy_options)
    assert strategy.quantizer.bits == 12
    one = load_config(DIGITS, {"session.aggregator": "secagg", "session.secagg.clip": 2.0})
    assert one.session.strategy_options == {"clip": 2.0}


def test_secaggs_message_names_its_block():
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS, {"session.aggregator": "secagg"})
    assert str(info.value) == ("--set session.aggregator: secagg needs session.secagg clip, "
                               "e.g. --set 'session.secagg={clip: 1.0}'")
    with pytest.raises(ConfigError, match="secagg has no option thresold in session.secagg "
                                          r"\(did you mean threshold\?\)"):
        load_config(DIGITS, {"session.aggregator": "secagg",
                             "session.secagg": {"clip": 1.0, "thresold": 3}})


def test_a_secagg_block_without_secagg_or_disagreeing_is_refused():
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS, {"session.secagg": {"clip": 1.0}})
    assert str(info.value) == ("--set session.secagg: holds secagg's options, but "
                               "session.aggregator is 'fedavg': set session.aggregator: "
                               "secagg, or remove session.secagg")
    with pytest.raises(ConfigError, match="sets clip: 2.0, and session.aggregator_kwargs "
                                          "sets it to 1.0: set it in one place"):
        load_config(DIGITS, {"session.aggregator": "secagg",
                             "session.aggregator_kwargs": {"clip": 1.0},
                             "session.secagg": {"clip": 2.0}})
    agreeing = load_config(DIGITS, {"session.aggregator": "secagg",
                                    "session.aggregator_kwargs": {"clip": 1.0},
                                    "session.secagg": {"clip": 1.0, "dropout": 0.2}})
    assert agreeing.session.strategy_options == {"clip": 1.0, "dropout": 0.2}


def test_options_already_given_keep_their_values_in_the_example():
    given = {"noise_multiplier": 2, "delta": 1e-6}
    problem = options_problem("dp_fixed", strategy_class("dp_fixed"), given)
    assert problem == ("dp_fixed needs session.aggregator_kwargs clipping_norm, e.g. --set "
                       "'session.aggregator_kwargs={noise_multiplier: 2, clipping_norm: 1.0, "
                       "delta: 1.0e-06}'")
    example = parse_override(problem.split("e.g. --set ", 1)[1].strip("'"))[1]
    assert example == {"noise_multiplier": 2, "clipping_norm": 1.0, "delta": 1e-6}


def test_the_file_is_named_when_the_file_chose_the_strategy(tmp_path):
    path = tmp_path / "fed.yaml"
    path.write_text("federation: demo\nseed_model: s.safetensors\nsession: {aggregator: "
                    "dp_adaptive, aggregator_kwargs: {delta: 1.0e-6}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: session.aggregator dp_adaptive needs session.aggregator_kwargs "
        "noise_multiplier, e.g. --set 'session.aggregator_kwargs={noise_multiplier: 0.5, "
        "delta: 1.0e-06}'")


def test_the_cli_prints_it_as_one_line_with_exit_code_2():
    result = CliRunner().invoke(main, ["run", str(DIGITS), "--set", "session.aggregator=dp_fixed"])
    assert result.exit_code == 2, result.output
    assert result.output == (
        "fedray: error: --set session.aggregator: dp_fixed needs session.aggregator_kwargs "
        "noise_multiplier and clipping_norm, e.g. --set 'session.aggregator_kwargs="
        "{noise_multiplier: 1.0, clipping_norm: 1.0}'\n")


def test_make_strategy_says_the_same_where_no_config_check_ran():
    with pytest.raises(ConfigError, match=r"^session.aggregator dp_fixed needs "
                                          r"session.aggregator_kwargs noise_multiplier and "
                                          r"clipping_norm, e\.g\. --set"):
        make_strategy("dp_fixed", {})


class Tuned(FedAvg):
    """A user's strategy: options without defaults and without examples."""

    def __init__(self, rounds_to_warm: int, schedule: str, decay: float | None,
                 verbose: bool, lr: float = 0.1) -> None:
        super().__init__()


class Open(FedAvg):
    def __init__(self, **options: object) -> None:
        super().__init__()


def test_a_users_strategy_gets_placeholders_of_its_annotated_types():
    assert options_problem("mine", Tuned, {"verbose": False}) == (
        "mine needs session.aggregator_kwargs rounds_to_warm, schedule and decay, e.g. --set "
        "'session.aggregator_kwargs={rounds_to_warm: 1, schedule: VALUE, decay: 1.0, "
        "verbose: false}'")


@pytest.mark.parametrize(("cls", "given", "problem"), [
    (Tuned, {"rounds_to_warm": 1, "schedule": "x", "decay": 0.5, "verbose": True, "lr2": 1},
     "mine has no option lr2 in session.aggregator_kwargs (did you mean lr?)"),
    (Tuned, {"rounds_to_warm": 1, "schedule": "x", "decay": 0.5, "verbose": True, "zzz": 1},
     "mine has no option zzz in session.aggregator_kwargs (its options: rounds_to_warm, "
     "schedule, decay, verbose, lr)"),
    (FedAvg, {"lr": 1}, "mine takes no options; leave session.aggregator_kwargs empty (got lr)"),
    (Open, {"anything": 1}, ""),  # **options: whatever it takes, its constructor decides
    (Tuned, {"rounds_to_warm": 1, "schedule": "x", "decay": None, "verbose": True}, ""),
])
def test_unknown_options_are_named_with_the_near_miss(cls, given, problem):
    assert options_problem("mine", cls, given) == problem


@pytest.mark.parametrize("value", [
    {"a": 1, "b": 1.5, "c": 1e-06, "d": 2e20, "e": True, "f": None},
    {"s": "plain", "t": "needs: quoting", "u": "yes", "v": "1.5", "w": "", "x": "it's"},
    {"nested": {"k": [1, 2.0, "three"]}},
])
def test_flow_yaml_reads_back_as_the_same_value(value):
    assert yaml.safe_load(flow_yaml(value)) == value
