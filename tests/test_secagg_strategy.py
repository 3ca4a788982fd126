"""``aggregator: secagg`` as a strategy: its options, its wire format, and rounds over the
real combiner cores with the real client half (in-process, tests/simfed.py): the result
is FedAvg over the same clipped, quantized deltas, exactly; dropouts before and after the
masked input leave the survivors' exact sum; too many fail the round with a reason and
no unmask stage is ever asked."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from fedray.actors.controller.callbacks import RoundFailed
from fedray.errors import ConfigError, SecAggError
from fedray.serialization import decode
from fedray.strategies import make_strategy
from fedray.strategies.secagg import wire
from fedray.strategies.secagg.half import UNMASK, SecAggHalf
from fedray.strategies.secagg.layout import MASKED, MaskedLayout, flat_delta, stepped
from fedray.strategies.secagg.messages import Envelope, Inbox, RoundSetup, UnmaskRequest
from fedray.strategies.secagg.quantize import RING, Quantizer
from fedray.strategies.secagg.strategy import SecAgg
from tests.simfed import MemoryStore, SimPool, session_settings
from tests.test_session_runner import SEED, _from_seed, shift_by

CLIP = 2.0
KWARGS = {"clip": CLIP, "quantization_bits": 16, "max_weight": 100}


def _settings(**fields):
    return session_settings(**{"rounds": 1, "min_clients": 3, "aggregator": "secagg",
                               "aggregator_kwargs": KWARGS, "round_attempts": 1, **fields})


def expected_model(values: dict[str, float], examples: dict[str, int]) -> dict[str, np.ndarray]:
    """Plain FedAvg over the same clipped, quantized deltas: the ring sum of each client's
    ``w * q(clip(delta))``, decoded, over the total weight, added to SEED."""
    q = Quantizer(CLIP, 16)
    total, weight = np.zeros(16, np.uint64), 0
    for name, v in values.items():
        trained = {k: (s + np.float32(v)).astype(np.float32) for k, s in SEED.items()}
        total += q.encode(flat_delta(trained, SEED), examples[name])
        weight += examples[name]
    ring = (total % RING).astype(np.uint32)
    return stepped(SEED, q.decode_sum(ring, weight) / weight)


# ------------------------------------------------------------------ pure


def test_secagg_is_a_registered_strategy_with_its_stages_layout_and_half():
    strategy = make_strategy("secagg", {"clip": 1.0})
    declared = strategy.declare()
    assert [s.name for s in declared.stages] == ["secagg.advertise", "secagg.share", "train",
                                                 "secagg.unmask", "validate"]
    assert all(s.deadline_s == 30.0 for s in declared.stages if s.name.startswith("secagg"))
    assert isinstance(declared.layout, MaskedLayout)
    assert declared.layout.expected({"w": ("F32", (3, 4)), "n": ("I64", (1,)),
                                     "b": ("F16", (4,))}) == {MASKED: ("U32", (16,))}
    assert declared.client_half == "fedray.strategies.secagg.half:SecAggHalf"
    assert declared.min_updates == 3  # rounds wait for, ask and need 3 clients at least


@pytest.mark.parametrize(("kwargs", "why"), [
    ({}, "needs session.aggregator_kwargs clip"),
    ({"clip": -1.0}, "clip must be a finite number > 0"),
    ({"clip": 1.0, "quantization_bits": 40}, "quantization_bits"),
    ({"clip": 1.0, "threshold": 1}, "threshold must be a whole number >= 2"),
    ({"clip": 1.0, "dropout": 1.5}, "dropout"),
    ({"clip": 1.0, "thresh": 3}, "did you mean threshold"),
])
def test_options_that_cannot_work_are_a_config_error(kwargs, why):
    with pytest.raises(ConfigError, match=why):
        make_strategy("secagg", kwargs)


def test_a_cohort_whose_weights_could_wrap_the_ring_is_refused_at_load():
    with pytest.raises(ValueError, match="max_weight is the most examples"):
        SecAgg(clip=1.0, max_weight=10_000).check_settings(
            session_settings(clients_per_round=10))
    SecAgg(clip=1.0, max_weight=100).check_settings(session_settings(clients_per_round=10))
    with pytest.raises(ValueError, match="session.codec to none"):
        SecAgg(clip=1.0).check_settings(session_settings(codec="int8"))


def test_by_default_an_update_counts_for_as_many_examples_as_the_ring_has_room_for():
    strategy, settings = SecAgg(clip=1.0), session_settings()
    assert strategy.max_weight_for(settings, 8) == (RING - 1) // (65535 * 8) == 8192
    strategy.check_settings(settings)  # the stock settings work
    assert strategy.max_weight_for(session_settings(max_examples_per_update=50), 8) == 50
    assert SecAgg(clip=1.0, max_weight=7).max_weight_for(settings, 8) == 7
    with pytest.raises(ConfigError, match="no room"):
        SecAgg(clip=1.0, quantization_bits=24).max_weight_for(settings, 300)


def _setup(n=5):
    return RoundSetup(b"r" * 16, b"g" * 32, tuple(range(1, n + 1)), 4, 3,
                      Quantizer(1.5, 12), 0, 7)


def test_every_stage_message_reads_back_what_was_written():
    setup, index = wire.read_setup(wire.write_setup(_setup(), 4))
    assert index == 4 and setup == _setup()
    roster = {1: (b"a" * 32, b"b" * 32), 3: (b"c" * 32, b"d" * 32)}
    assert wire.read_roster(wire.write_roster(b"r" * 16, roster)) == (b"r" * 16,
                                                                       wire.Roster(roster))
    inbox = Inbox(2, (Envelope(1, 2, b"x" * 140), Envelope(5, 2, b"y" * 140)))
    assert wire.read_inbox(wire.write_inbox(b"r" * 16, inbox)) == (b"r" * 16, inbox)
    request = UnmaskRequest(frozenset({1, 2, 4}), frozenset({3}))
    assert wire.read_request(wire.write_request(b"r" * 16, request)) == (b"r" * 16, request)
    assert wire.read_advertise(wire.write_advertise(b"c" * 32, b"s" * 32)) == (b"c" * 32,
                                                                              b"s" * 32)
    envelopes = (Envelope(2, 1, b"e" * 140), Envelope(2, 4, b"f" * 140))
    assert wire.read_shares(wire.write_shares(envelopes), 2) == envelopes
    assert wire.read_unmask(wire.write_unmask({1: b"s"}, {3: b"k"})) == ({1: b"s"}, {3: b"k"})


@pytest.mark.parametrize("reader", [wire.read_setup, wire.read_roster, wire.read_inbox,
                                    wire.read_request, wire.read_advertise,
                                    lambda d: wire.read_shares(d, 1), wire.read_unmask])
def test_bytes_from_the_network_are_read_or_refused_never_crash(reader):
    rng = np.random.default_rng(0)
    good = {wire.read_setup: wire.write_setup(_setup(), 1),
            wire.read_roster: wire.write_roster(b"r" * 16, {1: (b"a" * 32, b"b" * 32)}),
            wire.read_inbox: wire.write_inbox(b"r", Inbox(1, (Envelope(2, 1, b"x"),))),
            wire.read_request: wire.write_request(b"r", UnmaskRequest(frozenset({1}),
                                                                      frozenset())),
            wire.read_advertise: wire.write_advertise(b"c" * 32, b"s" * 32),
            wire.read_unmask: wire.write_unmask({1: b"s"}, {})}.get(
                reader, wire.write_shares((Envelope(1, 2, b"e"),)))
    reader(good)
    for bad in (b"", b"\x02" + good[1:], good[:-1], good + b"\0", b"\x01\xff\xff"):
        with pytest.raises(SecAggError, match="malformed"):
            reader(bad)
    cases = [bytes(rng.integers(0, 256, rng.integers(1, 200), dtype=np.uint8))
             for _ in range(200)]
    cases += [bytes(np.where(np.arange(len(good)) == i, rng.integers(0, 256), list(good))
                    .astype(np.uint8)) for i in range(len(good))]
    for data in cases:  # anything but a SecAggError fails the test
        with contextlib.suppress(SecAggError):
            reader(data)


def test_a_setup_whose_headroom_would_wrap_is_refused_as_malformed():
    data = bytearray(wire.write_setup(_setup(), 1))
    data[-6:-2] = (1 << 31).to_bytes(4, "big")  # max weight 2^31
    with pytest.raises(SecAggError, match="malformed"):
        wire.read_setup(bytes(data))


def test_the_half_refuses_a_round_it_did_not_set_up():
    from fedray.messages import Task, TaskKind
    task = Task("t", TaskKind.STAGE, "s", 1, "", 0, {}, 0.0, stage="secagg.share",
                payload=wire.write_roster(b"z" * 16, {}))
    with pytest.raises(SecAggError, match="did not set up the round"):
        SecAggHalf().run_stage(task, None)


# ------------------------------------------------------------------ rounds (in-process)

VALUES = {"a": 0.5, "b": -0.25, "c": 1.5, "d": 0.125}  # c is clipped (||delta|| = 6 > 2)
EXAMPLES = {"a": 10, "b": 20, "c": 30, "d": 40}


async def _run(combiners: int, train=None, halves=None, **fields):
    pool = SimPool(combiners)
    for name in VALUES:
        client = pool.add(name, (train or {}).get(name, shift_by(VALUES[name], EXAMPLES[name])))
        if halves and name in halves:
            client.halves = halves[name]
    clients = dict(pool.clients)
    store = MemoryStore()
    state, reason, session = await _from_seed(pool, store, _settings(**fields))
    return state, reason, session, store, clients


@pytest.mark.parametrize("combiners", [1, 2])
async def test_the_secagg_model_is_fedavg_over_the_clipped_quantized_deltas_exactly(combiners):
    state, reason, session, store, clients = await _run(combiners)
    assert (state, reason) == ("finished", "")
    final = decode(store.get(session.model_id))
    want = expected_model(VALUES, EXAMPLES)
    for name in SEED:
        np.testing.assert_array_equal(final[name], want[name])
    # and within the quantization bound of float FedAvg of the clipped deltas
    clipped = {"a": 0.5, "b": -0.25, "c": 0.5, "d": 0.125}
    mean = sum(clipped[c] * EXAMPLES[c] for c in VALUES) / sum(EXAMPLES.values())
    bound = Quantizer(CLIP, 16).error_bound(100) / 100 + 1e-7
    assert np.abs(final["w"] - mean).max() <= bound
    stages = [t for t, _ in clients["a"].tasks_seen]
    assert stages == ["secagg.advertise", "secagg.share", "train", "secagg.unmask"]


def _fails(params, config, client_id, round_):
    raise RuntimeError("gone before its masked input")


async def test_a_client_dropping_before_its_masked_input_leaves_the_others_exact_sum():
    state, reason, session, store, clients = await _run(2, train={"c": _fails})
    assert (state, reason) == ("finished", "")
    survivors = {k: v for k, v in VALUES.items() if k != "c"}
    want = expected_model(survivors, EXAMPLES)
    np.testing.assert_array_equal(decode(store.get(session.model_id))["w"], want["w"])
    assert ("secagg.unmask", 1) not in clients["c"].tasks_seen


class DropsAtUnmask(SecAggHalf):
    def run_stage(self, task, model):
        if task.stage == UNMASK:
            raise RuntimeError("gone after its masked input")
        return super().run_stage(task, model)


class OneHalf:
    def __init__(self, half) -> None:
        self.half = half

    def for_task(self, task):
        return self.half


async def test_a_client_dropping_after_its_masked_input_is_still_in_the_exact_sum():
    state, reason, session, store, _ = await _run(2, halves={"b": OneHalf(DropsAtUnmask())})
    assert (state, reason) == ("finished", "")
    want = expected_model(VALUES, EXAMPLES)
    np.testing.assert_array_equal(decode(store.get(session.model_id))["w"], want["w"])


async def test_too_many_dropouts_fail_the_round_before_anything_is_unmasked():
    state, reason, session, store, clients = await _run(
        2, train={"b": _fails, "c": _fails}, aggregator_kwargs={**KWARGS, "threshold": 3})
    assert state == "failed"
    assert "too_few_survivors" in reason and "nothing is revealed" in reason
    assert all(("secagg.unmask", 1) not in c.tasks_seen for c in clients.values())
    assert session.recorder.of(RoundFailed)
    np.testing.assert_array_equal(decode(store.get(session.model_id))["w"], SEED["w"])


class JunkAdvert(SecAggHalf):
    """Sets its round up, then answers the advertise stage with bytes that do not parse."""

    def run_stage(self, task, model):
        reply = super().run_stage(task, model)
        return b"\x01junk" if task.stage == "secagg.advertise" else reply


async def test_a_reply_that_does_not_parse_is_that_clients_dropout_not_a_crash():
    state, reason, session, store, clients = await _run(1, halves={"d": OneHalf(JunkAdvert())})
    assert (state, reason) == ("finished", "")
    want = expected_model({k: v for k, v in VALUES.items() if k != "d"}, EXAMPLES)
    np.testing.assert_array_equal(decode(store.get(session.model_id))["w"], want["w"])
    assert ("train", 1) not in clients["d"].tasks_seen  # left out from the roster on
