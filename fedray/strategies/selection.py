"""Client selection: pure decisions over a frozen snapshot of the online clients.

A round asks a fraction or a count of the eligible clients (``session.clients_per_round``),
at least ``session.min_clients``, plus ``session.over_select`` more for stragglers (with
``session.buffer_size`` K the round then closes on its first K updates).
Eligible means: in ``session.select.ids`` when given, and matching every
``session.select.attrs`` entry (a value or a list of values; attributes come from
``fedray edge start --attr KEY=VALUE``). A ``session.select.policy`` callable, when set,
picks from the eligible clients itself: ``policy(clients, ctx) -> client ids``. The
sample is seeded by the session's seed, the round and the attempt, so it is reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from typing import Any

from fedray.errors import ConfigError
from fedray.strategies.loading import load_object
from fedray.strategies.snapshots import ClientInfo, RoundContext, RoundPlan

Policy = Callable[[tuple[ClientInfo, ...], RoundContext], Iterable[str]]


def check_select(select: Any) -> None:
    """Refuse a malformed ``session.select`` when the config is loaded."""
    if not all(isinstance(i, str) and i for i in select.ids):
        raise ConfigError("session.select.ids must be a list of client ids")
    for key, wanted in select.attrs.items():
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values or not all(isinstance(v, str | int | float | bool) for v in values):
            raise ConfigError(f"session.select.attrs.{key} must be a value or a list of values")
    if select.policy:
        load_policy(select.policy)


@cache
def load_policy(target: str) -> Policy:
    policy = load_object(target, "session.select.policy")
    if not callable(policy):
        raise ConfigError(f"session.select.policy {target!r} is not callable")
    return policy


def matches(client: ClientInfo, attrs: Mapping[str, Any]) -> bool:
    for key, wanted in attrs.items():
        values = wanted if isinstance(wanted, list) else [wanted]
        if client.attrs.get(key) not in {_text(v) for v in values}:
            return False
    return True


def _text(value: Any) -> str:
    # YAML reads `gpu: 0` as an int and `on: yes` as a bool; attributes are strings.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def eligible(online: Sequence[ClientInfo], select: Any) -> list[ClientInfo]:
    ids = set(select.ids)
    return [c for c in online if (not ids or c.client_id in ids) and matches(c, select.attrs)]


def clients_wanted(clients_per_round: float, online: int, min_clients: int,
                   over_select: float = 0.0) -> int:
    """How many clients to ask: a fraction of those eligible or a count, then over-selected."""
    if clients_per_round <= 1.0:
        wanted = math.ceil(clients_per_round * online)
    else:
        wanted = int(clients_per_round)
    wanted = max(wanted, min_clients)
    return min(online, math.ceil(wanted * (1.0 + over_select)))


def plan_round(ctx: RoundContext) -> RoundPlan:
    """The default ``Strategy.configure``: the session's selection settings, as above."""
    s = ctx.settings
    pool = eligible(ctx.online, s.select)
    if s.select.policy:
        names = {c.client_id for c in pool}
        picked = {str(i) for i in load_policy(s.select.policy)(tuple(pool), ctx)}
        unknown = sorted(picked - names)
        if unknown:  # this snapshot's fault, maybe not the next one's: the attempt fails
            raise ValueError(f"session.select.policy {s.select.policy!r} chose clients that "
                             f"are not eligible or not online: {unknown[:5]}")
        chosen = [c for c in pool if c.client_id in picked]
    else:
        wanted = clients_wanted(s.clients_per_round, len(pool), s.min_clients, s.over_select)
        ordered = sorted(pool, key=lambda c: (c.client_id, c.combiner))
        chosen = random.Random(ctx.seed).sample(ordered, wanted)
    clients: dict[str, list[str]] = {c.combiner: [] for c in ctx.online}
    for client in sorted(chosen, key=lambda c: c.client_id):
        clients[client.combiner].append(client.client_id)
    return RoundPlan(clients={k: tuple(v) for k, v in clients.items()},
                     config=dict(s.round_config), buffer=s.buffer_size)
