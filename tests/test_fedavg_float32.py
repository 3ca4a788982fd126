"""FedAvg's float32 delta sums (issue 16, memory): the bound they are held to, and when
they are used (only under a norm bound that keeps every weighted term finite)."""

import numpy as np
import pytest

from fedray.strategies import make_strategy
from fedray.strategies.fedavg import MAX_TERM32, WeightedSums, add_sums, delta_sum_error
from fedray.strategies.snapshots import UpdateMeta
from fedray.strategies.updates import ShareStart, Update

P = 50_000


def _base(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=P).astype(np.float32),
            "n": np.array([3, 7], np.int64)}  # a counter: averaged from absolute sums


def _updates(base, n, seed=1, step=1e-2):
    rng = np.random.default_rng(seed)
    return [({"w": (base["w"] + rng.normal(scale=step, size=P)).astype(np.float32),
              "n": base["n"] + i}, int(rng.integers(1, 5000))) for i in range(n)]


def _spec(base):
    return {k: ("F32" if v.dtype == np.float32 else "I64", v.shape) for k, v in base.items()}


def _partials(strategy, base, groups, max_term):
    out = []
    for group in groups:
        acc = strategy.start(ShareStart(spec=_spec(base), base=base, max_term=max_term))
        for i, (update, weight) in enumerate(group):
            acc.fold(Update(update, UpdateMeta(f"c{i}", 1, weight), b""))
        out.append(acc.partial())
    return out


def _exact(base, updates):
    weights = np.array([w for _, w in updates], np.float64)
    steps = sum((u["w"].astype(np.float64) - base["w"]) * w for u, w in updates) / weights.sum()
    return base["w"] + steps, max(np.abs(u["w"].astype(np.float64) - base["w"]).max()
                                  for u, _ in updates)


@pytest.mark.parametrize("groups", [1, 3])
def test_float32_delta_sums_are_within_the_stated_bound(groups):
    base, strategy = _base(), make_strategy("fedavg", {})
    updates = _updates(base, 30)
    split = [updates[i::groups] for i in range(groups)]
    partials = _partials(strategy, base, split, max_term=1e6)
    assert all(p.relative and p.sums["w"].dtype == np.float32 for p in partials)
    assert partials[0].sums["w"].nbytes == base["w"].nbytes  # one model, not two
    assert partials[0].sums["n"].dtype == np.float64  # integers: absolute float64 sums
    reduced = strategy.reduce(partials)
    assert reduced.sums["w"].dtype == np.float32
    model = strategy.finish(base, reduced)
    exact, top_step = _exact(base, updates)
    # The sums' bound, plus the committed model's own float32 rounding.
    bound = delta_sum_error(len(updates) + groups) * top_step \
        + np.abs(exact) * 2.0**-24
    err = np.abs(model["w"].astype(np.float64) - exact)
    assert (err <= bound).all(), float((err - bound).max())
    weights = np.array([w for _, w in updates], float)
    counts = sum(u["n"] * w for u, w in updates) / weights.sum()
    np.testing.assert_array_equal(model["n"], np.rint(counts).astype(np.int64))


def test_the_float32_sums_match_float64_sums_far_inside_the_tolerance_users_see():
    base, strategy = _base(), make_strategy("fedavg", {})
    updates = _updates(base, 40, seed=3)
    f32 = strategy.finish(base, strategy.reduce(_partials(strategy, base, [updates], 1e6)))
    f64 = strategy.finish(base, strategy.reduce(_partials(strategy, base, [updates], None)))
    # Both are float32 models: they differ by far less than the step (0.01 here) and about
    # as much as float32 rounding of the weights themselves (~1e-7 x |w|, |w| up to ~4).
    gap = np.abs(f32["w"].astype(np.float64) - f64["w"])
    assert gap.max() <= 1e-6, gap.max()


@pytest.mark.parametrize("max_term", [None, MAX_TERM32 * 10])
def test_without_a_safe_bound_the_sums_stay_float64_and_absolute(max_term):
    base, strategy = _base(), make_strategy("fedavg", {})
    updates = _updates(base, 3)
    (partial,) = _partials(strategy, base, [updates], max_term)
    assert not partial.relative and partial.sums["w"].dtype == np.float64
    model = strategy.finish(base, strategy.reduce([partial]))
    np.testing.assert_allclose(model["w"], _exact(base, updates)[0], rtol=1e-6, atol=1e-7)


def test_asynchronous_shares_with_several_bases_keep_absolute_sums():
    base = _base()
    acc = make_strategy("fedavg", {}).start(ShareStart(spec=_spec(base), base=base,
                                                       max_term=1.0, base_of=lambda v: base))
    assert not acc.partial().relative


def test_partials_of_both_kinds_are_not_added():
    a = WeightedSums({"w": np.ones(2, np.float32)}, 1.0, 1, relative=True)
    b = WeightedSums({"w": np.ones(2)}, 1.0, 1, relative=False)
    with pytest.raises(ValueError, match="mix"):
        add_sums([a, b])


def test_fedavgm_steps_the_same_from_float32_delta_sums():
    base = _base()
    updates = _updates(base, 10, seed=5)
    out = {}
    for term in (1e6, None):
        strategy = make_strategy("fedavgm", {"server_lr": 1.0, "momentum": 0.5})
        for _ in range(2):  # two rounds: the velocity carries over
            out[term] = strategy.finish(base, strategy.reduce(
                _partials(strategy, base, [updates], term)))
    np.testing.assert_allclose(out[1e6]["w"], out[None]["w"], rtol=0, atol=1e-6)
