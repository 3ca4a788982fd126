"""Following tracking as it lands: each document once, updates again, nothing missed."""

from __future__ import annotations

import datetime as dt
import threading

from fedray.tracking.query import follow_query
from fedray.tracking.tail import POLL_MAX_S, Tail


def test_a_tail_gives_each_new_event_once_and_backs_off_while_none_comes(store):
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    store.event("info", "test", "before")  # at or after since: given on the first poll
    tail = Tail(store, "events", {}, "ts", since)
    assert [d["message"] for d in tail.poll()] == ["before"]
    assert tail.poll() == []  # the overlap asks again; nothing is given twice
    waits = [tail.settle(False) for _ in range(5)]
    assert waits == sorted(waits) and waits[-1] == POLL_MAX_S
    store.event("warning", "test", "after")
    assert [d["message"] for d in tail.poll()] == ["after"]
    assert tail.settle(True) < POLL_MAX_S


def test_a_round_is_given_again_when_it_changes(store):
    store.create_session("s1", "fed", {}, 2, "seed")
    tail = Tail(store, "rounds", {}, "updated_at", dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    store.start_round("s1", 1)
    assert [d["status"] for d in tail.poll()] == ["running"]
    store.update_round("s1", 1, status="failed", reason="x")
    assert [d["status"] for d in tail.poll()] == ["failed"]


def test_follow_query_streams_what_lands_after_the_page_it_printed(store, tracking_uri, db_name):
    store.event("info", "test", "old")
    page = store.find("events", {}, [("ts", 1)])
    got: list[str] = []
    done = threading.Event()

    def read() -> None:
        for doc in follow_query(tracking_uri, "events", database=db_name, after=page):
            got.append(doc["message"])
            if doc["message"] == "new":
                done.set()
                return

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    store.event("error", "test", "new")
    assert done.wait(10), got
    assert got == ["new"]  # the page's own event is not given again
