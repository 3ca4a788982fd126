"""Median, trimmed mean, Krum, Multi-Krum and Bulyan (pure): each against a brute-force
numpy reference over three rounds, one combiner or three, blocks, integers and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fedray.config import SelectConfig, SessionConfig
from fedray.errors import ConfigError
from fedray.serialization import decode, encode
from fedray.strategies import make_strategy
from fedray.strategies.snapshots import ClientInfo, RoundContext, UpdateMeta
from fedray.strategies.updates import ShareStart, Update

SEED = {"w": np.zeros((3, 5), np.float32), "b": np.zeros(7, np.float32)}
CASES = {  # strategy -> (options, clients per round)
    "median": ({}, 8),
    "trimmed_mean": ({"beta": 0.25}, 9),
    "krum": ({"f": 2}, 8),
    "multikrum": ({"f": 2, "m": 3}, 8),
    "bulyan": ({"f": 2}, 11),
}


def _updates(model, round_: int, n: int):
    """``n`` client models: most near ``model``, the last two adversarial (a sign flip x10
    and large noise), each with its example count; fixed per round."""
    rng = np.random.default_rng(round_)
    out = []
    for i in range(n):
        if i == n - 1:
            new = {k: rng.normal(0, 100, v.shape) for k, v in model.items()}
        elif i == n - 2:
            new = {k: v - 10 * (out[0][0][k] - v) for k, v in model.items()}
        else:
            new = {k: v + rng.normal(0.5, 1.0, v.shape) for k, v in model.items()}
        out.append(({k: a.astype(np.float32) for k, a in new.items()}, int(rng.integers(1, 99))))
    return out


def fold_kept(strategy, model, updates, combiners: int = 1):
    """One accumulator per combiner, updates dealt round-robin after a shuffle; kept
    handles resolved as ``SessionRunner.resolve_kept`` does (here, the bytes themselves)."""
    spec = {k: ("F32", v.shape) for k, v in model.items()}
    accs = [strategy.start(ShareStart(spec=spec, base=model, keep=lambda raw: raw))
            for _ in range(combiners)]
    order = np.random.default_rng(len(updates) + combiners).permutation(len(updates))
    for slot, i in enumerate(order):
        update, examples = updates[i]
        raw = encode(update)
        accs[slot % combiners].fold(Update(decode(raw), UpdateMeta(f"c{i:02d}", 1, examples), raw))
    partials = [a.partial() for a in accs]
    for partial in partials:
        for kept in partial.items:
            kept.model = decode(kept.handle)
    return partials


def _round(strategy, model, updates, combiners: int = 1):
    return strategy.finish(model, strategy.reduce(fold_kept(strategy, model, updates, combiners)))


# ------------------------------------------------------------------ brute-force references


def _stacked(models, name):
    return np.stack([m[name].astype(np.float64) for m in models])


def _distance(a, b) -> float:
    return float(sum(((a[k].astype(np.float64) - b[k]) ** 2).sum() for k in a))


def _krum_scores(models, candidates, k):
    """Each candidate's sum of squared distances to its k nearest other candidates."""
    scores = []
    for i in candidates:
        d = sorted(_distance(models[i], models[j]) for j in candidates if j != i)
        scores.append(sum(d[:k]))
    return scores


def reference(name, models, options):
    n = len(models)
    if name == "median":
        return {k: np.median(_stacked(models, k), axis=0) for k in models[0]}
    if name == "trimmed_mean":
        cut = int(options["beta"] * n)
        return {k: np.sort(_stacked(models, k), axis=0)[cut : n - cut].mean(axis=0)
                for k in models[0]}
    if name in ("krum", "multikrum"):
        scores = _krum_scores(models, list(range(n)), n - options["f"] - 2)
        best = np.argsort(scores, kind="stable")[: options.get("m", 1)]
        return {k: _stacked([models[i] for i in best], k).mean(axis=0) for k in models[0]}
    f = options["f"]  # bulyan
    left, chosen = list(range(n)), []
    while len(chosen) < n - 2 * f:
        scores = _krum_scores(models, left, min(len(left) - 1, max(1, len(left) - f - 2)))
        chosen.append(left.pop(int(np.argmin(scores))))
    beta = len(chosen) - 2 * f
    out = {}
    for k in models[0]:
        values = _stacked([models[i] for i in sorted(chosen)], k)
        median = np.median(values, axis=0)
        closest = np.argsort(np.abs(values - median), axis=0, kind="stable")[:beta]
        out[k] = np.take_along_axis(values, closest, axis=0).mean(axis=0)
    return out


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_rule_matches_its_numpy_reference_over_three_rounds(name):
    options, n = CASES[name]
    strategy = make_strategy(name, options)
    model = expected = SEED
    for r in range(1, 4):
        model = _round(strategy, model, _updates(model, r, n))
        # sorted by client id, as reduce orders them, whatever combiner they came through
        want = reference(name, [u for u, _ in _updates(expected, r, n)], options)
        expected = {k: v.astype(np.float32) for k, v in want.items()}
        for k in SEED:
            assert model[k].dtype == np.float32 and model[k].shape == SEED[k].shape
            np.testing.assert_allclose(model[k], expected[k], rtol=1e-6, atol=1e-6)
    assert np.abs(model["w"]).max() < 5  # the adversaries did not take over


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_combiner_and_three_give_the_same_model(name):
    options, n = CASES[name]
    models = {}
    for combiners in (1, 3):
        strategy, model = make_strategy(name, options), SEED
        for r in range(1, 4):
            model = _round(strategy, model, _updates(model, r, n), combiners)
        models[combiners] = model
    for k in SEED:
        np.testing.assert_array_equal(models[3][k], models[1][k])


@pytest.mark.parametrize("name", sorted(CASES))
def test_blocks_smaller_than_a_tensor_give_the_same_result(name, monkeypatch):
    import fedray.strategies.robust as robust

    options, n = CASES[name]
    updates = _updates(SEED, 1, n)
    whole = _round(make_strategy(name, options), SEED, updates)
    monkeypatch.setattr(robust, "BLOCK", 3 * n)  # 3 elements per block: 15 = 5 blocks
    blocked = _round(make_strategy(name, options), SEED, updates)
    for k in SEED:
        np.testing.assert_allclose(blocked[k], whole[k], rtol=1e-6, atol=1e-6)


def test_integer_tensors_are_rounded_back():
    strategy = make_strategy("median")
    base = {"n": np.zeros(2, np.int64)}
    updates = [({"n": np.array(v, np.int64)}, 1) for v in ([1, 2], [2, 5], [4, 6], [9, 9])]
    spec = {"n": ("I64", (2,))}
    acc = strategy.start(ShareStart(spec=spec, base=base, keep=lambda raw: raw))
    for i, (u, n) in enumerate(updates):
        acc.fold(Update(u, UpdateMeta(f"c{i}", 1, n), encode(u)))
    for kept in acc.partial().items:
        kept.model = decode(kept.handle)
    out = strategy.finish(base, strategy.reduce([acc.partial()]))
    assert out["n"].dtype == np.int64 and out["n"].tolist() == [3, 6]  # rint(3.0), rint(5.5)


def test_examples_do_not_weigh_in():
    """A client that claims many examples counts once, like every other."""
    updates = [({"w": np.full((3, 5), v, np.float32), "b": np.zeros(7, np.float32)}, n)
               for v, n in ((0.0, 1), (1.0, 1), (2.0, 1), (50.0, 10**6))]
    out = _round(make_strategy("trimmed_mean", {"beta": 0.0}), SEED, updates)
    np.testing.assert_allclose(out["w"], 53 / 4)


@pytest.mark.parametrize(("name", "options", "needed"), [
    ("krum", {"f": 2}, 7), ("multikrum", {"f": 1, "m": 6}, 6), ("bulyan", {"f": 2}, 11)])
def test_too_few_updates_for_f_are_declared_and_refused_clearly(name, options, needed):
    strategy = make_strategy(name, options)
    # Declared: the runtime then waits for, asks and needs that many (test_session_runner).
    assert strategy.declare().min_updates == needed
    with pytest.raises(ValueError, match=f"needs at least {needed} updates, got {needed - 1}"):
        strategy.reduce(fold_kept(strategy, SEED, _updates(SEED, 1, needed - 1)))
    online = tuple(ClientInfo(f"c{i}", "combiner-0") for i in range(needed))
    ok = RoundContext("s", 1, 1, online, SessionConfig(min_clients=needed), seed=0)
    assert strategy.configure(ok).asked == needed
    # Too few clients this round (one is not eligible) may pass next time: not a ConfigError.
    few = RoundContext("s", 1, 1, online, SessionConfig(
        min_clients=needed, select=SelectConfig(ids=[c.client_id for c in online[1:]])), seed=0)
    with pytest.raises(ValueError, match=f"can ask only {needed - 1} client"):
        strategy.configure(few)


def test_a_min_clients_below_what_f_needs_loads_the_runtime_raises_it():
    from fedray.deploy.config_file import config_from_dict

    def load(**session):
        return config_from_dict({"federation": "byz", "seed_model": "unused", "session": {
            "aggregator": "bulyan", "aggregator_kwargs": {"f": 1}, **session}},
            source="byz.yaml")

    assert load(min_clients=2).session.min_clients == 2  # rounds will wait for 7 (4f + 3)
    with pytest.raises(ConfigError, match=r"^byz.yaml: session.max_kept_updates \(6\): "
                                          r"'bulyan' keeps at most that many updates per "
                                          r"round, fewer than the 7 updates 'bulyan' needs"):
        load(max_kept_updates=6)  # but a bound below 4f + 3 can never work


def test_options_are_checked_when_the_config_is_loaded():
    assert make_strategy("multikrum", {"f": 2}).m is None  # n - f
    for name, bad in [("trimmed_mean", {"beta": 0.5}), ("trimmed_mean", {"beta": -0.1}),
                      ("krum", {"f": -1}), ("krum", {"f": 1.5}), ("krum", {"m": 2}),
                      ("multikrum", {"m": 0}), ("bulyan", {"f": "two"}), ("median", {"f": 1})]:
        with pytest.raises(ConfigError, match="aggregator_kwargs"):
            make_strategy(name, bad)


async def test_the_session_runner_takes_the_median_over_every_combiners_updates():
    """Through real combiner cores (tests/simfed.py): 5 clients over 3 combiners, two of
    them far off; each round moves by the median shift over all five, never by a median
    of per-combiner medians."""
    from fedray.actors.controller.session_runner import Start
    from tests.simfed import MemoryStore, SimPool, run_session, session_settings

    def shift_by(value):
        def train(params, config, client_id, round_):
            return {k: v + value for k, v in params.items()}, 10, {}
        return train

    pool = SimPool(3)
    for i, value in enumerate((1.0, 2.0, 3.0, 100.0, -50.0)):
        pool.add(f"c{i}", shift_by(value))
    store = MemoryStore()
    try:
        state, reason, runner = await run_session(
            pool, store, session_settings(rounds=3, min_clients=5, aggregator="median",
                                          clients_per_round=5), Start(store.put(encode(SEED))))
    finally:
        await pool.close()
    assert (state, reason) == ("finished", "")
    np.testing.assert_allclose(decode(store.get(runner.model_id))["w"], 3 * 2.0)


def test_trimmed_mean_trims_floor_beta_n_despite_float_error():
    """0.29 * 100 is 28.999999999999996 in floating point: k must still be 29."""
    values = [float(v * v) for v in range(100)]  # spread: each trimmed value shows
    updates = [({"w": np.full((3, 5), v, np.float32), "b": np.zeros(7, np.float32)}, 1)
               for v in values]
    out = _round(make_strategy("trimmed_mean", {"beta": 0.29}), SEED, updates)
    kept = sorted(values)[29:71]  # 29 trimmed from each end
    np.testing.assert_allclose(out["w"], np.mean(kept), rtol=1e-6)
