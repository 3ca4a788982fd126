"""What a strategy declares the runtime must do for it, in one typed value.

The runtime reads ``Strategy.declare()`` once per session and never tests a strategy's
class for flags::

    Declaration
    ├── stages          the round's steps, in order: train, validate, and stages of the
    │                   strategy's own (a survey, a key exchange), each a task kind with
    │                   its deadline, close rule and the fewest replies it can go on with
    ├── layout          what intake checks an update against: by default the global
    │                   model's names, dtypes and shapes, finite values, and the norm
    ├── keeps_updates   partials hold every update (bounded by session.max_kept_updates)
    ├── min_updates     the fewest updates a round can be aggregated from (Krum: 2f + 3);
    │                   rounds wait for, ask and need at least that many, or min_clients
    ├── asynchronous    None for rounds; FedBuff-style serving names how stale an update
    │                   may be (the runtime keeps that many model versions)
    └── client_half     "package.module:Class": the ClientHalf the edge runs on each task
                        and update (encode, clip, add noise, mask; a stage's own replies)

Stages before the commit run on the round's model, in order, each over the clients that
answered every stage before it; the train stage folds updates, the others collect
``Reply`` values that ``Strategy.plan_stage`` and ``Strategy.reduce_round`` read. Stages
after the commit (validation) run on the new model and never undo it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedray.messages import TaskKind
from fedray.strategies.numeric import Spec

STAGE_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
CLIENT_HALF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
MAX_REPLY_BYTES = 1 << 20  # a stage reply travels in one gRPC message (4 MiB at most)


class When(enum.StrEnum):
    ROUND = "round"  # before the commit, on the round's model
    COMMITTED = "committed"  # after the commit, on the new model (validation)


class CloseRule(enum.StrEnum):
    ALL = "all"  # every asked client answered (or went offline), or the deadline passed
    FIRST_K = "first_k"  # as ALL, or on the round's first session.buffer_size replies


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of a round: a task every asked client runs, and how the step ends.

    ``kind`` is what the client runs: TRAIN (the user's train, then the client half's
    ``encode_update``), VALIDATE (the user's validate: metrics), or STAGE (the client
    half's ``run_stage``, which returns bytes). ``deadline_s`` defaults to
    ``session.round_timeout_s``; ``min_replies`` to ``session.min_clients`` before the
    commit and 0 after it: with fewer replies the attempt fails (and runs again).
    """

    kind: TaskKind
    name: str = ""  # unique in a declaration; defaults to the kind ("train", "validate")
    when: When = When.ROUND
    with_model: bool = True  # a STAGE task sends the round's model too (TRAIN/VALIDATE do)
    deadline_s: float | None = None
    close: CloseRule | None = None  # default: FIRST_K for train, ALL for the others
    min_replies: int | None = None
    max_reply_bytes: int = 64 * 1024  # of one client's STAGE reply

    def __post_init__(self) -> None:
        kind = TaskKind(self.kind)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "name", self.name or kind.value)
        if self.close is None:
            object.__setattr__(self, "close", CloseRule.FIRST_K if kind is TaskKind.TRAIN
                               else CloseRule.ALL)
        if not STAGE_NAME.fullmatch(self.name):
            raise ValueError(f"stage name {self.name!r}: 1-64 lowercase letters, digits, "
                             "'_', '.' or '-', starting with a letter")
        if kind is TaskKind.TRAIN and When(self.when) is not When.ROUND:
            raise ValueError("the train stage runs before the commit (When.ROUND)")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"stage {self.name}: deadline_s must be > 0")
        if self.min_replies is not None and self.min_replies < 0:
            raise ValueError(f"stage {self.name}: min_replies must be >= 0")
        if not 0 < self.max_reply_bytes <= MAX_REPLY_BYTES:
            raise ValueError(f"stage {self.name}: max_reply_bytes must be 1..{MAX_REPLY_BYTES}")

    @property
    def sends_model(self) -> bool:
        return self.kind is not TaskKind.STAGE or self.with_model

    def least(self, min_clients: int) -> int:
        """The fewest replies this stage can go on with."""
        if self.min_replies is not None:
            return self.min_replies
        return min_clients if self.when is When.ROUND else 0


TRAIN = Stage(TaskKind.TRAIN)
VALIDATE = Stage(TaskKind.VALIDATE, when=When.COMMITTED)


class NormCheck(enum.StrEnum):
    OFF = "off"  # not defined for this layout (encoded, masked): max_update_norm cannot apply
    # checked against a bound when one is set (max_update_norm, _ratio); UpdateMeta.norm
    # is exact only where a cheap upper bound could not settle it, else None
    WHEN_LIMITED = "when_limited"
    ALWAYS = "always"  # computed for every update: accept and fold read UpdateMeta.norm


@dataclass(frozen=True)
class UpdateLayout:
    """What intake checks an update against before it is folded.

    ``expected`` maps the global model's spec to the spec an update must have: the same
    by default; a codec (int8 blocks with their scales) or a masked update (ring elements)
    subclasses it. ``finite`` asks that floating values be finite and small enough that
    weighting them cannot overflow the sums; ``norm`` says when ``||update - base||`` is
    computed (it needs the update in the base model's names and shapes).
    """

    finite: bool = True
    norm: NormCheck = NormCheck.WHEN_LIMITED

    def expected(self, model: Spec) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {name: (dtype, tuple(shape)) for name, (dtype, shape) in model.items()}

    def view(self, model: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
             ) -> Mapping[str, np.ndarray]:
        """What the strategy folds, from the checked tensors (``expected``'s names) and the
        update's base model: the tensors themselves by default; an encoded layout
        returns a view that decodes (``codecs.coded.CodedModel``)."""
        return model


@dataclass(frozen=True, slots=True)
class Asynchronous:
    """FedBuff-style serving: no rounds; clients train on the newest version, and an
    update may lag up to ``max_staleness`` versions (the runtime keeps that many)."""

    max_staleness: int

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")


@dataclass(frozen=True)
class Declaration:
    """Everything the runtime does for one strategy, decided once per session."""

    stages: tuple[Stage, ...] = (TRAIN, VALIDATE)
    layout: UpdateLayout = field(default_factory=UpdateLayout)
    keeps_updates: bool = False
    asynchronous: Asynchronous | None = None
    client_half: str = ""
    min_updates: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.min_updates, bool) or not isinstance(self.min_updates, int) \
                or self.min_updates < 1:
            raise ValueError(f"min_updates must be a whole number >= 1, got {self.min_updates!r}")
        stages = tuple(self.stages)
        object.__setattr__(self, "stages", stages)
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        trains = [s for s in stages if s.kind is TaskKind.TRAIN]
        if len(trains) != 1:
            raise ValueError(f"a round has exactly one train stage, got {len(trains)}")
        order = [s.when for s in stages]
        if order != sorted(order, key=list(When).index):
            raise ValueError("stages after the commit come after every stage before it")
        if self.asynchronous is not None and self.before_commit != (trains[0],):
            raise ValueError("an asynchronous strategy has no stages before the commit but "
                             "train (its versions commit as updates arrive)")
        if self.client_half and not CLIENT_HALF.fullmatch(self.client_half):
            raise ValueError(f"client_half {self.client_half!r} must be package.module:Class")
        if any(s.kind is TaskKind.STAGE for s in stages) and not self.client_half:
            raise ValueError("a stage of kind STAGE is answered by a client half: name one")

    @property
    def train(self) -> Stage:
        return next(s for s in self.stages if s.kind is TaskKind.TRAIN)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r}; declared: {[s.name for s in self.stages]}")

    @property
    def before_commit(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.when is When.ROUND)

    @property
    def after_commit(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.when is When.COMMITTED)
