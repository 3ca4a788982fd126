"""A client's side of a SecAgg+ round: a state machine over the four stages.

Each call takes what the server sent and returns what the client sends back; any step
out of order, or a message that is not for this client, is a SecAggError and the client
is out of the round (the server handles it as a dropout). The one rule that keeps the
input hidden is enforced here, not trusted to the server: for each neighbour, the
client reveals either the share of its self-mask seed (it survived) or the share of its
mask key (it dropped), never both, and answers one unmask request only.
"""

from __future__ import annotations

import enum
import os

import numpy as np

from fedray.errors import SecAggError
from fedray.strategies.secagg import keys, masks, shamir
from fedray.strategies.secagg.messages import (
    Advertise,
    Envelope,
    Inbox,
    MaskedInput,
    Roster,
    RoundSetup,
    ShareKeys,
    UnmaskReply,
    UnmaskRequest,
)

SHARE_BYTES = len(shamir.split(bytes(32), 1, [1])[1].to_bytes())  # of a 32-byte secret


class Phase(enum.Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"  # answered the unmask request
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in (Phase.DONE, Phase.ABORTED)


class SecAggClient:
    """One client in one round: ``index`` is its place in ``setup.clients``."""

    def __init__(self, setup: RoundSetup, index: int) -> None:
        if index not in setup.clients:
            raise ValueError(f"client {index} is not in this round's cohort")
        self.setup, self.index = setup, index
        self.phase = Phase.NEW
        self._c = keys.KeyPair.generate()
        self._s = keys.KeyPair.generate()
        self._self_seed = os.urandom(keys.KEY_BYTES)
        self._roster: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}  # sender -> (self share, key share)

    def _step(self, expected: Phase, then: Phase) -> None:
        if self.phase is not expected:
            raise SecAggError("refused", f"client {self.index} is {self.phase.value}, not "
                              f"{expected.value}: a stage came out of order")
        self.phase = then

    def _abort(self, reason: str, detail: str) -> SecAggError:
        self.phase = Phase.ABORTED
        return SecAggError(reason, f"client {self.index}: {detail}")

    def advertise(self) -> Advertise:
        self._step(Phase.NEW, Phase.ADVERTISED)
        return Advertise(self.index, self._c.public, self._s.public)

    def share_keys(self, roster: Roster) -> ShareKeys:
        """Shares of the self-mask seed and of the mask key, one sealed envelope per
        neighbour that advertised."""
        self._step(Phase.ADVERTISED, Phase.SHARED)
        if roster.keys.get(self.index) != (self._c.public, self._s.public):
            raise self._abort("refused", "the roster does not carry this client's own keys")
        peers = sorted(self.setup.neighbours[self.index] & roster.keys.keys())
        t = self.setup.threshold
        if len(peers) < t:
            raise self._abort("too_few_survivors", f"{len(peers)} neighbours advertised, "
                              f"{t} are needed to hold its shares")
        self._roster = {v: roster.keys[v] for v in peers}
        seed_shares = shamir.split(self._self_seed, t, peers)
        key_shares = shamir.split(self._s.private, t, peers)
        envelopes = []
        for v in peers:
            body = (self.index.to_bytes(4, "big") + v.to_bytes(4, "big")
                    + seed_shares[v].to_bytes() + key_shares[v].to_bytes())
            key = keys.channel_key(self._c.private, self._roster[v][0], self.setup.round_id,
                                   self.index, v)
            envelopes.append(Envelope(self.index, v, keys.seal(
                key, self.setup.round_id, self.index, v, body)))
        return ShareKeys(self.index, tuple(envelopes))

    def _open(self, envelope: Envelope) -> tuple[bytes, bytes]:
        v = envelope.sender
        if envelope.receiver != self.index or v not in self._roster:
            raise self._abort("refused", f"an envelope from {v} to {envelope.receiver} is "
                              "not from a neighbour to this client")
        key = keys.channel_key(self._c.private, self._roster[v][0], self.setup.round_id,
                               self.index, v)
        try:
            body = keys.unseal(key, self.setup.round_id, v, self.index, envelope.sealed)
        except SecAggError as exc:
            raise self._abort(exc.reason, exc.detail) from None
        if len(body) != 8 + 2 * SHARE_BYTES or body[:4] != v.to_bytes(4, "big") \
                or body[4:8] != self.index.to_bytes(4, "big"):
            raise self._abort("malformed_share", f"the envelope from {v} does not hold its "
                              "shares for this client")
        return body[8 : 8 + SHARE_BYTES], body[8 + SHARE_BYTES :]

    def masked_input(self, inbox: Inbox, update: np.ndarray, weight: int = 1) -> MaskedInput:
        """The clipped, quantized ``update`` plus the self-mask and a pairwise mask with
        every neighbour whose shares arrived (exactly those that will mask with it)."""
        self._step(Phase.SHARED, Phase.MASKED)
        if inbox.receiver != self.index:
            raise self._abort("refused", f"the inbox is client {inbox.receiver}'s")
        senders = [e.sender for e in inbox.envelopes]
        if len(set(senders)) != len(senders):
            raise self._abort("duplicate_share", "two envelopes from the same neighbour")
        held = {e.sender: self._open(e) for e in inbox.envelopes}
        if len(held) < self.setup.threshold:
            raise self._abort("too_few_survivors", f"{len(held)} neighbours shared keys, "
                              f"{self.setup.threshold} are needed")
        if weight > self.setup.max_weight:
            raise self._abort("refused", f"weight {weight} is over the round's "
                              f"{self.setup.max_weight}")
        values = np.asarray(update).reshape(-1)
        if not self.setup.length and values.size:  # drawn before the model was at hand
            self.setup = self.setup.sized(values.size)
        if values.size != self.setup.length:
            raise self._abort("refused", f"the update has {values.size} values, the round "
                              f"masks {self.setup.length}")
        self._held = held
        quantized = self.setup.quantizer.encode(values, weight)
        seeds = {v: keys.pair_seed(self._s.private, self._roster[v][1], self.setup.round_id,
                                   self.index, v) for v in held}
        return MaskedInput(self.index, weight, masks.masked(quantized, self.index,
                                                            self._self_seed, seeds))

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """For each neighbour it holds shares of: the self-mask seed's share if it
        survived, the mask key's share if it dropped; nothing else, and only once."""
        self._step(Phase.MASKED, Phase.DONE)
        if self.index not in request.survivors:
            raise self._abort("refused", "the request names this client, which sent its "
                              "input, as dropped or absent")
        if len(request.survivors) < self.setup.threshold:
            raise self._abort("too_few_survivors", f"{len(request.survivors)} survivors, "
                              f"{self.setup.threshold} needed: nothing is revealed")
        selfs = {v: s for v, (s, _) in self._held.items() if v in request.survivors}
        dropped = {v: k for v, (_, k) in self._held.items() if v in request.dropped}
        return UnmaskReply(self.index, selfs, dropped)
