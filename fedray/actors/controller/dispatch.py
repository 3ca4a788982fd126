"""Send one stage of a round to every combiner its plan names, and gather what comes back.

Each combiner gets a ``RoundSpec`` (the stage, its clients and their payloads, the
deadline) and the same object-store reference to the model. A combiner that does not
answer, whatever the reason, is "lost" for this stage: the pool translated Ray's errors
into ``CombinerError`` values with the combiner's name and the round, and this module
adds the timeout (the stage's deadline plus ``RPC_GRACE_S``); the others' results stand.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fedray.actors.controller.session import Session
from fedray.errors import CombinerError, CombinerTimeout
from fedray.messages import RoundResult, RoundSpec
from fedray.strategies.declaration import CloseRule, Stage
from fedray.strategies.snapshots import Reply, RoundPlan

log = logging.getLogger(__name__)

RPC_GRACE_S = 30.0  # how long past a stage's deadline a combiner may take to answer


def stage_deadline(s: Session, stage: Stage) -> float:
    return stage.deadline_s or s.settings.round_timeout_s


def specs_for(s: Session, number: int, stage: Stage, plan: RoundPlan, model_id: str,
              attempt: int) -> dict[str, RoundSpec]:
    settings = s.settings
    delta = s.delta if s.delta is not None and model_id and s.delta[0] == model_id else None
    return {
        name: RoundSpec(session_id=s.session_id, round=number, kind=stage.kind,
                        clients=tuple(clients), config=dict(plan.config),
                        timeout_s=stage_deadline(s, stage), model_id=model_id,
                        package_sha256=s.package[0], package_size=s.package[1],
                        attempt=attempt, params=dict(plan.params),
                        buffer=plan.buffer if stage.close is CloseRule.FIRST_K else 0,
                        max_examples=settings.max_examples_per_update,
                        max_update_norm=settings.max_update_norm,
                        max_update_norm_ratio=settings.max_update_norm_ratio,
                        version=s.rounds_done,
                        stage=stage.name,
                        codec=settings.codec, codec_options=dict(settings.codec_kwargs),
                        delta_from=delta[1] if delta else "", delta=delta[2] if delta else b"",
                        payloads={c: bytes(plan.payloads[c]) for c in clients
                                  if c in plan.payloads})
        for name, clients in plan.clients.items() if clients
    }


async def dispatch(s: Session, number: int, stage: Stage, plan: RoundPlan, model_ref: Any,
                   model_id: str, attempt: int = 1) -> tuple[list[RoundResult], list[str]]:
    """(results, names of the combiners lost) for one stage."""
    specs = specs_for(s, number, stage, plan, model_id, attempt)
    wait = stage_deadline(s, stage) + RPC_GRACE_S
    answers = await asyncio.gather(*(_ask(s, name, spec, model_ref, wait)
                                     for name, spec in specs.items()), return_exceptions=True)
    results, lost = [], []
    for name, answer in zip(specs, answers, strict=True):
        if isinstance(answer, BaseException):
            lost.append(name)
            if isinstance(answer, CombinerError):
                why = str(answer)
            else:  # a bug on this side, not a combiner's fault: say what it was
                log.error("round %s: the call to %s failed", number, name, exc_info=answer)
                why = f"combiner {name} (round {number}): {type(answer).__name__}: {answer}"
            s.note("error", f"{why}; its share of {stage.name} is lost", number,
                   combiner=name, stage=stage.name)
        else:
            results.append(answer)
    return results, lost


async def _ask(s: Session, name: str, spec: RoundSpec, model_ref: Any,
               wait: float) -> RoundResult:
    try:
        return await asyncio.wait_for(s.pool.run_round(name, spec, model_ref), wait)
    except TimeoutError:
        raise CombinerTimeout(name, spec.round, f"no answer within {wait:g}s (the stage's "
                              f"deadline and {RPC_GRACE_S:g}s of grace)") from None


def replies_of(results: list[RoundResult], stage: Stage) -> dict[str, Reply]:
    """What the clients answered to a stage that is not training, by client id."""
    replies: dict[str, Reply] = {}
    for result in results:
        for report in result.validations:
            replies[report.client_id] = Reply(report.client_id, report.num_examples,
                                              dict(report.metrics))
        for client_id, payload in result.replies.items():
            replies[client_id] = Reply(client_id, payload=payload)
    return replies
