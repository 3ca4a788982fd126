"""``aggregator: secagg``: FedAvg whose combiners and controller never see one update.

A round attempt runs four stages (``declare``), each with its own deadline; a client
that misses one is that stage's dropout:

    secagg.advertise   payload: the RoundSetup and the client's index; reply: its keys
    secagg.share       payload: its neighbours' keys; reply: sealed shares for them
    train              payload: the envelopes sent to it; the update is masked
                       (``::masked``, MaskedLayout) and combiners fold it in Z_{2^32}
    secagg.unmask      payload: who survived, who dropped (``RoundState.trained``);
                       reply: one kind of share per neighbour

The controller keeps no protocol state between stages: each decision replays the
attempt's ``SecAggServer`` from the replies in ``RoundState`` (deterministic), so an
attempt that fails leaves nothing behind and a rerun draws fresh keys and seeds. Whether
the round can be unmasked is decided before the unmask stage is asked for anything, and
any ``SecAggError`` fails the attempt (never the session) without revealing a share.

The result is FedAvg's: the ``num_examples``-weighted mean of the clients' deltas
(weights capped at ``max_weight``), each clipped and quantized, added to the round's model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedray.config import SessionConfig
from fedray.errors import AttemptFailed, ConfigError, SecAggError
from fedray.messages import TaskKind
from fedray.strategies.base import Strategy
from fedray.strategies.codecs.coded import spec_of
from fedray.strategies.declaration import (
    MAX_REPLY_BYTES,
    VALIDATE,
    CloseRule,
    Declaration,
    Stage,
)
from fedray.strategies.numeric import Model
from fedray.strategies.secagg import graph, wire
from fedray.strategies.secagg.fold import MaskedFold
from fedray.strategies.secagg.half import ADVERTISE, SHARE, UNMASK, weight_of
from fedray.strategies.secagg.layout import MASKED, MaskedLayout, floating_size, stepped
from fedray.strategies.secagg.messages import (
    Advertise,
    MaskedInput,
    MaskedPartial,
    RoundSetup,
    ShareKeys,
    UnmaskReply,
)
from fedray.strategies.secagg.quantize import RING, Quantizer
from fedray.strategies.secagg.server import SecAggServer
from fedray.strategies.selection import plan_round
from fedray.strategies.snapshots import RoundContext, RoundPlan, RoundState
from fedray.strategies.updates import Accumulator, ShareStart, Update

PARAM = "secagg"  # RoundPlan.params key of the attempt's SecAggRound
HALF = "fedray.strategies.secagg.half:SecAggHalf"
MIN_CLIENTS = 3


@dataclass(frozen=True)
class SecAggRound:
    """An attempt's public parameters, drawn in ``configure``: the setup every party
    agrees on (length 0: sized from the model), and each asked client's index."""

    setup: RoundSetup
    index: Mapping[str, int] = field(default_factory=dict)  # client id -> 1..n

    def ids(self, indices: frozenset[int] | set[int]) -> set[str]:
        return {c for c, i in self.index.items() if i in indices}


@dataclass(frozen=True)
class Unmasked:
    """What ``reduce_round`` hands ``finish``: the survivors' weighted sum, decoded."""

    total: np.ndarray = field(compare=False)  # sum_u w_u * clipped delta_u, float64
    weight: int
    survivors: int


class MaskedSum(Accumulator[MaskedPartial]):
    """A combiner's ring sum of its clients' masked vectors (``MaskedFold``)."""

    def __init__(self, share: ShareStart) -> None:
        r = share.params.get(PARAM)
        if not isinstance(r, SecAggRound):
            raise SecAggError("refused", "the train stage carries no secagg round setup")
        self.round = r
        self.fold_ = MaskedFold(r.setup.sized(floating_size(share.spec)))

    def fold(self, update: Update) -> None:
        index = self.round.index.get(update.meta.client_id)
        if index is None:
            raise SecAggError("refused", f"{update.meta.client_id} is not in this round")
        weight = weight_of(update.meta.num_examples, self.round.setup.max_weight)
        self.fold_.fold(MaskedInput(index, weight, update.model[MASKED]))

    def partial(self) -> MaskedPartial:
        return self.fold_.partial()


class SecAgg(Strategy[MaskedPartial, Unmasked]):
    """Options (``session.secagg``, or ``aggregator_kwargs``): ``clip`` (required: the L2
    norm, or per value with ``clip_mode: coordinate``, each client's delta is clipped to),
    ``quantization_bits`` (16), ``threshold`` (shares that rebuild a secret; default:
    ``graph.plan``'s for ``dropout``), ``dropout`` (the fraction of clients a round must
    survive losing, 0.1), ``max_weight`` (the most examples one update counts for;
    default: as many as the ring has room for, ``max_weight_for``), ``stage_timeout_s``
    (each key stage's deadline)."""

    name = "secagg"
    option_examples: Mapping[str, object] = {"clip": 1.0}

    def __init__(self, clip: float, quantization_bits: int = 16, threshold: int | None = None,
                 dropout: float = 0.1, clip_mode: str = "l2", max_weight: int | None = None,
                 stage_timeout_s: float = 30.0) -> None:
        super().__init__()
        try:
            self.quantizer = Quantizer(clip, quantization_bits, clip_mode)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(
                threshold, int) or threshold < 2):
            raise ValueError(f"secagg threshold must be a whole number >= 2, got {threshold!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) \
                or not 0 <= dropout < 1:
            raise ValueError(f"secagg dropout must be a fraction in [0, 1), got {dropout!r}")
        if max_weight is not None and (isinstance(max_weight, bool) or not isinstance(
                max_weight, int) or max_weight < 1):
            raise ValueError(f"secagg max_weight must be a whole number >= 1, got "
                             f"{max_weight!r}")
        if isinstance(stage_timeout_s, bool) or not isinstance(stage_timeout_s, int | float) \
                or not stage_timeout_s > 0:
            raise ValueError("secagg stage_timeout_s must be a number of seconds > 0")
        self.threshold, self.dropout, self.max_weight = threshold, float(dropout), max_weight
        self.stage_timeout_s = float(stage_timeout_s)

    def declare(self) -> Declaration:
        deadline = self.stage_timeout_s
        stages = (
            Stage(TaskKind.STAGE, ADVERTISE, with_model=False, deadline_s=deadline,
                  max_reply_bytes=256),
            Stage(TaskKind.STAGE, SHARE, with_model=False, deadline_s=deadline,
                  max_reply_bytes=MAX_REPLY_BYTES),
            Stage(TaskKind.TRAIN, close=CloseRule.ALL),
            # however few answer, the server's own check (t shares of every secret) says
            # whether the round unmasks, and why not: the stage itself never fails it
            Stage(TaskKind.STAGE, UNMASK, with_model=False, deadline_s=deadline,
                  max_reply_bytes=MAX_REPLY_BYTES, min_replies=0),
            VALIDATE,
        )
        # three clients at least: two could tell each other's input from their sum
        return Declaration(stages=stages, layout=MaskedLayout(), client_half=HALF,
                           min_updates=MIN_CLIENTS)

    def max_weight_for(self, settings: SessionConfig, clients: int) -> int:
        """The most examples one update counts for in a round of ``clients``: secagg
        max_weight if set, else as many as the ring has room for (``clients x weight x
        (2^bits - 1) < 2^32``), and never over session.max_examples_per_update."""
        if self.max_weight is not None:
            return min(self.max_weight, settings.max_examples_per_update)
        room = (RING - 1) // (self.quantizer.levels * clients)
        if room < 1:
            raise ConfigError(f"secagg.quantization_bits {self.quantizer.bits} leaves no "
                              f"room in the 32-bit sum for {clients} clients: use fewer "
                              "bits, or fewer clients per round")
        return min(room, settings.max_examples_per_update)

    def check_settings(self, settings: SessionConfig) -> None:
        if settings.codec not in ("", "none"):
            raise ValueError("secagg masks its updates itself: set session.codec to none")
        n = max(MIN_CLIENTS, int(settings.clients_per_round) if settings.clients_per_round > 1
                else settings.min_clients)
        try:
            self.quantizer.check_headroom(n * self.max_weight_for(settings, n))
        except ConfigError as exc:
            raise ValueError(f"{exc} (secagg max_weight is the most examples one update "
                             "counts for: lower it, or leave it unset)") from None

    # ----------------------------------------------------------------- decisions

    def configure(self, ctx: RoundContext) -> RoundPlan:
        plan = plan_round(ctx)
        ids = sorted(i for ids in plan.clients.values() for i in ids)
        if len(ids) < MIN_CLIENTS:  # a select policy may ask fewer than min_updates
            raise AttemptFailed(f"secagg needs at least {MIN_CLIENTS} clients in a round, "
                                f"{len(ids)} asked: raise session.min_clients to "
                                f"{MIN_CLIENTS} or more")
        n = len(ids)
        drawn = graph.plan(n, self.dropout)
        threshold = self.threshold or drawn.threshold
        round_id = hashlib.sha256(f"{ctx.session_id}/{ctx.round}/{ctx.attempt}/".encode()
                                  + os.urandom(16)).digest()[:16]
        try:
            setup = RoundSetup(round_id, os.urandom(32), tuple(range(1, n + 1)),
                               drawn.degree, threshold, self.quantizer, 0,
                               self.max_weight_for(ctx.settings, n))
        except ValueError as exc:
            raise ConfigError(f"secagg threshold {threshold} cannot work for a round of "
                              f"{n} clients (each with {min(drawn.degree, n - 1)} "
                              f"neighbours): {exc}; leave secagg threshold unset to have it "
                              "planned") from None
        return RoundPlan(clients=plan.clients, config=plan.config,
                         params={**plan.params, PARAM: SecAggRound(
                             setup, {c: i + 1 for i, c in enumerate(ids)})})

    def plan_stage(self, stage: Stage, state: RoundState) -> RoundPlan:
        plan = super().plan_stage(stage, state)
        if stage.name not in (ADVERTISE, SHARE, TaskKind.TRAIN.value, UNMASK):
            return plan
        r = state.plan.params[PARAM]
        asked = [c for ids in plan.clients.values() for c in ids]
        try:
            if stage.name == ADVERTISE:
                payloads = {c: wire.write_setup(r.setup, r.index[c]) for c in asked}
            elif stage.name == SHARE:
                roster = _replay(r, state, SHARE)[1].keys
                payloads = {}
                for c in asked:
                    near = r.setup.neighbours[r.index[c]] | {r.index[c]}
                    payloads[c] = wire.write_roster(r.setup.round_id, {
                        v: k for v, k in roster.items() if v in near})
            elif stage.name == TaskKind.TRAIN.value:
                inboxes = _replay(r, state, TaskKind.TRAIN.value)[1]
                plan = plan.only(r.ids(set(inboxes)))
                payloads = {c: wire.write_inbox(r.setup.round_id, inboxes[r.index[c]])
                            for ids in plan.clients.values() for c in ids}
                return RoundPlan(clients=plan.clients, config=plan.config,
                                 params=plan.params, payloads=payloads)
            else:
                server = _replay(r, state, UNMASK)[0]
                trained = state.trained_ids or frozenset()
                request = server.request(frozenset(r.index[c] for c in trained
                                                   if c in r.index))
                payload = wire.write_request(r.setup.round_id, request)
                payloads = {c: payload for c in asked}
        except SecAggError as exc:
            raise AttemptFailed(f"stage {stage.name}: {exc}") from None
        return RoundPlan(clients=plan.clients, config=plan.config, payloads=payloads)

    # ----------------------------------------------------------------- math

    def start(self, share: ShareStart) -> Accumulator[MaskedPartial]:
        return MaskedSum(share)

    def reduce(self, partials: Sequence[MaskedPartial]) -> Unmasked:
        raise SecAggError("refused", "a masked sum is unmasked with the round's stages: "
                          "secagg runs in synchronous rounds only")

    def reduce_round(self, partials: Sequence[MaskedPartial], state: RoundState) -> Unmasked:
        r: SecAggRound = state.plan.params[PARAM]
        if not partials:
            raise SecAggError("too_few_survivors", "no combiner holds a masked input")
        size = partials[0].total.size
        server, _ = _replay(r, state, UNMASK, r.setup.sized(size))
        senders = frozenset().union(*(p.senders for p in partials))
        asked = frozenset(r.index[c] for c in state.trained_ids or () if c in r.index)
        if senders != asked:
            raise SecAggError("refused", "the partials hold other inputs than the unmask "
                              "stage asked about: nothing is unmasked")
        server.reduce(partials)
        replies = []
        for c, reply in state.replies.get(UNMASK, {}).items():
            if c in r.index:
                try:
                    selfs, keys_ = wire.read_unmask(reply.payload)
                except SecAggError:
                    continue  # a malformed reply counts as none
                replies.append(UnmaskReply(r.index[c], selfs, keys_))
        aggregate = server.finish(replies)
        return Unmasked(aggregate.values(server.setup), aggregate.weight,
                        len(aggregate.survivors))

    def finish(self, global_model: Mapping[str, np.ndarray], reduced: Unmasked) -> Model:
        if reduced.total.size != floating_size(spec_of(global_model)):
            raise SecAggError("refused", "the unmasked sum is not the model's size")
        return stepped(global_model, reduced.total / reduced.weight)


def _replay(r: SecAggRound, state: RoundState, upto: str, setup: RoundSetup | None = None,
            ) -> tuple[SecAggServer, object]:
    """The attempt's server, replayed from the replies so far up to stage ``upto``: with
    the roster (SHARE), the inboxes (TRAIN), or ready to reduce (UNMASK). A reply that
    does not parse is a dropout."""
    server = SecAggServer(setup or r.setup)
    adverts = []
    for c, reply in state.replies.get(ADVERTISE, {}).items():
        if c in r.index:
            try:
                adverts.append(Advertise(r.index[c], *wire.read_advertise(reply.payload)))
            except SecAggError:
                continue
    roster = server.roster(adverts)
    if upto == SHARE:
        return server, roster
    shares = []
    for c, reply in state.replies.get(SHARE, {}).items():
        if c in r.index:
            try:
                shares.append(ShareKeys(r.index[c], wire.read_shares(reply.payload,
                                                                     r.index[c])))
            except SecAggError:
                continue
    inboxes = server.route(shares)
    return server, inboxes
