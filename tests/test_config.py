"""Config loading: defaults, overrides, and one-line errors that name field and file."""

from pathlib import Path

import pytest

from fedray.config import config_from_dict, load_config
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


def test_a_robust_round_that_could_keep_more_updates_than_allowed_is_refused_at_load(tmp_path):
    # median keeps every update of a round in the object store: a fraction of up to
    # 2 x 10,000 clients could exceed session.max_kept_updates, a count cannot.
    path = _write(tmp_path, MINIMAL + "session: {aggregator: median, clients_per_round: 1.0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "session.aggregator" in message and "max_kept_updates (1000)" in message
    assert "up to 20000 could arrive" in message and "clients_per_round" in message
    ok = load_config(_write(tmp_path, MINIMAL + "session: {aggregator: median, "
                                                "clients_per_round: 50, min_clients: 3}\n"))
    assert ok.session.aggregator == "median"


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
