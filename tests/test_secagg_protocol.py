"""SecAgg+ rounds end to end, in process: the exact sum across 1 and 3 combiners, with
dropouts at every stage, failing cleanly (nothing revealed) with too many, and nothing
the servers hold before unmasking says anything about one input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fedray.errors import ConfigError, SecAggError
from fedray.strategies.secagg import graph, shamir
from fedray.strategies.secagg.client import SecAggClient
from fedray.strategies.secagg.fold import MaskedFold
from fedray.strategies.secagg.inprocess import Dropouts, Trace, run_round
from fedray.strategies.secagg.messages import (
    Envelope,
    Inbox,
    MaskedInput,
    Roster,
    RoundSetup,
    UnmaskReply,
    UnmaskRequest,
)
from fedray.strategies.secagg.quantize import Quantizer
from fedray.strategies.secagg.server import SecAggServer

P = 2000


def _setup(n=20, degree=None, threshold=None, length=P, bits=16, max_weight=1, clip=1.0,
           mode="l2"):
    degree = n - 1 if degree is None else degree
    return RoundSetup(round_id=b"s/1", graph_seed=b"graph", clients=tuple(range(1, n + 1)),
                      degree=degree, threshold=threshold or min(degree, n - 1) // 2 + 1,
                      quantizer=Quantizer(clip=clip, bits=bits, mode=mode), length=length,
                      max_weight=max_weight)


def _updates(setup, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.normal(0, 0.05, setup.length).astype(np.float32) for i in setup.clients}


def _expected_ring(setup, updates, who, weights=None):
    total = np.zeros(setup.length, np.uint32)
    for i in who:
        total += setup.quantizer.encode(updates[i], (weights or {}).get(i, 1))
    return total


@pytest.mark.parametrize("combiners", [1, 3])
@pytest.mark.parametrize("degree", [None, 8])  # the complete graph, and a sparse one
def test_the_sum_is_the_exact_ring_sum_of_the_quantized_updates(combiners, degree):
    setup = _setup(n=24, degree=degree)
    updates = _updates(setup)
    result = run_round(setup, updates, combiners)
    assert result.survivors == frozenset(setup.clients)
    assert np.array_equal(result.total, _expected_ring(setup, updates, setup.clients))


def test_the_sum_is_within_the_quantization_bound_of_the_float_sum():
    setup = _setup(n=20)
    updates = _updates(setup, seed=3)
    result = run_round(setup, updates, combiners=3)
    floats = sum(setup.quantizer.clipped(u) for u in updates.values())
    error = np.abs(result.values(setup) - floats).max()
    assert error <= setup.quantizer.error_bound(20)


def test_weights_are_summed_exactly():
    setup = _setup(n=12, max_weight=50, bits=12)
    updates = _updates(setup)
    weights = {i: i * 4 for i in setup.clients}
    result = run_round(setup, updates, 3, weights=weights)
    assert result.weight == sum(weights.values())
    assert np.array_equal(result.total, _expected_ring(setup, updates, setup.clients, weights))


@pytest.mark.parametrize("stage", ["before_input", "before_unmask"])
@pytest.mark.parametrize("degree", [None, 20])  # 20: t = 11 survive any 9 gone
def test_30_percent_dropping_still_gives_the_survivors_exact_sum(stage, degree):
    """``before_input``: 30% shared keys but sent no masked input (their pairwise masks
    are rebuilt from their key shares); ``before_unmask``: 30% sent inputs and left
    (their self-masks are rebuilt from their seed shares)."""
    setup = _setup(n=30, degree=degree)
    updates = _updates(setup)
    gone = frozenset(range(1, 31, 3)) - {1}  # 9 of 30
    trace = Trace()
    result = run_round(setup, updates, 3, Dropouts(**{stage: gone}), trace=trace)
    counted = set(setup.clients) - gone if stage == "before_input" else set(setup.clients)
    assert result.survivors == counted
    assert np.array_equal(result.total, _expected_ring(setup, updates, counted))
    assert trace.request.dropped == (gone if stage == "before_input" else frozenset())


def test_a_planned_sparse_graph_over_100_clients_with_10_percent_dropping():
    plan = graph.plan(100, 0.1)
    assert not plan.complete
    setup = _setup(n=100, degree=plan.degree, threshold=plan.threshold, length=500)
    updates = _updates(setup)
    gone = frozenset(np.random.default_rng(5).choice(setup.clients, 10, replace=False).tolist())
    result = run_round(setup, updates, 3, Dropouts(before_input=gone))
    counted = set(setup.clients) - gone
    assert np.array_equal(result.total, _expected_ring(setup, updates, counted))


def test_dropouts_at_every_stage_at_once():
    setup = _setup(n=40, degree=20)
    updates = _updates(setup)
    drop = Dropouts(before_advertise=frozenset({2, 3}), before_share=frozenset({5}),
                    before_input=frozenset({7, 11, 13}), before_unmask=frozenset({17, 19}))
    result = run_round(setup, updates, 3, drop)
    counted = set(setup.clients) - {2, 3, 5, 7, 11, 13}
    assert np.array_equal(result.total, _expected_ring(setup, updates, counted))


def test_too_many_dropouts_fail_with_a_reason_and_reveal_nothing():
    setup = _setup(n=20)  # threshold 10
    updates = _updates(setup)
    trace = Trace()
    with pytest.raises(SecAggError) as info:
        run_round(setup, updates, 3, Dropouts(before_input=frozenset(range(1, 12))),
                  trace=trace)
    assert info.value.reason == "too_few_survivors" and "nothing is revealed" in str(info.value)
    assert trace.request is None  # no survivor was asked for a single share
    assert trace.server._total is None  # the masked sum is dropped, never unmasked
    assert all(c.phase.value == "masked" for i, c in trace.clients.items() if i > 11)


def test_too_few_unmask_replies_fail_before_any_mask_is_removed():
    setup = _setup(n=20)
    trace = Trace()
    with pytest.raises(SecAggError) as info:
        run_round(setup, _updates(setup), 3, Dropouts(before_unmask=frozenset(range(1, 12))),
                  trace=trace)
    assert info.value.reason == "too_few_shares"
    assert trace.server._total is None


def test_a_sparse_neighbourhood_too_thin_to_unmask_fails_cleanly():
    setup = _setup(n=30, degree=6)  # threshold 4 of 6 neighbours
    victim = 1
    around = sorted(setup.neighbours[victim])
    with pytest.raises(SecAggError) as info:
        run_round(setup, _updates(setup), 2, Dropouts(before_input=frozenset(around[:3])))
    assert info.value.reason == "too_few_survivors"


def _chi2_bytes(values: np.ndarray) -> float:
    counts = np.bincount(np.ascontiguousarray(values).view(np.uint8), minlength=256)
    expected = values.nbytes / 256
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("inputs", ["zeros", "extremes"])
def test_every_partial_and_input_the_servers_hold_looks_uniform(inputs):
    """Whatever the inputs (all at the bottom of the range, or all at its ends), each
    combiner's partial, each masked input, the reduced sum before unmasking and the
    envelopes' bytes pass a chi-square test of uniform bytes (255 dof, p ~ 1e-5)."""
    setup = _setup(n=15, length=20_000, mode="coordinate")  # "zeros": every q is 0
    value = {"zeros": lambda i: -1.0, "extremes": lambda i: (-1.0) ** i}[inputs]
    updates = {i: np.full(setup.length, value(i), np.float32) for i in setup.clients}
    trace = Trace()
    run_round(setup, updates, 3, trace=trace)
    held = [p.total for p in trace.partials] + [m.vector for m in trace.inputs]
    held.append(sum((p.total for p in trace.partials), np.zeros(setup.length, np.uint32)))
    for values in held:
        assert _chi2_bytes(values) < 360
    sealed = b"".join(e.sealed[12:-16] for s in trace.shares for e in s.envelopes)
    assert _chi2_bytes(np.frombuffer(sealed, np.uint8)) < 360


def test_the_partial_before_unmasking_is_independent_of_the_inputs():
    """Two rounds with fresh keys, one on all-zero and one on all-maximal inputs: the
    reduced masked sums have the same (uniform) distribution, so the difference of their
    means is within sampling noise, while the unmasked sums are far apart."""
    means = []
    for value in (-1.0, 1.0):
        setup = _setup(n=10, length=50_000, mode="coordinate")
        updates = {i: np.full(setup.length, value, np.float32) for i in setup.clients}
        trace = Trace()
        result = run_round(setup, updates, 1, trace=trace)
        means.append((trace.partials[0].total.astype(np.float64).mean(), result.total[0]))
    sigma = 2.0**32 / np.sqrt(12 * 50_000)
    assert abs(means[0][0] - means[1][0]) < 6 * sigma
    assert means[0][1] == 0 and means[1][1] == 10 * setup.quantizer.levels


def test_fewer_than_threshold_colluders_cannot_unmask_a_client():
    """t - 1 neighbours pool their shares of client 1's self-mask seed: it is refused,
    and forcing the interpolation gives a wrong seed."""
    setup = _setup(n=12)  # threshold 6
    trace = Trace()
    run_round(setup, _updates(setup), 1, trace=trace)
    t = setup.threshold
    holders = [c for i, c in trace.clients.items() if i != 1][: t - 1]
    pooled = [shamir.Share.from_bytes(c._held[1][0]) for c in holders]
    with pytest.raises(SecAggError) as info:
        shamir.reconstruct(pooled, t)
    assert info.value.reason == "too_few_shares"
    try:
        forced = shamir.reconstruct(pooled, t - 1)
    except SecAggError:
        forced = None
    assert forced != trace.clients[1]._self_seed
    full = [shamir.Share.from_bytes(c._held[1][0]) for c in
            [c for i, c in trace.clients.items() if i != 1][:t]]
    assert shamir.reconstruct(full, t) == trace.clients[1]._self_seed  # t is enough


def test_a_client_reveals_one_kind_of_share_per_neighbour_and_answers_once():
    setup = _setup(n=8)
    trace = Trace()
    run_round(setup, _updates(setup), 1, Dropouts(before_input=frozenset({2})), trace=trace)
    for reply in trace.replies:  # 2 dropped: its key share; the others: seed shares
        assert set(reply.key_shares) == {2}
        assert set(reply.self_shares) == set(setup.clients) - {2, reply.sender}
    client = trace.clients[3]
    assert client.phase.value == "done"
    with pytest.raises(SecAggError, match="not masked"):
        client.unmask(UnmaskRequest(frozenset(setup.clients), frozenset()))
    with pytest.raises(SecAggError, match="both survivors and dropped"):
        UnmaskRequest(frozenset({1, 2, 3}), frozenset({2}))


def test_a_request_that_calls_a_live_client_dropped_is_refused_by_it():
    setup = _setup(n=8)
    trace = Trace()
    with pytest.raises(SecAggError):
        run_round(setup, _updates(setup), 1, Dropouts(before_unmask=frozenset(setup.clients)),
                  trace=trace)
    client = trace.clients[4]
    client.phase = type(client.phase).MASKED  # as if it had not answered yet
    with pytest.raises(SecAggError, match="as dropped or absent"):
        client.unmask(UnmaskRequest(frozenset(setup.clients) - {4}, frozenset({4})))


def test_a_tampered_envelope_makes_its_receiver_drop_and_the_round_still_sums(monkeypatch):
    setup = _setup(n=10)
    updates = _updates(setup)
    route = SecAggServer.route

    def tampering(self, shares):  # a relay flips a byte of one envelope to client 5
        inboxes = route(self, shares)
        first, *rest = inboxes[5].envelopes
        inboxes[5] = Inbox(5, (Envelope(first.sender, 5, first.sealed[:-1] + b"\0"), *rest))
        return inboxes

    monkeypatch.setattr(SecAggServer, "route", tampering)
    trace = Trace()
    result = run_round(setup, updates, 2, trace=trace)
    assert trace.failures[5].reason == "tampered"
    counted = set(setup.clients) - {5}
    assert np.array_equal(result.total, _expected_ring(setup, updates, counted))


def test_an_altered_key_share_fails_the_round_before_unmasking(monkeypatch):
    setup = _setup(n=10)
    honest = SecAggClient.unmask

    def lying(self, request):
        reply = honest(self, request)
        altered = {v: s[:-1] + bytes([s[-1] ^ 1]) for v, s in reply.key_shares.items()}
        return UnmaskReply(reply.sender, reply.self_shares, altered)

    monkeypatch.setattr(SecAggClient, "unmask", lying)
    trace = Trace()
    with pytest.raises(SecAggError) as info:
        run_round(setup, _updates(setup), 1, Dropouts(before_input=frozenset({3})), trace=trace)
    assert info.value.reason == "malformed_share"
    assert trace.server._total is None


def test_a_second_input_from_one_client_is_not_folded():
    setup = _setup(n=4, length=3)
    fold = MaskedFold(setup)
    fold.fold(MaskedInput(1, 1, np.ones(3, np.uint32)))
    with pytest.raises(SecAggError, match="already folded"):
        fold.fold(MaskedInput(1, 1, np.ones(3, np.uint32)))
    with pytest.raises(SecAggError, match="uint32"):
        fold.fold(MaskedInput(2, 1, np.ones(3, np.float32)))
    assert fold.partial().senders == {1}


def test_a_setup_that_could_wrap_or_be_unmasked_twice_is_refused():
    with pytest.raises(ConfigError, match="quantization_bits"):
        _setup(n=300, bits=24)
    with pytest.raises(ValueError, match="over half"):
        _setup(n=10, threshold=4)


def test_stages_out_of_order_or_for_another_client_are_refused():
    setup = _setup(n=4, length=3)
    client = SecAggClient(setup, 1)
    with pytest.raises(SecAggError, match="out of order"):
        client.share_keys(None)
    ad = client.advertise()
    other = SecAggClient(setup, 2).advertise()
    with pytest.raises(SecAggError, match="own keys"):
        client.share_keys(Roster({1: (other.c_public, other.s_public), 2: (ad.c_public,
                                                                          ad.s_public)}))
    assert client.phase.value == "aborted"
    with pytest.raises(ValueError, match="not in this round"):
        SecAggClient(setup, 9)


def test_the_round_values_cross_process_boundaries():
    setup = _setup(n=6, length=4)
    assert setup.neighbours  # cached: it must pickle too
    trace = Trace()
    run_round(setup, _updates(setup), 2, trace=trace)
    for value in (setup, trace.partials[0], trace.request, trace.replies[0], trace.shares[0],
                  trace.inputs[0]):
        again = pickle.loads(pickle.dumps(value))
        assert type(again) is type(value)
    assert pickle.loads(pickle.dumps(setup)).neighbours == setup.neighbours
