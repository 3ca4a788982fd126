"""Before a round (or a stage of one) is dispatched: enough clients, a snapshot of them,
and the strategy's plan, checked.

The strategy decides who is asked (``configure``, ``plan_stage``); this module builds the
snapshot it decides over and refuses a plan the runtime must not carry out: clients that
are not online where the plan puts them, payloads over the bound. A plan that would keep
more updates than ``session.max_kept_updates`` (a strategy that keeps every update) is
sampled down to that many, with a notice. Settings that can never work end the session
(SessionError); anything else fails this attempt only (AttemptFailed), and the next attempt
sees other clients.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from fedray.actors.controller.callbacks import ClientsOnline
from fedray.actors.controller.policy import kept_within
from fedray.actors.controller.session import Session
from fedray.errors import AttemptFailed, ConfigError, SessionError
from fedray.messages import TaskKind
from fedray.states import SessionState
from fedray.strategies.declaration import Stage
from fedray.strategies.snapshots import (
    MAX_PAYLOAD_BYTES,
    ClientInfo,
    RoundContext,
    RoundPlan,
    RoundState,
)


async def wait_for_clients(s: Session) -> dict[str, list[ClientInfo]]:
    """Until ``min_clients`` are online (or ``wait_for_clients_s`` passed: SessionError);
    more if the strategy needs more updates per round (``Session.min_clients``)."""
    give_up = time.monotonic() + s.settings.wait_for_clients_s
    announced = False
    while True:
        online = await s.pool.online()
        count = sum(len(c) for c in online.values())
        s.emit(ClientsOnline(s.session_id, count))
        if count >= s.min_clients:
            if s.state is not SessionState.RUNNING:
                s.move(SessionState.RUNNING)
            return online
        if not announced:
            if s.state is not SessionState.WAITING:
                s.move(SessionState.WAITING)
            s.note("info", f"waiting for clients: {count} of {s.min_clients} connected")
            announced = True
        if time.monotonic() > give_up:
            raise SessionError(f"only {count} client(s) connected within "
                               f"{s.settings.wait_for_clients_s:g}s; {s.min_clients_rule}")
        await s.pool.wait_for_change(online, min(5.0, max(0.1, give_up - time.monotonic())))


def context(s: Session, number: int, attempt: int,
            online: Mapping[str, list[ClientInfo]]) -> RoundContext:
    clients = tuple(c for name in sorted(online) for c in online[name])
    return RoundContext(session_id=s.session_id, round=number, attempt=attempt,
                        online=clients, settings=s.round_settings,
                        seed=s.settings.seed * 100_003 + number * 101 + attempt)


def plan_round(s: Session, ctx: RoundContext) -> RoundPlan:
    """The strategy's plan for the round, checked (see the module's docstring)."""
    plan = _decide(s, "configure", lambda: s.strategy.configure(ctx))
    check_plan(s, ctx, plan, "configure")
    return bound_kept(s, ctx, plan)


def plan_stage(s: Session, stage: Stage, state: RoundState) -> RoundPlan:
    """The strategy's plan for one stage of the round, checked."""
    plan = _decide(s, "plan_stage", lambda: s.strategy.plan_stage(stage, state))
    check_plan(s, state.ctx, plan, f"plan_stage({stage.name})")
    if stage.kind is TaskKind.TRAIN:
        plan = bound_kept(s, state.ctx, plan)
    return plan


def _decide(s: Session, what: str, decide) -> RoundPlan:
    name = s.settings.aggregator
    try:
        plan = decide()
    except AttemptFailed:
        raise
    except (ConfigError, SessionError) as exc:
        raise SessionError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - user strategy code
        raise AttemptFailed(f"strategy {name!r} failed in {what}: "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(plan, RoundPlan):
        raise SessionError(f"strategy {name!r}: {what} must return a RoundPlan, got "
                           f"{type(plan).__name__}")
    return plan


def check_plan(s: Session, ctx: RoundContext, plan: RoundPlan, what: str) -> None:
    """A plan may only ask clients online where it puts them, and send each a payload
    within ``MAX_PAYLOAD_BYTES``."""
    name = s.settings.aggregator
    where = {c.client_id: c.combiner for c in ctx.online}
    for combiner, ids in plan.clients.items():
        wrong = [i for i in ids if where.get(i) != combiner]
        if wrong:
            raise AttemptFailed(f"strategy {name!r} asked clients that are not online "
                              f"at {combiner}: {wrong[:5]} ({what})")
    asked = {i for ids in plan.clients.values() for i in ids}
    for client_id, payload in plan.payloads.items():
        if client_id not in asked:
            raise AttemptFailed(f"strategy {name!r} gave a payload to {client_id}, who is not "
                              f"asked ({what})")
        if not isinstance(payload, bytes | bytearray) or len(payload) > MAX_PAYLOAD_BYTES:
            raise SessionError(f"strategy {name!r}: a payload is bytes of at most "
                               f"{MAX_PAYLOAD_BYTES} per client ({what}, {client_id})")


def bound_kept(s: Session, ctx: RoundContext, plan: RoundPlan) -> RoundPlan:
    """A strategy that keeps every update (object store) keeps at most
    ``session.max_kept_updates`` per round: a plan that would keep more asks that many of
    its clients, sampled from the round's seed, and a notice says so and how to ask more.
    (The config cannot see how many clients will be online, what a select policy or a
    custom ``configure`` picks; the plan itself is bounded.)"""
    if not s.declaration.keeps_updates or s.asynchronous:
        return plan
    most = s.settings.max_kept_updates
    bounded = kept_within(plan, most, ctx.seed)
    if bounded is not plan:
        s.note("warning", f"round {ctx.round}: {s.settings.aggregator!r} keeps every update "
               f"of a round in Ray's object store, at most session.max_kept_updates ({most}); "
               f"of the {plan.asked} clients planned, {bounded.asked} are asked (a sample seeded "
               "by session.seed, the round and the attempt). To ask more, raise "
               "session.max_kept_updates (memory: that many model sizes)", ctx.round, reason="max_kept_updates", planned=plan.asked,
               asked=bounded.asked, max_kept_updates=most)
    return bounded
