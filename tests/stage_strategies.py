"""Strategies (and their client halves) that exercise the contract's stages in tests:
a stage of kind STAGE answered by a client half, an update the half transforms, and a
reduction that reads what an earlier stage replied."""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from fedray.messages import Task, TaskKind
from fedray.strategies import (
    TRAIN,
    VALIDATE,
    ClientHalf,
    Declaration,
    RoundPlan,
    RoundState,
    Stage,
)
from fedray.strategies.fedavg import FedAvg

SURVEY = Stage(TaskKind.STAGE, name="survey", with_model=False, max_reply_bytes=256)


class SurveyHalf(ClientHalf):
    """Answers the survey with the nonce it was sent and how many tasks it saw; adds 1 to
    every update it sends (so a test can see that the half ran on the edge)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def receive(self, task: Task, model: Mapping[str, np.ndarray] | None):
        self.seen.append(task.stage)
        return model

    def run_stage(self, task: Task, model: Mapping[str, np.ndarray] | None) -> bytes:
        if task.config.get("refuse_survey"):
            raise RuntimeError("this client does not take surveys")
        return json.dumps({"nonce": task.payload.hex(), "model": model is not None,
                           "seen": list(self.seen)}).encode()

    def encode_update(self, task: Task, update: Mapping[str, np.ndarray],
                      base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: value + 1 for name, value in update.items()}


class SurveyAvg(FedAvg):
    """FedAvg after a survey: each asked client gets its own nonce and must echo it; only
    the clients that echoed it right are trained; ``surveyed`` keeps what reduce saw."""

    name = "survey_avg"

    def __init__(self) -> None:
        super().__init__()
        self.surveyed: list[dict[str, dict]] = []

    def declare(self) -> Declaration:
        return Declaration(stages=(SURVEY, TRAIN, VALIDATE),
                           client_half="tests.stage_strategies:SurveyHalf")

    def plan_stage(self, stage: Stage, state: RoundState) -> RoundPlan:
        plan = super().plan_stage(stage, state)
        if stage.name == SURVEY.name:
            return RoundPlan(clients=plan.clients, config=plan.config,
                             payloads={c: nonce(c, state.ctx.round) for ids in
                                       plan.clients.values() for c in ids})
        if stage.kind is TaskKind.TRAIN:
            answers = state.replies[SURVEY.name]
            right = {c for c, r in answers.items()
                     if json.loads(r.payload)["nonce"] == nonce(c, state.ctx.round).hex()}
            return plan.only(right)
        return plan

    def reduce_round(self, partials, state: RoundState):
        self.surveyed.append({c: json.loads(r.payload)
                              for c, r in state.replies[SURVEY.name].items()})
        return super().reduce_round(partials, state)


def nonce(client_id: str, round_: int) -> bytes:
    return f"{client_id}/{round_}".encode()


class RebuildHalf(ClientHalf):
    """Gives the user's code a model of its own making (as a delta codec rebuilds one)."""

    def receive(self, task: Task, model: Mapping[str, np.ndarray] | None):
        return {name: value + 10 for name, value in model.items()}


AUDIT = Stage(TaskKind.STAGE, name="audit", with_model=False, max_reply_bytes=256)


class AuditHalf(ClientHalf):
    """Answers the audit with the payload it got (who the controller says trained)."""

    def run_stage(self, task: Task, model: Mapping[str, np.ndarray] | None) -> bytes:
        return task.payload


class AuditAvg(FedAvg):
    """FedAvg with a stage after train: each audited client gets the ids of every client
    whose update was folded, by combiner; ``seen`` keeps the round states it was given."""

    name = "audit_avg"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[RoundState] = []

    def declare(self) -> Declaration:
        return Declaration(stages=(TRAIN, AUDIT, VALIDATE),
                           client_half="tests.stage_strategies:AuditHalf")

    def plan_stage(self, stage: Stage, state: RoundState) -> RoundPlan:
        plan = super().plan_stage(stage, state)
        if stage.name != AUDIT.name:
            return plan
        self.seen.append(state)
        trained = json.dumps({c: sorted(ids) for c, ids in sorted(state.trained.items())})
        return RoundPlan(clients=plan.clients,
                         payloads={c: trained.encode() for ids in plan.clients.values()
                                   for c in ids})

    def reduce_round(self, partials, state: RoundState):
        self.seen.append(state)
        return super().reduce_round(partials, state)
