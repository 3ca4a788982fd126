"""Heartbeats paced by the number of clients (fedray.actors.combiner.pacing)."""

from fedray.actors.combiner.pacing import MAX_BEATS_PER_S, beat_interval, offline_after


def test_few_clients_beat_as_configured_and_many_no_faster_than_a_combiner_answers():
    assert beat_interval(2.0, 10) == 2.0
    assert beat_interval(2.0, 1500) == 1500 / MAX_BEATS_PER_S  # 6 s: 250 beats a second
    for clients in (1, 500, 1500, 5000, 10_000):
        assert clients / beat_interval(2.0, clients) <= MAX_BEATS_PER_S


def test_the_silence_before_offline_keeps_its_ratio_to_the_interval():
    assert offline_after(10.0, 2.0, 2.0) == 10.0
    assert offline_after(10.0, 2.0, 6.0) == 30.0
    assert offline_after(10.0, 2.0, 1.0) == 10.0  # never shorter than configured
