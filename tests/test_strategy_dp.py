"""DP-FedAvg strategies (pure): clipping, noise, adaptive norm, accounting, state; and the
same strategies driven by the session runner over in-process combiners (tests/simfed.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedray.actors.controller.callbacks import RoundCommitted
from fedray.actors.controller.session_runner import Start
from fedray.config import SelectConfig, SessionConfig
from fedray.errors import ConfigError
from fedray.serialization import decode, encode
from fedray.strategies import make_strategy
from fedray.strategies.accountant import RDPAccountant
from fedray.strategies.dp import CLIPPING_NORM
from fedray.strategies.snapshots import ClientInfo, RoundContext, UpdateMeta
from fedray.strategies.updates import ShareStart, Update
from tests.simfed import MemoryStore, SimPool, run_session, session_settings

SPEC = {"w": ("F32", (3, 4)), "b": ("F32", (4,)), "n": ("I64", (2,))}


def _global(value: float = 0.5):
    return {"w": np.full((3, 4), value, np.float32), "b": np.full(4, value, np.float32),
            "n": np.array([7, 9], np.int64)}


def _updates(n: int, seed: int = 0, scale: float = 1.0):
    """Client models around the global one: deltas of assorted norms (some above C, some not)."""
    rng = np.random.default_rng(seed)
    g = _global()
    out = []
    for i in range(n):
        size = scale * (0.2 + 3.0 * i / max(n - 1, 1))
        out.append({"w": g["w"] + rng.normal(size=(3, 4)).astype(np.float32) * size / 4,
                    "b": g["b"] + rng.normal(size=4).astype(np.float32) * size / 4,
                    "n": np.array([100 + i, 3], np.int64)})
    return out


def _ctx(clients: int, combiners: int = 1, round_: int = 1, attempt: int = 1, **session):
    online = tuple(ClientInfo(f"c{i:03d}", f"combiner-{i % combiners}") for i in range(clients))
    settings = SessionConfig(**{"min_clients": 1, **session})
    return RoundContext("s", round_, attempt, online, settings, seed=round_ * 101 + attempt)


def _round(strategy, updates, global_model=None, combiners: int = 1, asked: int | None = None,
           round_: int = 1, norms: bool = True):
    """One round: configure over ``asked`` online clients (all of them by default), fold
    ``updates`` spread over ``combiners`` accumulators, reduce and finish."""
    g = global_model if global_model is not None else _global()
    plan = strategy.configure(_ctx(asked or len(updates), combiners, round_))
    shares = [strategy.start(ShareStart(spec=SPEC, base=g, params=plan.params))
              for _ in range(combiners)]
    for i, u in enumerate(updates):
        norm = _delta_norm(u, g) if norms else None  # the intake computes it (needs_norm)
        shares[i % combiners].fold(Update(u, UpdateMeta(f"c{i:03d}", round_, 1 + 1000 * i,
                                                        norm=norm), b""))
    return strategy.finish(g, strategy.reduce([s.partial() for s in shares]))


def _delta_norm(u, g) -> float:
    return math.sqrt(sum(float(((u[k].astype(np.float64) - g[k]) ** 2).sum()) for k in ("w", "b")))


def _reference(updates, g, clip: float, denominator: int):
    """FedAvg over clipped deltas, uniform weights, divided by the clients asked (numpy)."""
    total = {k: np.zeros(g[k].shape) for k in ("w", "b")}
    for u in updates:
        scale = min(1.0, clip / _delta_norm(u, g))
        for k in total:
            total[k] += (u[k].astype(np.float64) - g[k]) * scale
    return {k: (g[k] + total[k] / denominator).astype(np.float32) for k in total}


@pytest.mark.parametrize("combiners", [1, 3])
@pytest.mark.parametrize("norms", [True, False])
def test_without_noise_it_is_fedavg_over_clipped_deltas(combiners, norms):
    updates = _updates(7)
    strategy = make_strategy("dp_fixed", {"noise_multiplier": 0.0, "clipping_norm": 1.0})
    model = _round(strategy, updates, combiners=combiners, norms=norms)
    expected = _reference(updates, _global(), 1.0, len(updates))
    for k in ("w", "b"):
        np.testing.assert_allclose(model[k], expected[k], rtol=1e-6, atol=1e-7)
        assert model[k].dtype == np.float32
    assert model["n"].tolist() == [7, 9]  # integer tensors are not released
    assert strategy.round_report()["epsilon"] == math.inf  # no noise, no privacy


def test_clients_asked_but_silent_count_in_the_denominator():
    updates = _updates(4)
    strategy = make_strategy("dp_fixed", {"noise_multiplier": 0.0, "clipping_norm": 0.5})
    model = _round(strategy, updates, asked=10)  # 10 asked, 4 answered
    expected = _reference(updates, _global(), 0.5, 10)
    np.testing.assert_allclose(model["w"], expected["w"], rtol=1e-6, atol=1e-7)
    assert strategy.round_report()["clients_sampled"] == 10


@pytest.mark.parametrize("combiners", [1, 3])
def test_a_huge_update_moves_the_model_by_at_most_c_over_m(combiners):
    g = _global()
    honest = [{k: v.copy() for k, v in g.items()} for _ in range(9)]
    attacker = {"w": g["w"] + 1e6, "b": g["b"] - 1e6, "n": g["n"]}
    strategy = make_strategy("dp_fixed", {"noise_multiplier": 0.0, "clipping_norm": 2.0})
    model = _round(strategy, [attacker, *honest], combiners=combiners)
    moved = _delta_norm(model, g)
    assert moved == pytest.approx(2.0 / 10, rel=1e-5)  # exactly C/m: one clipped delta of 10


@pytest.mark.parametrize("combiners", [1, 3])
def test_noise_has_std_z_c_over_m_on_the_mean(combiners):
    spec = {"big": ("F32", (200_000,))}
    g = {"big": np.zeros(200_000, np.float32)}
    strategy = make_strategy("dp_fixed", {"noise_multiplier": 1.3, "clipping_norm": 2.0,
                                          "seed": 7})
    plan = strategy.configure(_ctx(10, combiners))
    shares = [strategy.start(ShareStart(spec=spec, base=g, params=plan.params))
              for _ in range(combiners)]
    for i in range(10):  # every client sends the global model back: the mean is pure noise
        shares[i % combiners].fold(Update(g, UpdateMeta(f"c{i}", 1, 5, norm=0.0), b""))
    noise = strategy.finish(g, strategy.reduce([s.partial() for s in shares]))["big"]
    expected = 1.3 * 2.0 / 10
    # 200k samples: the sample std is within 1% of sigma with overwhelming probability
    # (its relative standard error is 1/sqrt(2n) = 0.16%), the mean within 5 standard errors.
    assert np.std(noise) == pytest.approx(expected, rel=0.01)
    assert abs(np.mean(noise)) < 5 * expected / math.sqrt(noise.size)
    assert strategy.round_report()["noise_std"] == pytest.approx(expected)
    # Gaussian tails: about 0.27% of draws beyond 3 sigma.
    assert np.mean(np.abs(noise) > 3 * expected) == pytest.approx(0.0027, abs=0.0007)


def test_noise_is_fresh_every_round_and_from_the_os_without_a_seed():
    g = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}

    def draw(strategy, round_):
        plan = strategy.configure(_ctx(3, round_=round_))
        acc = strategy.start(ShareStart(spec={k: SPEC[k] for k in g}, base=g, params=plan.params))
        acc.fold(Update(g, UpdateMeta("c0", round_, 1, norm=0.0), b""))
        return strategy.finish(g, strategy.reduce([acc.partial()]))["w"]

    seeded = make_strategy("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 1.0, "seed": 3})
    again = make_strategy("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 1.0, "seed": 3})
    np.testing.assert_array_equal(draw(seeded, 1), draw(again, 1))
    assert not np.array_equal(draw(seeded, 2), draw(again, 1))
    free = make_strategy("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 1.0})
    assert not np.array_equal(draw(free, 1), draw(free, 1))


def test_sampling_is_secret_unless_seeded():
    free = make_strategy("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 1.0})
    ctx = _ctx(200, clients_per_round=0.1)
    assert free.configure(ctx).clients != free.configure(ctx).clients
    seeded = make_strategy("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 1.0, "seed": 1})
    assert seeded.configure(ctx).clients == seeded.configure(ctx).clients


def test_configure_sends_the_clipping_norm_and_accounts_at_asked_over_eligible():
    strategy = make_strategy("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 0.7,
                                          "seed": 0})
    plan = strategy.configure(_ctx(40, combiners=2, clients_per_round=0.25))
    assert plan.asked == 10 and plan.params[CLIPPING_NORM] == 0.7
    _round(strategy, _updates(10), asked=40)  # reconfigures: 40 online, all asked
    assert strategy.round_report()["sampling_rate"] == 1.0

    def rate(**kwargs):
        s = make_strategy("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 1.0,
                                       "seed": 0, **kwargs.pop("kw", {})})
        s.configure(_ctx(40, **kwargs))
        return s._round.q

    assert rate(clients_per_round=0.25) == 0.25
    assert rate(clients_per_round=5, over_select=0.2) == 6 / 40
    attrs = SelectConfig(ids=[f"c{i:03d}" for i in range(20)])
    assert rate(clients_per_round=0.5, select=attrs) == 0.5  # 10 of the 20 eligible
    assert rate(clients_per_round=0.25, kw={"sampling_amplification": False}) == 1.0


def test_epsilon_is_the_accountants_over_the_rounds_rates():
    strategy = make_strategy("dp_fixed", {"noise_multiplier": 1.1, "clipping_norm": 1.0,
                                          "delta": 1e-6, "seed": 0})
    reference = RDPAccountant()
    epsilons = []
    for round_ in range(1, 4):
        plan = strategy.configure(_ctx(50, round_=round_, clients_per_round=0.2))
        acc = strategy.start(ShareStart(spec=SPEC, base=_global(), params=plan.params))
        for i, u in enumerate(_updates(plan.asked, seed=round_)):
            acc.fold(Update(u, UpdateMeta(f"c{i}", round_, 1), b""))
        strategy.finish(_global(), strategy.reduce([acc.partial()]))
        reference.step(0.2, 1.1)
        report = strategy.round_report()
        assert report["epsilon"] == pytest.approx(reference.epsilon(1e-6), rel=1e-12)
        assert report["delta"] == 1e-6 and report["dp_rounds"] == round_
        assert report["noise_multiplier"] == 1.1 and report["clipping_norm"] == 1.0
        epsilons.append(report["epsilon"])
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]


def _norm_round(strategy, norms, round_: int):
    """A round whose client deltas have exactly these norms (along the first coordinate)."""
    g = _global()
    plan = strategy.configure(_ctx(len(norms), round_=round_))
    acc = strategy.start(ShareStart(spec=SPEC, base=g, params=plan.params))
    for i, norm in enumerate(norms):
        u = {k: v.copy() for k, v in g.items()}
        u["w"][0, 0] += norm
        acc.fold(Update(u, UpdateMeta(f"c{i}", round_, 1, norm=float(norm)), b""))
    strategy.finish(g, strategy.reduce([acc.partial()]))
    return strategy.round_report()


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_adaptive_clipping_moves_c_to_the_target_quantile(noise):
    norms = np.linspace(1.0, 10.0, 100)  # quantile 0.3 of these: 3.7
    strategy = make_strategy("dp_adaptive", {"noise_multiplier": noise, "seed": 5,
                                             "initial_clipping_norm": 0.1,
                                             "target_unclipped_quantile": 0.3,
                                             "clip_norm_lr": 0.5})
    reports = [_norm_round(strategy, norms, r) for r in range(1, 101)]
    seen = [r["next_clipping_norm"] for r in reports]
    assert seen[0] > 0.1 and seen[10] > seen[0]  # every update was clipped: C grows
    tail = np.array(seen[-30:])
    assert np.quantile(norms, 0.3) * 0.9 < tail.mean() < np.quantile(norms, 0.3) * 1.1
    assert np.mean([r["unclipped_fraction"] for r in reports[-30:]]) == pytest.approx(0.3, abs=0.05)


def test_adaptive_splits_the_noise_between_sum_and_count():
    strategy = make_strategy("dp_adaptive", {"noise_multiplier": 1.0, "seed": 1,
                                             "initial_clipping_norm": 2.0})
    report = _norm_round(strategy, [1.0] * 40, 1)  # m = 40: sigma_b = m/20 = 2
    z_sum = (1.0 ** -2 - (2 * 2.0) ** -2) ** -0.5  # Andrew et al. 2021, section 3.1
    assert report["count_stddev"] == 2.0
    assert report["noise_std"] == pytest.approx(z_sum * 2.0 / 40)
    assert report["clipping_norm"] == 2.0 and report["next_clipping_norm"] != 2.0
    with pytest.raises(ConfigError, match="clipped_count_stddev"):
        strategy.configure(_ctx(10))  # m/20 = 0.5 cannot carry z = 1
    with pytest.raises(ConfigError, match="clipped_count_stddev"):
        make_strategy("dp_adaptive", {"noise_multiplier": 1.0, "clipped_count_stddev": 0.4})


@pytest.mark.parametrize("accepted", [5, 10])  # m/20 = 0.25 (complex), 0.5 (division by 0)
def test_adaptive_without_configure_refuses_a_count_noise_that_cannot_carry_z(accepted):
    strategy = make_strategy("dp_adaptive", {"noise_multiplier": 1.0, "seed": 1})
    g = _global()
    acc = strategy.start(ShareStart(spec=SPEC, base=g, params={CLIPPING_NORM: 0.1}))
    for i in range(accepted):
        acc.fold(Update({k: v + 1 for k, v in g.items()}, UpdateMeta(f"c{i}", 1, 1), b""))
    with pytest.raises(ValueError, match="set clipped_count_stddev .* in session.aggregator_kwargs"):
        strategy.finish(g, strategy.reduce([acc.partial()]))
    assert strategy.accountant.steps == 0  # nothing was charged or moved


def test_adaptive_with_a_count_per_round_too_small_for_z_is_refused_at_load():
    from fedray.deploy.config_file import config_from_dict

    def load(**session):
        return config_from_dict({"federation": "dp", "seed_model": "unused", "session": {
            "aggregator": "dp_adaptive", "aggregator_kwargs": {"noise_multiplier": 1.0},
            "min_clients": 2, **session}}, source="dp.yaml")

    with pytest.raises(ConfigError, match=r"dp.yaml: session.aggregator 'dp_adaptive': "
                                          r"dp_adaptive: clipped_count_stddev 0.5 \(m/20, m = 10"):
        load(clients_per_round=10)
    assert load(clients_per_round=11).session.clients_per_round == 11
    assert load(clients_per_round=0.5).session.clients_per_round == 0.5  # m: who is online


def test_state_round_trips_and_a_fresh_state_resets():
    kwargs = {"noise_multiplier": 0.8, "initial_clipping_norm": 0.5, "seed": 2}
    strategy = make_strategy("dp_adaptive", kwargs)
    for r in (1, 2, 3):
        _norm_round(strategy, np.linspace(1, 3, 40), r)
    restored = make_strategy("dp_adaptive", kwargs)
    restored.load_state_dict(strategy.state_dict())
    assert restored.clipping_norm == strategy.clipping_norm != 0.5
    assert restored.accountant.steps == 3
    np.testing.assert_array_equal(restored.accountant.rdp, strategy.accountant.rdp)
    a, b = _norm_round(strategy, [2.0] * 40, 4), _norm_round(restored, [2.0] * 40, 4)
    assert a == b  # same state, same seed: the same fourth round
    restored.load_state_dict({})
    assert restored.clipping_norm == 0.5 and restored.accountant.steps == 0
    fixed = make_strategy("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 3.0})
    fixed.load_state_dict({**strategy.state_dict()})  # a fixed norm is not state
    assert fixed.clipping_norm == 3.0 and fixed.accountant.steps == 4


def test_combiners_must_clip_with_the_rounds_norm():
    strategy = make_strategy("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 1.0})
    g = _global()
    a = strategy.start(ShareStart(spec=SPEC, base=g, params={CLIPPING_NORM: 1.0}))
    b = strategy.start(ShareStart(spec=SPEC, base=g, params={CLIPPING_NORM: 2.0}))
    for acc in (a, b):
        acc.fold(Update(g, UpdateMeta("c", 1, 1), b""))
    with pytest.raises(ValueError, match="different norms"):
        strategy.reduce([a.partial(), b.partial()])
    with pytest.raises(ValueError, match="not to this round"):
        strategy.finish(g, strategy.reduce([b.partial()]))
    adaptive = make_strategy("dp_adaptive", {"noise_multiplier": 1.0})
    with pytest.raises(ValueError, match="round's params"):
        adaptive.start(ShareStart(spec=SPEC, base=g))


@pytest.mark.parametrize(("name", "kwargs"), [
    ("dp_fixed", {}),  # the noise and the norm must be chosen
    ("dp_fixed", {"noise_multiplier": 1.0}),
    ("dp_fixed", {"noise_multiplier": -1.0, "clipping_norm": 1.0}),
    ("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 0}),
    ("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 1.0, "delta": 1.0}),
    ("dp_fixed", {"noise_multiplier": 1.0, "clipping_norm": 1.0, "seed": "x"}),
    ("dp_fixed", {"noise_multiplier": "1", "clipping_norm": 1.0}),
    ("dp_adaptive", {"noise_multiplier": 1.0, "target_unclipped_quantile": 1.5}),
    ("dp_adaptive", {"noise_multiplier": 1.0, "clip_norm_lr": 0}),
    ("dp_adaptive", {"noise_multiplier": 1.0, "clipping_norm": 1.0}),
])
def test_bad_options_are_config_errors(name, kwargs):
    with pytest.raises(ConfigError, match="aggregator_kwargs"):
        make_strategy(name, kwargs)


# ---------------------------------------------------------------- through the session runner


def shift_by(value: float):
    def train(params, config, client_id, round_):
        return {k: v + value for k, v in params.items()}, 10, {}
    return train


async def test_the_runner_records_epsilon_with_each_commit_and_a_resume_continues_it():
    seed = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    kwargs = {"noise_multiplier": 0.0, "clipping_norm": 1.0, "seed": 4}
    pool = SimPool(2)
    for i in range(4):
        pool.add(f"c{i}", shift_by(1.0 if i else 100.0))  # c0 would drag the mean far off
    store = MemoryStore()
    try:
        first = await run_session(pool, store, session_settings(
            rounds=2, aggregator="dp_fixed", aggregator_kwargs=kwargs), Start(store.put(encode(seed))))
        done = first[2]
        resumed = await run_session(pool, store, session_settings(
            rounds=3, aggregator="dp_fixed", aggregator_kwargs=kwargs),
            Start(done.model_id, done.rounds_done, done.state_id, resume=True),
            session_id=done.session_id)
    finally:
        await pool.close()
    assert first[0] == resumed[0] == "finished"
    commits = done.recorder.of(RoundCommitted) + resumed[2].recorder.of(RoundCommitted)
    assert [c.report["dp_rounds"] for c in commits] == [1, 2, 3]  # the ledger survived
    assert all(c.report["clipping_norm"] == 1.0 for c in commits)
    assert all(c.report["epsilon"] is None for c in commits)  # no noise: infinite, as null
    # Each round: 3 deltas of norm 4 (16 ones) and one of 400 (16 hundreds), all clipped to
    # 1 and averaged over 4: the model moves by exactly 1 (L2) along the ones direction.
    final = decode(store.get(resumed[2].model_id))
    np.testing.assert_allclose(final["w"], 3 * (3 * 0.25 + 0.25) / 4, rtol=1e-6)


async def test_the_runner_accounts_the_rounds_sampling_rate():
    seed = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    pool = SimPool(1)
    for i in range(10):
        pool.add(f"c{i}", shift_by(0.1))
    store = MemoryStore()
    try:
        state, reason, runner = await run_session(pool, store, session_settings(
            rounds=2, clients_per_round=0.3, aggregator="dp_fixed",
            aggregator_kwargs={"noise_multiplier": 1.0, "clipping_norm": 0.5}),
            Start(store.put(encode(seed))))
    finally:
        await pool.close()
    assert (state, reason) == ("finished", "")
    reference = RDPAccountant()
    reference.step(0.3, 1.0, steps=2)
    report = runner.recorder.of(RoundCommitted)[-1].report
    assert report["sampling_rate"] == 0.3 and report["clients_sampled"] == 3
    assert report["epsilon"] == pytest.approx(reference.epsilon(1e-5))


async def test_a_report_is_recorded_as_storable_numbers_and_a_failing_one_as_nothing():
    from fedray.strategies.fedavg import FedAvg

    class Reporting(FedAvg):
        calls = 0

        def round_report(self):
            Reporting.calls += 1
            if Reporting.calls > 2:  # round 2 commits on the third call: it fails, the commit stands
                raise RuntimeError("no figures")
            return {"eps": np.float64(2.5), "n": np.int64(3), "inf": math.inf, "flag": True,
                    "text": "x"}

    seed = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    pool = SimPool(1)
    for i in range(2):
        pool.add(f"c{i}", shift_by(1.0))
    store = MemoryStore()
    try:
        state, _, runner = await run_session(pool, store, session_settings(rounds=2),
                                             Start(store.put(encode(seed))), strategy=Reporting())
    finally:
        await pool.close()
    assert state == "finished"
    first, second = (c.report for c in runner.recorder.of(RoundCommitted))
    assert first == {"eps": 2.5, "n": 3, "inf": None}
    assert type(first["eps"]) is float and type(first["n"]) is int
    assert second == {}


async def test_a_resumed_adaptive_session_clips_with_the_norm_it_had_adapted_to():
    seed = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    kwargs = {"noise_multiplier": 0.0, "initial_clipping_norm": 0.1, "clip_norm_lr": 0.5}
    pool = SimPool(2)
    for i in range(4):
        pool.add(f"c{i}", shift_by(0.5))  # every delta has norm 2: C grows from 0.1
    store = MemoryStore()
    try:
        _, _, done = await run_session(pool, store, session_settings(
            rounds=2, aggregator="dp_adaptive", aggregator_kwargs=kwargs),
            Start(store.put(encode(seed))))
        _, _, resumed = await run_session(pool, store, session_settings(
            rounds=3, aggregator="dp_adaptive", aggregator_kwargs=kwargs),
            Start(done.model_id, done.rounds_done, done.state_id, resume=True),
            session_id=done.session_id)
    finally:
        await pool.close()
    before = done.recorder.of(RoundCommitted)[-1].report
    after = resumed.recorder.of(RoundCommitted)[0].report
    assert before["next_clipping_norm"] == pytest.approx(0.1 * math.exp(0.5 * 0.5) ** 2)
    assert after["clipping_norm"] == pytest.approx(before["next_clipping_norm"])
    assert after["dp_rounds"] == 3
