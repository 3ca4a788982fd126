"""The stages after a commit: validation of the new model (and any stage a strategy
runs on it), whose metrics are added to the round after the fact and never undo it."""

from __future__ import annotations

from fedray.actors.controller.callbacks import RoundValidated
from fedray.actors.controller.dispatch import dispatch, replies_of
from fedray.actors.controller.planning import context, plan_stage
from fedray.actors.controller.session import Session
from fedray.errors import AttemptFailed, SessionError
from fedray.messages import MetricSums, TaskKind
from fedray.strategies.snapshots import RoundPlan, RoundState


async def after_commit(s: Session, number: int, model: bytes, mid: str,
                       plan: RoundPlan | None = None) -> dict[str, float]:
    """Run every stage declared after the commit on model ``mid``; the validation
    metrics (example-weighted means over the clients that validated)."""
    stages = [st for st in s.declaration.after_commit
              if st.kind is not TaskKind.VALIDATE or s.settings.validate]
    if not stages:
        return {}
    online = await s.pool.online()
    ctx = context(s, number, 1, online)
    state = RoundState(ctx, plan or RoundPlan(clients={}))
    metrics: dict[str, float] = {}
    for stage in stages:
        try:
            stage_plan = plan_stage(s, stage, state)
        except (AttemptFailed, SessionError) as exc:  # the commit stands; say why, go on
            s.note("warning", f"stage {stage.name} of round {number} was not run: {exc}",
                   number)
            continue
        results, _ = await dispatch(s, number, stage, stage_plan, s.model_ref(mid, model), mid)
        state = state.with_replies(stage.name, replies_of(results, stage))
        if stage.kind is TaskKind.VALIDATE:
            metrics = _validated(s, number, mid, results)
    return metrics


def _validated(s: Session, number: int, mid: str, results: list) -> dict[str, float]:
    weighted = MetricSums()
    reports = []
    for result in results:
        for report in result.validations:
            reports.append((result.combiner, report))
            weighted.fold(report.metrics, float(max(report.num_examples, 1)))
    metrics = weighted.means()
    s.emit(RoundValidated(s.session_id, number, mid, metrics, reports))
    return metrics


