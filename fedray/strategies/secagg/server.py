"""The controller's side of SecAgg+: relay the keys and envelopes, reduce the combiners'
partials, and unmask the total, and only the total.

    roster(adverts) -> Roster               who advertised, with their public keys
    route(shares) -> {index: Inbox}         each envelope to its receiver, if both shared
    reduce(partials) -> UnmaskRequest       the ring sum across combiners; who survived
                                            (sent an input) and who dropped after sharing
    finish(replies) -> Aggregate            the survivors' sum: their self-masks and the
                                            dropped clients' pairwise masks taken away

Whether the round can be unmasked is decided before anything is asked or taken away:
every survivor and every dropped client must have at least ``threshold`` holders of its
shares among the survivors (``reduce``) and as many shares must have arrived
(``finish``); otherwise the round fails with a SecAggError, the masked sum is dropped,
and no partial unmasking ever happens.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedray.errors import SecAggError
from fedray.strategies.secagg import keys, masks, shamir
from fedray.strategies.secagg.messages import (
    Advertise,
    Envelope,
    Inbox,
    MaskedPartial,
    Roster,
    RoundSetup,
    ShareKeys,
    UnmaskReply,
    UnmaskRequest,
)


class Phase(enum.Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED = "masked"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Aggregate:
    """The survivors' ring sum (``sum w_u * q_u`` mod 2^32), whose and of what weight."""

    total: np.ndarray = field(compare=False)
    survivors: frozenset[int]
    weight: int

    def values(self, setup: RoundSetup) -> np.ndarray:
        """The sum of the survivors' weighted, clipped updates (float64)."""
        return setup.quantizer.decode_sum(self.total, self.weight)


class SecAggServer:
    """One round on the controller; combiners only fold (``fold.MaskedFold``)."""

    def __init__(self, setup: RoundSetup) -> None:
        self.setup = setup
        self.phase = Phase.ADVERTISE
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._delivered: dict[int, frozenset[int]] = {}  # sender -> who got its envelopes
        self._total: np.ndarray | None = None
        self._survivors: frozenset[int] = frozenset()
        self._dropped: frozenset[int] = frozenset()
        self._weight = 0

    def _step(self, expected: Phase, then: Phase) -> None:
        if self.phase is not expected:
            raise SecAggError("refused", f"the round is at {self.phase.value}, not "
                              f"{expected.value}")
        self.phase = then

    def _fail(self, reason: str, detail: str) -> SecAggError:
        self.phase, self._total = Phase.FAILED, None  # the masked sum is never unmasked
        return SecAggError(reason, detail)

    def _enough(self, count: int, stage: str) -> None:
        if count < self.setup.threshold + 1:
            raise self._fail("too_few_survivors", f"{count} clients {stage}; at least "
                             f"{self.setup.threshold + 1} are needed (threshold + 1): the "
                             "round fails and nothing is revealed")

    def roster(self, adverts: Sequence[Advertise]) -> Roster:
        self._step(Phase.ADVERTISE, Phase.SHARE)
        for a in adverts:
            if a.sender not in self.setup.clients or a.sender in self._keys:
                continue  # not asked this round, or a second advert: the first stands
            if len(a.c_public) == len(a.s_public) == keys.KEY_BYTES:
                self._keys[a.sender] = (a.c_public, a.s_public)
        self._enough(len(self._keys), "advertised keys")
        return Roster(dict(self._keys))

    def route(self, shares: Sequence[ShareKeys]) -> dict[int, Inbox]:
        """Envelopes between clients that both shared keys, each to its receiver."""
        self._step(Phase.SHARE, Phase.MASKED)
        by_sender = {}
        for s in shares:
            if s.sender in self._keys and s.sender not in by_sender:
                by_sender[s.sender] = s
        self._enough(len(by_sender), "shared keys")
        graph = self.setup.neighbours
        sent: dict[tuple[int, int], Envelope] = {}
        for u, s in by_sender.items():
            for e in s.envelopes:
                if e.sender == u and e.receiver in by_sender and e.receiver in graph[u]:
                    sent.setdefault((u, e.receiver), e)
        # a pair's envelopes go through both ways or not at all, so both mask or neither
        inboxes: dict[int, list] = {u: [] for u in by_sender}
        delivered: dict[int, set[int]] = {u: set() for u in by_sender}
        for (u, v), e in sent.items():
            if (v, u) in sent:
                inboxes[v].append(e)
                delivered[u].add(v)
        self._delivered = {u: frozenset(vs) for u, vs in delivered.items()}
        return {v: Inbox(v, tuple(es)) for v, es in inboxes.items()}

    def reduce(self, partials: Sequence[MaskedPartial]) -> UnmaskRequest:
        """The ring sum of the combiners' partials, and what to ask the survivors."""
        self._step(Phase.MASKED, Phase.UNMASK)
        total = np.zeros(self.setup.length, np.uint32)
        survivors: set[int] = set()
        for p in partials:
            if p.senders & survivors or not p.senders <= self._delivered.keys() \
                    or p.total.shape != total.shape:
                raise self._fail("refused", "a partial holds an input twice, one of a client "
                                 "that never shared keys, or a sum of another length: it "
                                 "cannot be unmasked")
            np.add(total, p.total, out=total)
            survivors |= p.senders
            self._weight += p.weight
        request = self._request(frozenset(survivors))
        self._total = total
        return request

    def request(self, survivors: frozenset[int]) -> UnmaskRequest:
        """What to ask the survivors, from who they are alone (the runtime plans the unmask
        stage before the partials' sums reach the controller); the same checks as
        ``reduce``, and a round that cannot be unmasked fails here, before anything is
        asked."""
        self._step(Phase.MASKED, Phase.UNMASK)
        if not survivors <= self._delivered.keys():
            raise self._fail("refused", "an input of a client that never shared keys cannot "
                             "be unmasked")
        return self._request(frozenset(survivors))

    def _request(self, survivors: frozenset[int]) -> UnmaskRequest:
        self._survivors = survivors
        self._dropped = frozenset(self._delivered) - self._survivors
        short = {v: n for v in self._delivered
                 if (n := len(self._delivered[v] & self._survivors)) < self.setup.threshold}
        if len(survivors) < self.setup.threshold or short:
            worst = ", ".join(f"{v}: {n}" for v, n in sorted(short.items())[:5])
            raise self._fail("too_few_survivors", f"{len(survivors)} clients sent masked "
                             f"inputs; each needs {self.setup.threshold} of its neighbours to "
                             f"survive ({worst or 'too few in all'}): no share is asked for, "
                             "nothing is revealed")
        return UnmaskRequest(self._survivors, self._dropped)

    def _collect(self, replies: Sequence[UnmaskReply]) -> dict[int, list[shamir.Share]]:
        """Shares by the client they are of: self-mask seeds of survivors, mask keys of
        the dropped, each from a holder that survived (anything else is ignored)."""
        got: dict[int, list[shamir.Share]] = {v: [] for v in self._delivered}
        answered = set()
        for r in replies:
            if r.sender not in self._survivors or r.sender in answered:
                continue
            answered.add(r.sender)
            for wanted, given in ((self._survivors, r.self_shares),
                                  (self._dropped, r.key_shares)):
                for v, data in given.items():
                    if v in wanted and r.sender in self._delivered[v]:
                        share = shamir.Share.from_bytes(data)
                        if share.x != r.sender:
                            raise self._fail("malformed_share", f"client {r.sender} sent a "
                                             f"share of {v} at point {share.x}")
                        got[v].append(share)
        return got

    def finish(self, replies: Sequence[UnmaskReply]) -> Aggregate:
        self._step(Phase.UNMASK, Phase.DONE)
        if self._total is None:  # cannot happen after reduce; never unmask a missing sum
            raise self._fail("refused", "no reduced sum to unmask")
        got = self._collect(replies)
        t = self.setup.threshold
        short = sorted(v for v, shares in got.items() if len(shares) < t)
        if short:
            raise self._fail("too_few_shares", f"clients {short[:5]} have fewer than {t} "
                             "shares back from survivors: the round fails unmasked")
        try:  # every secret first: a bad one fails the round before any mask is removed
            seeds = {v: shamir.reconstruct(got[v], t) for v in self._survivors}
            private = {v: shamir.reconstruct(got[v], t) for v in self._dropped}
        except SecAggError as exc:
            raise self._fail(exc.reason, exc.detail) from None
        for v, key in private.items():
            if keys.public_of(key) != self._keys[v][1]:
                raise self._fail("malformed_share", f"client {v}'s rebuilt mask key is not "
                                 "the one it advertised: a share was altered")
        total, self._total = self._total, None
        scratch = np.empty(total.size, np.uint32)
        for seed in seeds.values():
            masks.apply(total, seed, -1, scratch)
        for v, key in private.items():
            for w in self._delivered[v] & self._survivors:
                seed = keys.pair_seed(key, self._keys[w][1], self.setup.round_id, v, w)
                masks.apply(total, seed, -masks.sign(w, v), scratch)
        return Aggregate(total, self._survivors, self._weight)
