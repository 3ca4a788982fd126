"""What a strategy's math works on: checked updates, accumulators and their partials.

A combiner starts one ``Accumulator`` per share of a round (``Strategy.start``), folds
every accepted ``Update`` into it and hands its ``partial`` to the controller. A partial
is whatever the strategy needs to be exact across combiners: weighted sums for FedAvg
(they add up), or ``KeptUpdates`` for median or Krum (which do not decompose, so combiners
hand each accepted update up by reference and the controller sees them all).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from fedray.strategies.numeric import BlockwiseModel, Spec
from fedray.strategies.snapshots import UpdateMeta

Buffer = bytes | bytearray | memoryview | np.ndarray

P = TypeVar("P")  # a strategy's partial


@dataclass(frozen=True, slots=True)
class Update:
    """A checked update: read-only views into ``raw``, the safetensors bytes received."""

    model: Mapping[str, np.ndarray]
    meta: UpdateMeta
    raw: Buffer

    def payload(self) -> Buffer:
        """The update's bytes in the global model's names: ``raw``, or for an encoded update
        (``session.codec``) the model it stands for, decoded (what robust rules read)."""
        if isinstance(self.model, BlockwiseModel):
            return self.model.payload()
        return self.raw


Keeper = Callable[[Buffer], Any]  # keeps an update's bytes; returns a handle for the controller


@dataclass(frozen=True)
class ShareStart:
    """Everything an accumulator may use; built by the combiner (or the controller)."""

    spec: Spec  # the global model's names, dtypes and shapes
    base: Mapping[str, np.ndarray]  # the model this share's updates were trained from
    params: Mapping[str, Any] = field(default_factory=dict)  # RoundPlan.params
    keep: Keeper = bytes  # combiners keep updates in Ray's object store
    # Asynchronously, updates start from different versions: the model of each.
    base_of: Callable[[int], Mapping[str, np.ndarray]] | None = None
    # A bound on num_examples x |update - base| for every value of an accepted update (the
    # norm bound times session.max_examples_per_update), None when there is none: under
    # it, sums of deltas cannot overflow float32 (``fedavg.WeightedSum``).
    max_term: float | None = None


@dataclass
class Kept:
    """One update a combiner kept for the controller: its metadata and a handle to it."""

    meta: UpdateMeta
    handle: Any
    model: Mapping[str, np.ndarray] | None = None  # resolved on the controller before reduce


@dataclass
class KeptUpdates:
    """The partial of strategies that need every update (median, Krum, FedBuff...)."""

    items: list[Kept] = field(default_factory=list)


class Accumulator(ABC, Generic[P]):
    @abstractmethod
    def fold(self, update: Update) -> None:
        """Take one accepted update; it may be dropped (or kept by handle) afterwards."""

    @abstractmethod
    def partial(self) -> P:
        """What this share hands to the controller (picklable)."""


class KeepAll(Accumulator[KeptUpdates]):
    """Keeps every accepted update by handle: the memory lives in the object store."""

    def __init__(self, share: ShareStart) -> None:
        self.share = share
        self.kept = KeptUpdates()

    def fold(self, update: Update) -> None:
        self.kept.items.append(Kept(update.meta, self.share.keep(update.payload())))

    def partial(self) -> KeptUpdates:
        return self.kept
