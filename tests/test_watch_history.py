"""The round history a watcher gets: bounded in the controller, only new records per call,
complete on the driver's side (``SessionStatus.snapshot`` and ``Federation.follow``'s merge)."""

from __future__ import annotations

import pickle

from fedray.actors.controller.callbacks import (
    HISTORY_KEPT,
    RoundDone,
    SessionStatus,
    StatusCallback,
)
from fedray.deploy.federation import _merge_history


def _status(records: int) -> SessionStatus:
    status = SessionStatus(session_id="s")
    callback = StatusCallback(status, lambda s: None)
    for n in range(1, records + 1):
        callback.on_event(RoundDone("s", {"round": n, "updates": 2}))
    return status


def test_the_controller_keeps_a_bounded_window_but_counts_every_record():
    status = _status(HISTORY_KEPT + 50)

    assert len(status.history) == HISTORY_KEPT
    assert status.history_total == HISTORY_KEPT + 50
    assert status.history[0]["round"] == 51 and status.history[-1]["round"] == HISTORY_KEPT + 50


def test_a_watcher_gets_only_the_records_it_does_not_have():
    status = _status(1000)

    assert [r["round"] for r in status.snapshot(after=998)["history"]] == [999, 1000]
    assert status.snapshot(after=1000)["history"] == []
    assert len(status.snapshot()["history"]) == HISTORY_KEPT  # no `after`: what is kept
    assert len(status.snapshot(after=5)["history"]) == HISTORY_KEPT  # older ones are gone


def test_a_watch_costs_the_same_late_in_a_long_session():
    early, late = _status(5), _status(10_000)

    size = len(pickle.dumps(early.snapshot(after=4)))
    assert len(pickle.dumps(late.snapshot(after=9_999))) < size + 64
    assert late.snapshot(after=9_999)["history_total"] == 10_000


def test_records_sent_are_copies():
    status = _status(3)

    status.snapshot(after=2)["history"][0]["updates"] = 99

    assert status.history[-1]["updates"] == 2


def test_the_driver_merges_new_records_and_survives_a_restarted_controller():
    history: list[dict] = []
    status = _status(3)
    known = _merge_history(history, 0, status.snapshot(after=0))
    status.add_record({"round": 4})
    known = _merge_history(history, known, status.snapshot(after=known))
    assert [r["round"] for r in history] == [1, 2, 3, 4] and known == 4

    restarted = SessionStatus(session_id="s")  # resumes after round 4: a new, empty status
    restarted.add_record({"round": 5})
    snap = restarted.snapshot(after=known)  # 4 > its 1 record: it sends what it keeps
    known = _merge_history(history, known, snap)

    assert [r["round"] for r in history] == [1, 2, 3, 4, 5] and known == 1
    assert snap["history"] is history  # on_status sees every record since following began
