"""SecAgg+'s client half: what an edge client runs for a session of ``aggregator: secagg``.

One ``SecAggClient`` per round attempt (keyed by the round id every payload starts
with), kept between the attempt's tasks: the advertise task sets it up, the share task
seals its shares to its neighbours, the train task's update is masked (its weighted,
clipped, quantized delta from the round's model, plus the masks, as ``::masked``), and
the unmask task reveals one kind of share per neighbour. A payload of a round this client
did not set up, or any step out of order, fails the task: the controller counts the
client as a dropout of that round, and nothing is revealed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from fedray.errors import SecAggError
from fedray.messages import Task
from fedray.strategies.client_half import ClientHalf
from fedray.strategies.secagg import wire
from fedray.strategies.secagg.client import SecAggClient
from fedray.strategies.secagg.layout import MASKED, flat_delta

ADVERTISE, SHARE, UNMASK = "secagg.advertise", "secagg.share", "secagg.unmask"
KEPT_ROUNDS = 4  # attempts kept at once (a rerun sets up a fresh one)


def weight_of(num_examples: int, max_weight: int) -> int:
    """The integer weight an update is masked with, and folded with: its examples, up to
    the round's ``max_weight`` (the same rule on the client and on the combiner)."""
    return max(1, min(int(num_examples), int(max_weight)))


class SecAggHalf(ClientHalf):
    def __init__(self) -> None:
        self._rounds: OrderedDict[bytes, SecAggClient] = OrderedDict()

    def _client(self, round_id: bytes) -> SecAggClient:
        client = self._rounds.get(round_id)
        if client is None:
            raise SecAggError("refused", "this client did not set up the round the task is "
                              "for (it restarted, or missed the advertise stage): it sits "
                              "this round out")
        return client

    def run_stage(self, task: Task, model: Mapping[str, np.ndarray] | None) -> bytes:
        if task.stage == ADVERTISE:
            setup, index = wire.read_setup(task.payload)
            client = SecAggClient(setup, index)
            self._rounds[setup.round_id] = client
            while len(self._rounds) > KEPT_ROUNDS:
                self._rounds.popitem(last=False)
            advert = client.advertise()
            return wire.write_advertise(advert.c_public, advert.s_public)
        if task.stage == SHARE:
            round_id, roster = wire.read_roster(task.payload)
            return wire.write_shares(self._client(round_id).share_keys(roster).envelopes)
        if task.stage == UNMASK:
            round_id, request = wire.read_request(task.payload)
            client = self._client(round_id)
            reply = client.unmask(request)
            del self._rounds[round_id]  # answered once: nothing of it is needed again
            return wire.write_unmask(reply.self_shares, reply.key_shares)
        raise SecAggError("refused", f"secagg has no stage {task.stage!r}")

    def encode_update(self, task: Task, update: Mapping[str, np.ndarray],
                      base: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        raise SecAggError("refused", "a masked update is weighted by its examples: the edge "
                          "calls encode_trained (upgrade fedray on this client)")

    def encode_trained(self, task: Task, update: Mapping[str, np.ndarray],
                       base: Mapping[str, np.ndarray], num_examples: int,
                       ) -> Mapping[str, np.ndarray]:
        round_id, inbox = wire.read_inbox(task.payload)
        client = self._client(round_id)
        weight = weight_of(num_examples, client.setup.max_weight)
        masked = client.masked_input(inbox, flat_delta(update, base), weight)
        return {MASKED: masked.vector}
