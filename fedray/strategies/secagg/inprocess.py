"""One SecAgg+ round with every party in one process: what the tests and the bench drive.

It runs the same state machines the tiers run, with the wire replaced by function calls:
clients on combiners round-robin (so a pair often spans two combiners), each combiner
folding its own clients, the controller routing, reducing and unmasking. ``Dropouts``
says who leaves at which stage; ``Trace`` keeps every message the servers saw before
unmasking, so tests can check that none of it says anything about one input.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedray.errors import SecAggError
from fedray.strategies.secagg.client import SecAggClient
from fedray.strategies.secagg.fold import MaskedFold
from fedray.strategies.secagg.messages import (
    Advertise,
    MaskedInput,
    MaskedPartial,
    RoundSetup,
    ShareKeys,
    UnmaskReply,
    UnmaskRequest,
)
from fedray.strategies.secagg.server import Aggregate, SecAggServer


@dataclass(frozen=True)
class Dropouts:
    """Who leaves, and when: before advertising or sharing keys, before sending a masked
    input (after sharing keys), or before answering the unmask request."""

    before_advertise: frozenset[int] = frozenset()
    before_share: frozenset[int] = frozenset()
    before_input: frozenset[int] = frozenset()
    before_unmask: frozenset[int] = frozenset()


@dataclass
class Trace:
    """What the servers held before unmasking, and the parties, for inspection."""

    adverts: list[Advertise] = field(default_factory=list)
    shares: list[ShareKeys] = field(default_factory=list)
    inputs: list[MaskedInput] = field(default_factory=list)
    partials: list[MaskedPartial] = field(default_factory=list)
    request: UnmaskRequest | None = None
    replies: list[UnmaskReply] = field(default_factory=list)
    clients: dict[int, SecAggClient] = field(default_factory=dict)
    server: SecAggServer | None = None
    failures: dict[int, SecAggError] = field(default_factory=dict)  # clients that aborted
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each step, all parties


def run_round(setup: RoundSetup, updates: Mapping[int, np.ndarray], combiners: int = 1,
              drop: Dropouts | None = None, weights: Mapping[int, int] | None = None,
              trace: Trace | None = None) -> Aggregate:
    """The round's Aggregate, or the SecAggError the controller failed it with."""
    trace = trace if trace is not None else Trace()
    drop = drop or Dropouts()
    server = trace.server = SecAggServer(setup)
    clients = trace.clients
    clients.update({i: SecAggClient(setup, i) for i in setup.clients})
    live = [i for i in setup.clients if i not in drop.before_advertise]

    def timed(step, call, *args):
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            trace.seconds[step] = time.perf_counter() - started

    def each(ids, call):
        out = []
        for i in ids:
            try:
                out.append(call(i))
            except SecAggError as exc:  # this client aborts: a dropout from here on
                trace.failures[i] = exc
        return out

    trace.adverts = timed("advertise", each, live, lambda i: clients[i].advertise())
    roster = timed("roster", server.roster, trace.adverts)
    live = [i for i in live if i not in drop.before_share]
    trace.shares = timed("share_keys", each, live, lambda i: clients[i].share_keys(roster))
    inboxes = timed("route", server.route, trace.shares)
    live = [i for i in inboxes if i not in drop.before_input]
    trace.inputs = timed("masked_input", each, live, lambda i: clients[i].masked_input(
        inboxes[i], updates[i], (weights or {}).get(i, 1)))
    folds = [MaskedFold(setup) for _ in range(combiners)]

    def fold_all():
        for masked in trace.inputs:
            folds[setup.clients.index(masked.sender) % combiners].fold(masked)
        return [f.partial() for f in folds]

    trace.partials = timed("fold", fold_all)
    request = trace.request = timed("reduce", server.reduce, trace.partials)
    live = [i for i in sorted(request.survivors) if i not in drop.before_unmask]
    trace.replies = timed("unmask_replies", each, live, lambda i: clients[i].unmask(request))
    return timed("finish", server.finish, trace.replies)
