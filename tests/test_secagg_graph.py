"""The neighbour graph: the same for every party, regular and symmetric, a uniform
permutation, and a degree that grows like log n and survives the dropouts it is for."""

from __future__ import annotations

import collections
import random

import pytest

from fedray.strategies.secagg import graph


def test_every_party_computes_the_same_graph():
    ids = list(range(1, 301))
    shuffled = random.sample(ids, len(ids))
    assert graph.neighbours(b"round-seed", ids, 20) == graph.neighbours(b"round-seed", shuffled, 20)
    assert graph.neighbours(b"round-seed", ids, 20) != graph.neighbours(b"other-seed", ids, 20)


@pytest.mark.parametrize("n, k", [(300, 20), (11, 4), (50, 48), (7, 6), (7, 10)])
def test_the_graph_is_regular_and_symmetric(n, k):
    ids = list(range(1, n + 1))
    graph_of = graph.neighbours(b"s", ids, k)
    degree = min(k, n - 1)
    assert all(len(ns) == degree and i not in ns for i, ns in graph_of.items())
    assert all(i in graph_of[j] for i, ns in graph_of.items() for j in ns)


def test_an_odd_sparse_degree_is_refused():
    with pytest.raises(ValueError, match="even"):
        graph.neighbours(b"s", list(range(1, 50)), 7)


def test_the_permutation_is_uniform():
    """Where client 0 lands, over 8000 seeds: chi-square over 8 positions."""
    counts = collections.Counter(graph._permutation(i.to_bytes(4, "big"), 8).index(0)
                                 for i in range(8000))
    chi2 = sum((counts[p] - 1000) ** 2 / 1000 for p in range(8))
    assert chi2 < 24.3  # 7 degrees of freedom: exceeded with p ~ 0.001


def test_the_degree_grows_like_log_n():
    small, large = graph.plan(1000, 0.05), graph.plan(100_000, 0.05)
    assert not small.complete and large.degree <= 1.5 * small.degree
    assert large.degree < 100_000 / 1000


@pytest.mark.parametrize("n, dropout, corrupt", [(1000, 0.05, 0.0), (500, 0.1, 0.05),
                                                 (10_000, 0.3, 0.0)])
def test_the_plan_meets_its_bounds(n, dropout, corrupt):
    p = graph.plan(n, dropout, corrupt)
    assert p.threshold > p.degree / 2
    assert p.failure <= 2.0**-30 and p.leak <= 2.0**-40
    assert graph.plan(n, dropout, corrupt, eta=20).degree <= p.degree


def test_a_small_cohort_gets_the_complete_graph_and_says_its_bound():
    p = graph.plan(10, 0.3)
    assert p.complete and p.degree == 9 and p.threshold == 5
    assert 0.5 < p.failure <= 1.0  # 10 clients with 30% dropping: no promise


def test_the_planned_graph_survives_its_dropout_fraction():
    """Monte Carlo: drop 10% of 500 clients at random, 100 times: every client keeps at
    least `threshold` surviving neighbours each time."""
    p = graph.plan(500, 0.1)
    ids = list(range(1, 501))
    rng = random.Random(7)
    for trial in range(100):
        graph_of = graph.neighbours(trial.to_bytes(2, "big"), ids, p.degree)
        dropped = set(rng.sample(ids, 50))
        fewest = min(len(ns - dropped) for ns in graph_of.values())
        assert fewest >= p.threshold, (trial, fewest, p)


def test_bad_plans_are_refused():
    with pytest.raises(ValueError):
        graph.plan(1, 0.1)
    with pytest.raises(ValueError):
        graph.plan(100, 0.6, 0.5)
