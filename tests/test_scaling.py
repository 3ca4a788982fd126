"""The elastic tier's policy, without Ray: its config (count as the fixed-size shorthand,
min/max/clients_per_combiner) and its decisions (add, drain, hold) with hysteresis and a
cooldown, so that it does not flap."""

from __future__ import annotations

import pytest

from fedray.actors.scaling import Action, ScalingRules, TierSnapshot, decide
from fedray.deploy.config_file import config_from_dict
from fedray.errors import ConfigError

BASE = {"federation": "demo", "seed_model": "seed.safetensors"}
RULES = ScalingRules(min=1, max=4, clients_per_combiner=100, cooldown_s=30)


def _tier(**combiners):
    return config_from_dict({**BASE, "combiners": combiners}).combiners


def _snap(*loads: int, now: float = 100.0, last: float | None = None,
          draining: tuple[str, ...] = ()) -> TierSnapshot:
    return TierSnapshot({f"combiner-{i}": n for i, n in enumerate(loads)}, now, last,
                        frozenset(draining))


# ---- the config

@pytest.mark.parametrize(("combiners", "expected"), [
    ({}, (2, 2, 2, 2000)),
    ({"count": 3}, (3, 3, 3, 2000)),
    ({"min": 1, "max": 8, "clients_per_combiner": 50}, (1, 1, 8, 50)),
    ({"min": 2}, (2, 2, 2, 2000)),
    ({"max": 5}, (1, 1, 5, 2000)),
    ({"count": 3, "min": 3, "max": 3}, (3, 3, 3, 2000)),
    ({"count": 3, "max": 3}, (3, 3, 3, 2000)),
])
def test_count_is_the_fixed_size_shorthand_and_min_max_start_at_min(combiners, expected):
    c = _tier(**combiners)
    assert (c.count, c.min, c.max, c.clients_per_combiner) == expected


@pytest.mark.parametrize(("combiners", "message"), [
    ({"count": 3, "min": 1, "max": 8}, "combiners.count 3 is the fixed-size shorthand for "
                                       "min = max = 3, but min is 1 and max 8"),
    ({"count": 2, "max": 4}, "combiners.count 2 is the fixed-size shorthand"),
    ({"min": 0, "max": 3}, "combiners.min must be at least 1, got 0"),
    ({"min": 4, "max": 2}, "combiners.max (2) must be at least combiners.min (4)"),
    ({"min": 1, "max": 2, "clients_per_combiner": 0},
     "combiners.clients_per_combiner must be at least 1, got 0"),
])
def test_contradictory_tier_settings_are_refused_naming_the_field(combiners, message):
    with pytest.raises(ConfigError) as refused:
        _tier(**combiners)
    assert str(refused.value).startswith("<dict>: " + message), str(refused.value)


def test_a_set_count_contradicting_the_file_s_min_max_names_the_set():
    with pytest.raises(ConfigError, match=r"^--set combiners.count: 3 is the fixed-size shorthand for min = max = 3, "
                       r"but min is 1 and max 4"):
        config_from_dict({**BASE, "combiners": {"min": 1, "max": 4}}, "f.yaml",
                         {"combiners.count": 3})


# ---- the decisions

@pytest.mark.parametrize(("loads", "action", "target", "detail"), [
    ((50,), Action.HOLD, 1, ()),
    ((100,), Action.HOLD, 1, ()),  # at the target: not over it
    ((101,), Action.ADD, 2, 1),
    ((350,), Action.ADD, 4, 3),  # as many as the load needs at once
    ((900,), Action.ADD, 4, 3),  # never past max
    ((120, 80), Action.HOLD, 2, ()),
    ((30, 21), Action.HOLD, 2, ()),  # 51 clients do not fit one at 0.5 x 100
    ((30, 19), Action.DRAIN, 1, ("combiner-1",)),
    ((10, 0, 10), Action.DRAIN, 1, ("combiner-1", "combiner-2")),  # least loaded, newest
    ((200, 200, 200, 200), Action.HOLD, 4, ()),  # full, at max
])
def test_the_tier_follows_the_load(loads, action, target, detail):
    decided = decide(_snap(*loads), RULES)
    assert (decided.action, decided.target) == (action, target), decided
    if action is Action.ADD:
        assert decided.add == detail
    if action is Action.DRAIN:
        assert decided.drain == detail


def test_below_min_or_above_max_it_acts_even_when_cooling_down():
    rules = ScalingRules(min=2, max=3, clients_per_combiner=100)
    assert decide(_snap(0, last=99.0), rules).add == 1
    decided = decide(_snap(5, 0, 3, 9, last=99.0), rules)
    assert decided.action is Action.DRAIN and decided.drain == ("combiner-1",)


@pytest.mark.parametrize("loads", [(150,), (10, 5)])
def test_a_change_is_followed_by_a_cooldown(loads):
    assert decide(_snap(*loads, now=110.0, last=100.0), RULES).action is Action.HOLD
    assert decide(_snap(*loads, now=131.0, last=100.0), RULES).action is not Action.HOLD


def test_one_drain_at_a_time():
    decided = decide(_snap(1, 1, 1, draining=("combiner-2",)), RULES)
    assert decided.action is Action.HOLD and "draining" in decided.reason


@pytest.mark.parametrize("total", range(0, 420, 7))
def test_what_it_grows_to_it_does_not_shrink_from_at_once(total):
    # Hysteresis: from the tier an ADD reaches, with the same clients, no DRAIN follows.
    rules = ScalingRules(min=1, max=8, clients_per_combiner=50)
    grown = decide(_snap(total), rules)
    size = grown.target
    spread = [total // size + (1 if i < total % size else 0) for i in range(size)]
    assert decide(_snap(*spread), rules).action is not Action.DRAIN


def test_the_issue_s_timeline_140_clients_then_20():
    # combiners {min 1, max 3, clients_per_combiner 50}: 140 clients need 3, 20 need 1.
    rules = ScalingRules(min=1, max=3, clients_per_combiner=50, cooldown_s=10)
    assert decide(_snap(140), rules).target == 3
    shrink = decide(_snap(7, 7, 6, now=200.0, last=100.0), rules)
    assert shrink.action is Action.DRAIN and shrink.drain == ("combiner-2", "combiner-1")


@pytest.mark.parametrize("kwargs", [{"min": 0, "max": 1}, {"min": 3, "max": 2},
                                    {"clients_per_combiner": 0},
                                    {"scale_down_at": 1.0, "scale_up_at": 1.0}])
def test_rules_that_cannot_work_are_refused(kwargs):
    with pytest.raises(ValueError):
        ScalingRules(**{"min": 1, "max": 2, "clients_per_combiner": 10, **kwargs})
