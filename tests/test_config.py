"""Config loading: defaults, overrides, and one-line errors that name field and file."""

from pathlib import Path

import pytest

from fedray.deploy.config_file import config_from_dict, load_config
from fedray.errors import ConfigError

MINIMAL = "federation: demo\nseed_model: seed.safetensors\n"


def _write(tmp_path, text):
    path = tmp_path / "fed.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL))
    assert config.session.aggregator == "fedavg" and config.combiners.count == 2
    assert config.namespace == "fedray-demo"
    assert config.tracking.uri == "embedded"


def test_overrides_use_dotted_names(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL), {"session.rounds": 7, "combiners.count": 1})
    assert config.session.rounds == 7 and config.combiners.count == 1


CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_the_repository_config_loads():
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "digits.yaml")
    assert config.federation == "digits"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    assert load_config(path).federation


@pytest.mark.parametrize(("text", "needle"), [
    (MINIMAL + "session: {rounds: -1}\n", "session.rounds must be greater than 0"),
    (MINIMAL + "session: {rounds: ten}\n", "session.rounds must be int"),
    (MINIMAL + "session: {roundz: 3}\n", "unknown field session.roundz"),
    (MINIMAL + "combiners: {base_port: 70000}\n", "combiners.base_port must be a port"),
    (MINIMAL + "session: {aggregator: nope}\n", "session.aggregator names no strategy that loads: unknown aggregator 'nope'"),
    (MINIMAL + "tracking: {uri: http://x}\n", "tracking.uri must be"),
    (MINIMAL + "session: {validate: 'yes'}\n", "session.validate must be bool"),
    (MINIMAL + "combiners: {offline_after_s: 1}\n", "combiners.offline_after_s"),
    (MINIMAL + "session: {clients_per_round: 2.5}\n", "session.clients_per_round"),
    ("seed_model: x\n", "missing required field federation"),
    ("federation: 'bad name!'\nseed_model: x\n", "federation must be"),
    ("- a list\n", "top level must be a mapping"),
    ("federation: [unclosed\n", "not valid YAML"),
    (MINIMAL + "session: 3\n", "session must be a mapping"),
])
def test_bad_fields_give_one_line_errors_naming_field_and_file(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_data_dir_env_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRAY_DATA_DIR", str(tmp_path / "d"))
    config = config_from_dict({"federation": "x", "seed_model": "s"})
    assert config.resolved_data_dir() == (tmp_path / "d").resolve()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"session.roudns": 3}, "--set session.roudns: unknown field (did you mean session.rounds?)"),
    ({"sesion.rounds": 3}, "--set sesion.rounds: unknown field sesion (did you mean session?)"),
    ({"session.rounds": "ten"}, "--set session.rounds: must be int, got 'ten'"),
    ({"session.rounds": 0}, "--set session.rounds: must be greater than 0, got 0"),
    ({"session.rounds.x": 1}, "--set session.rounds.x: session.rounds is a value, not a section"),
    ({"session": {"roudns": 3}}, "--set session: unknown field session.roudns (did you mean "
                                 "session.rounds?)"),
])
def test_a_bad_override_is_blamed_on_its_set_not_on_the_file(tmp_path, overrides, message):
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(info.value) == message


def test_overrides_below_free_form_mappings_are_kept(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL), {"session.round_config.epochs": 2})
    assert config.session.round_config == {"epochs": 2}


def test_an_unknown_field_in_the_file_suggests_the_close_match(tmp_path):
    path = _write(tmp_path, MINIMAL + "session: {roundz: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown field session.roundz \(did you mean "
                                          r"session.rounds\?\)"):
        load_config(path)


def test_a_robust_strategy_with_a_fraction_of_many_clients_loads_its_rounds_are_bounded_later(
        tmp_path):
    # median keeps every update of a round in the object store. A fraction of up to
    # 2 x 10,000 clients could exceed session.max_kept_updates, but each round's plan is
    # sampled down to it (tests/test_session_runner.py): the config is not refused.
    for aggregator in ("median", "krum", "bulyan"):
        config = load_config(_write(tmp_path, MINIMAL + f"session: {{aggregator: {aggregator}, "
                                                        "clients_per_round: 1.0}\n"))
        assert config.session.max_kept_updates == 1000 and config.session.min_clients == 2


@pytest.mark.parametrize(("session", "message"), [
    ("{aggregator: median, max_kept_updates: 2, min_clients: 3}",
     "session.max_kept_updates (2): 'median' keeps at most that many updates per round, "
     "fewer than session.min_clients (3) updates, so no round could commit; raise it to 3 or "
     "more"),
    ("{aggregator: krum, max_kept_updates: 4}",  # krum with f=1 needs 2f + 3 = 5
     "session.max_kept_updates (4): 'krum' keeps at most that many updates per round, fewer "
     "than the 5 updates 'krum' needs per round, so no round could commit; raise it to 5 or "
     "more"),
    ("{aggregator: bulyan, buffer_size: 6}",  # bulyan with f=1 needs 4f + 3 = 7
     "session.buffer_size (6) closes rounds before the 7 updates 'bulyan' needs per round can "
     "arrive; raise it"),
    ("{min_clients: 3, min_updates: 4}",
     "session.min_updates must be at most session.min_clients (3, the clients a round waits "
     "for), got 4: lower it, or leave it 0 (a round then needs min_clients updates)"),
    ("{min_updates: -1}", "session.min_updates must be 0 or more, got -1"),
])
def test_only_round_bounds_that_can_never_work_are_refused_at_load(tmp_path, session, message):
    path = _write(tmp_path, MINIMAL + f"session: {session}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize(("tracking", "database"), [
    ({}, "fedray"),
    ({"uri": "mongodb://db.example.org:27017/"}, "fedray"),
    ({"uri": "mongodb://u:p@db1,db2/fl_runs?replicaSet=rs0"}, "fl_runs"),
    ({"uri": "mongodb+srv://cluster.example.org/my%2Ddb"}, "my-db"),
    ({"uri": "mongodb://db/fl_runs", "database": "other"}, "other"),
])
def test_the_tracking_database_is_the_uris_else_fedray_as_the_query_commands_read_it(
        tracking, database):
    config = config_from_dict({"federation": "x", "seed_model": "s", "tracking": tracking})
    assert config.tracking.database == database


def test_a_set_value_that_is_not_yaml_is_one_line_naming_the_set(tmp_path):
    from click.testing import CliRunner

    from fedray.cli.main import main

    path = _write(tmp_path, MINIMAL)
    result = CliRunner().invoke(main, ["run", str(path), "--set", "session.round_config={lr: 0.1"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("fedray: error: --set session.round_config: '{lr: 0.1' is "
                                    "not a valid YAML value (")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN"])
@pytest.mark.parametrize("field", ["session.clients_per_round", "session.round_timeout_s",
                                   "session.max_update_norm", "tracking.events_ttl_days",
                                   "combiners.max_update_mb", "session.round_config.lr",
                                   "session.aggregator_kwargs.server_lr"])
def test_infinities_and_nan_are_refused_in_every_numeric_field(tmp_path, field, value):
    from fedray.deploy.config_file import parse_override

    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, dict([parse_override(f"{field}={value}")]))
    assert str(info.value).startswith(f"--set {field}: must be a finite number, got ")
    section, _, name = field.rpartition(".")
    top, _, sub = section.partition(".")
    nested = f"{top}: {{{sub + ': {' if sub else ''}{name}: {value}{'}' if sub else ''}}}\n"
    with pytest.raises(ConfigError, match=f"{path}: {field} must be a finite number"):
        load_config(_write(tmp_path, MINIMAL + nested))


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    path = _write(tmp_path, MINIMAL + "session:\n  rounds: 3\n  min_clients: 2\n  rounds: 30\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: line 6: 'rounds' is given twice (first on line 4); "
                               "keep one")
    with pytest.raises(ConfigError, match="line 3: 'federation' is given twice"):
        load_config(_write(tmp_path, MINIMAL + "federation: other\n"))
    # a YAML merge that overrides a key of its base is not a duplicate
    merged = load_config(_write(tmp_path, MINIMAL + "session:\n  <<: {rounds: 2, min_clients: 3}"
                                                    "\n  rounds: 4\n"))
    assert (merged.session.rounds, merged.session.min_clients) == (4, 3)
    from fedray.deploy.config_file import parse_override

    with pytest.raises(ConfigError, match=r"--set session.round_config: 'lr' is given twice"):
        parse_override("session.round_config={lr: 1, lr: 2}")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"session.aggregator_kwargs.sever_lr": 1},
     "--set session.aggregator_kwargs.sever_lr: session.aggregator fedadam has no option "
     "sever_lr in session.aggregator_kwargs (did you mean server_lr?)"),
    ({"session.aggregator": "nope"},
     "--set session.aggregator: names no strategy that loads: unknown aggregator 'nope'"),
    ({"session.select.policy": "nope"},
     "--set session.select.policy: session.select.policy 'nope' must be package.module:name"),
    ({"session.select": {"attrs": {"a": {"b": 1}}}},
     "--set session.select: session.select.attrs.a must be a value or a list of values"),
    ({"session.min_clients": 5}, "--set session.min_clients: session.buffer_size (2) closes "
                                 "rounds before session.min_clients (5)"),
])
def test_strategy_and_selection_errors_blame_the_set_they_came_from(tmp_path, overrides,
                                                                     message):
    path = _write(tmp_path, MINIMAL + "session: {aggregator: fedadam, buffer_size: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(info.value).startswith(message), str(info.value)
    assert str(path) not in str(info.value)


def test_strategy_and_selection_errors_of_the_file_still_name_the_file(tmp_path):
    path = _write(tmp_path, MINIMAL + "session: {aggregator_kwargs: {sever_lr: 1}, "
                                      "select: {policy: nope}}\n")
    for overrides in (None, {"session.rounds": 3}):
        with pytest.raises(ConfigError, match=f"^{path}: session.aggregator fedavg takes no "
                                              "options; leave session.aggregator_kwargs empty"):
            load_config(path, overrides)
    path = _write(tmp_path, MINIMAL + "session: {select: {policy: nope}}\n")
    with pytest.raises(ConfigError, match=f"^{path}: session.select.policy 'nope'"):
        load_config(path, {"session.aggregator": "fedavg"})


def test_the_data_dir_flag_wins_over_the_env_which_wins_over_the_file(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import fedray.deploy.runner
    from fedray.cli.main import main

    path = _write(tmp_path, MINIMAL + f"data_dir: {tmp_path / 'file'}\n")
    monkeypatch.setenv("FEDRAY_DATA_DIR", str(tmp_path / "env"))
    assert load_config(path).resolved_data_dir() == tmp_path / "env"
    flagged = load_config(path, {"data_dir": str(tmp_path / "flag")})
    assert flagged.resolved_data_dir() == tmp_path / "flag"
    assert config_from_dict({"federation": "x", "seed_model": "s"},
                            overrides={"data_dir": str(tmp_path / "flag")}).data_dir \
        == str(tmp_path / "flag")

    used = []

    def run_federation(config, **_):
        used.append(config.resolved_data_dir())
        raise ConfigError("stop here")

    monkeypatch.setattr(fedray.deploy.runner, "run_federation", run_federation)
    result = CliRunner().invoke(main, ["run", str(path), "--data-dir", str(tmp_path / "flag")])
    assert result.exit_code == 2 and used == [tmp_path / "flag"], result.output
