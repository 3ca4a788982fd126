"""Integration: update codecs on the digits workload, real Ray, real gRPC edge clients.

One federation (2 combiners, 10 in-process edge clients over real sockets) runs the same
sessions with ``session.codec`` none and int8: int8 must cut the bytes of a round (updates
in, models out as deltas, after round 1 whose seed every client fetches whole) by at
least 3.5x and end within 0.01 of none's held-out accuracy.
topk, a robust rule (median) over int8 and DP (clipping on the client, then int8) must
each learn. Bytes come from tracking (each round's ``bytes_in``), accuracy from the
committed models.
"""

from __future__ import annotations

import pytest

from fedray.tracking.store import TrackingStore
from tests.digits_federation import digits_federation

pytestmark = pytest.mark.integration

CLIENTS, ROUNDS = 10, 5


@pytest.fixture(scope="module")
def federation(ray_session, tracking_uri, tmp_path_factory):
    with digits_federation("codecs", tmp_path_factory.mktemp("codecs"), tracking_uri,
                           CLIENTS, ROUNDS) as digits:
        yield digits, TrackingStore.from_uri(tracking_uri, "t_codecs")


def run(federation, **session):
    """(held-out accuracy of the final model, bytes in and out of rounds 2 and later)."""
    digits, tracking = federation
    session_id, status = digits.submit(**session)
    assert status["session_id"] == session_id
    assert status["state"] == "finished", str({k: v for k, v in status.items() if k != "history"})[:3000]
    accuracy = digits.accuracy(status)
    rounds = [tracking.get_round(status["session_id"], r) for r in range(2, ROUNDS + 1)]
    assert all(r["codec"] == session.get("codec", "none") for r in rounds)
    return accuracy, sum(r["bytes_in"] + r["bytes_out"] for r in rounds)


def test_int8_cuts_the_bytes_of_a_round_3_5x_at_the_same_accuracy(federation):
    plain, plain_bytes = run(federation, codec="none")
    int8, int8_bytes = run(federation, codec="int8")
    print(f"\ncodecs on digits: none {plain:.4f} ({plain_bytes} B), int8 {int8:.4f} "
          f"({int8_bytes} B, {plain_bytes / int8_bytes:.2f}x fewer)")
    assert plain > 0.85
    assert plain_bytes / int8_bytes >= 3.5
    assert abs(int8 - plain) <= 0.01
    _, uplink_only = run(federation, codec="int8", codec_downlink=False)
    assert plain_bytes / uplink_only < 2.0  # the model went down whole: ~1.6x


def test_topk_with_error_feedback_learns(federation):
    accuracy, _ = run(federation, codec="topk", codec_kwargs={"fraction": 0.1})
    assert accuracy > 0.7, accuracy


def test_codecs_compose_with_a_robust_rule_and_with_dp(federation):
    median, _ = run(federation, codec="int8", aggregator="median")
    dp, _ = run(federation, codec="fp16", aggregator="dp_fixed",
                aggregator_kwargs={"noise_multiplier": 0.1, "clipping_norm": 5.0})
    assert median > 0.85, median
    assert dp > 0.5, dp
