"""The edge side of a strategy: code a client runs between fedray and the user's own.

A strategy names its half in ``Declaration.client_half`` (``package.module:Class``); each
task of its sessions carries that name, and the edge imports the module (built-in halves
under ``fedray.`` always, any other only when the client allows it: ``fedray edge start
--allow-client-half MODULE``), makes one instance per session, and calls:

    receive(task, model) -> Model       every task, once its model (None for a stage
                                        without one) has arrived: keep what later stages
                                        need (keys, the round's settings, ``task.payload``)
                                        and return the model the user's code gets (the one
                                        sent, or one the half rebuilds, e.g. from a delta)
    encode_update(task, update, base)   a train task's update, before it is sent: encode,
        -> Model                        clip, add noise, mask. What it returns must fit the
                                        strategy's declared ``UpdateLayout``
    encode_trained(task, update, base,  what the edge calls: ``encode_update``, unless the
        num_examples) -> Model          half weighs the update itself by the examples the
                                        user's train reported (secure aggregation masks
                                        ``num_examples x update``)
    run_stage(task, model)              a task of kind STAGE (a stage of the strategy's
        -> bytes                        own): the reply, at most the stage's max_reply_bytes

A half never imports server code (Ray, pymongo, ``fedray.actors``): it runs on edge
machines that install only ``pip install fedray``. An exception it raises fails that
task on that client, reported to the combiner like any failed task.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedray.messages import Task


class ClientHalf:
    """Subclass it and override what your strategy needs; the defaults change nothing."""

    def receive(self, task: Task, model: Mapping[str, np.ndarray] | None,
                ) -> Mapping[str, np.ndarray] | None:
        """A task arrived with ``model`` (read-only views; None when the task sends none):
        the model the user's code (and ``run_stage``) gets. Return ``model`` itself to
        change nothing."""
        return model

    def encode_update(self, task: Task, update: Mapping[str, np.ndarray],
                      base: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """The update to send for ``task``: ``update`` is what the user's train returned,
        ``base`` the model it was trained from (both read-only)."""
        return update

    def encode_trained(self, task: Task, update: Mapping[str, np.ndarray],
                       base: Mapping[str, np.ndarray], num_examples: int,
                       ) -> Mapping[str, np.ndarray]:
        """``encode_update``, with the ``num_examples`` the user's train reported (the
        header sent with the update carries the same number)."""
        return self.encode_update(task, update, base)

    def run_stage(self, task: Task, model: Mapping[str, np.ndarray] | None) -> bytes:
        """The reply to a task of kind STAGE (``task.stage`` names it; ``model`` is the
        round's model when the stage sends one)."""
        raise NotImplementedError(f"{type(self).__name__} does not answer stage "
                                  f"{task.stage!r}")
