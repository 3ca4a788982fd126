"""What a loaded config must satisfy beyond its types: bounds, cross-field rules, and
everything loadable (strategies, selection policies, TLS files) loaded now, so that a
mistake is one line at start, never a traceback inside an actor."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from typing import Any

from fedray.actors.placement import PLACEMENTS
from fedray.bridge.tls import server_tls
from fedray.config import FederationConfig
from fedray.errors import ConfigError
from fedray.strategies import NormCheck, make_strategy, options_problem, strategy_class
from fedray.strategies.codecs import make_codec
from fedray.strategies.codecs.coded import with_codec
from fedray.strategies.selection import check_select

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
MAX_TTL_DAYS = 24_855  # a TTL index holds at most 2**31 - 1 seconds


@dataclass(frozen=True)
class Blame:
    """Where a field's value came from: the config file, or a `--set` override; every
    error names the one at fault."""

    source: str
    overridden: frozenset[str]

    def origin(self, where: str) -> str | None:
        """The override that set ``where`` (or a section holding it), if one did."""
        return next((o for o in sorted(self.overridden)
                     if where == o or where.startswith(f"{o}.")), None)

    def error(self, where: str, why: str) -> ConfigError:
        origin = self.origin(where)
        if origin is None:
            return ConfigError(f"{self.source}: {where} {why}")
        return ConfigError(f"--set {origin}: {why}" if origin == where
                           else f"--set {origin}: {where} {why}")

    def touched(self, *fields: str) -> str | None:
        """The override that set one of ``fields``, a key below one, or a section above."""
        return next((o for o in sorted(self.overridden) for f in fields
                     if o == f or o.startswith(f"{f}.") or f.startswith(f"{o}.")), None)

    def among(self, fields: tuple[str, ...], where: str, why: str) -> ConfigError:
        """An error about ``where`` that follows from all of ``fields``: blamed on the
        ``--set`` of one of them if there is one, else on the file."""
        origin = self.touched(*fields)
        if origin is None:
            return ConfigError(f"{self.source}: {where} {why}")
        return ConfigError(f"--set {origin}: {why}" if origin == where
                           else f"--set {origin}: {where} {why}")

    def unknown(self, where: str, known: list[str]) -> ConfigError:
        origin = self.origin(where)
        head = f"--set {where}: unknown field" if origin == where else \
            f"--set {origin}: unknown field {where}" if origin else \
            f"{self.source}: unknown field {where}"
        return ConfigError(f"{head} ({field_hint(where, known)})")


def field_hint(where: str, known: list[str]) -> str:
    """A near miss of ``where`` among ``known`` fields, or the fields there are."""
    prefix, _, name = where.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    return "known: " + ", ".join(sorted(known))


def check(c: FederationConfig, blame: Blame) -> None:
    """Every rule across fields, with ``blame`` naming the file or the ``--set`` at fault."""
    bad = blame.error

    if not _NAME.match(c.federation):
        raise bad("federation", "must be 1-63 letters, digits, '-' or '_'")
    if c.ray.listen not in ("loopback", "all"):
        raise bad("ray.listen", f"must be loopback or all, got {c.ray.listen!r}")
    if c.ray.num_cpus is not None and c.ray.num_cpus < 1:
        raise bad("ray.num_cpus", f"must be at least 1 (or left out: every CPU), got "
                  f"{c.ray.num_cpus}")
    ports = {"controller.port": c.controller.port, "combiners.base_port": c.combiners.base_port}
    for where, port in ports.items():
        if not 0 <= port <= 65535:
            raise bad(where, f"must be a port number (0-65535), got {port}")
    positive = {
        "combiners.count": c.combiners.count,
        "combiners.max_clients": c.combiners.max_clients,
        "combiners.max_inflight_uploads": c.combiners.max_inflight_uploads,
        "combiners.max_update_mb": c.combiners.max_update_mb,
        "combiners.chunk_kib": c.combiners.chunk_kib,
        "combiners.max_rpcs_per_s": c.combiners.max_rpcs_per_s,
        "combiners.max_clients_per_connection": c.combiners.max_clients_per_connection,
        "combiners.max_client_events_per_min": c.combiners.max_client_events_per_min,
        "combiners.max_event_bytes": c.combiners.max_event_bytes,
        "combiners.max_connection_age_s": c.combiners.max_connection_age_s,
        "combiners.max_connection_idle_s": c.combiners.max_connection_idle_s,
        "combiners.heartbeat_interval_s": c.combiners.heartbeat_interval_s,
        "combiners.upload_idle_s": c.combiners.upload_idle_s,
        "session.rounds": c.session.rounds,
        "session.min_clients": c.session.min_clients,
        "session.round_timeout_s": c.session.round_timeout_s,
        "session.round_attempts": c.session.round_attempts,
        "session.clients_per_round": c.session.clients_per_round,
        "session.wait_for_clients_s": c.session.wait_for_clients_s,
    }
    for where, value in positive.items():
        if value <= 0:
            raise bad(where, f"must be greater than 0, got {value}")
    nonnegative = {"combiners.rebalance_max_moves_per_s": c.combiners.rebalance_max_moves_per_s,
                   "combiners.rebalance_settle_s": c.combiners.rebalance_settle_s}
    for where, value in nonnegative.items():
        if value < 0:
            raise bad(where, f"must be 0 or more, got {value}")
    _check_placement(c, blame)
    if c.combiners.rebalance_tolerance < 1:
        raise bad("combiners.rebalance_tolerance", "must be at least 1 (a spread of 1 is as "
                  f"even as whole clients get), got {c.combiners.rebalance_tolerance}")
    if c.combiners.offline_after_s <= c.combiners.heartbeat_interval_s:
        raise blame.among(("combiners.offline_after_s", "combiners.heartbeat_interval_s"),
                          "combiners.offline_after_s",
                          "must be longer than combiners.heartbeat_interval_s")
    if c.session.clients_per_round > 1 and c.session.clients_per_round != int(c.session.clients_per_round):
        raise bad("session.clients_per_round", "must be a fraction <= 1 or a whole count")
    if c.combiners.chunk_kib > 3 * 1024:
        raise bad("combiners.chunk_kib", "must stay under gRPC's 4 MiB message limit (max 3072)")
    _check_session(c, blame)
    if not 0 <= c.tracking.events_ttl_days <= MAX_TTL_DAYS:
        raise bad("tracking.events_ttl_days", f"must be 0 (keep forever) to {MAX_TTL_DAYS} days, "
                  f"got {c.tracking.events_ttl_days}")
    uri = c.tracking.uri
    if uri != "embedded" and not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise bad("tracking.uri", f"must be 'embedded' or a mongodb:// URI, got {uri!r}")
    server_tls(c.tls, c.source)  # the files exist and hold PEM, or a ConfigError names the field


TIER = ("combiners.count", "combiners.min", "combiners.max")


def resolve_tier(c: FederationConfig, given: Any, blame: Blame) -> FederationConfig:
    """``combiners.min``/``max`` filled in from ``count`` (the fixed-size shorthand), or
    ``count`` from ``min`` (the tier starts there); ``given`` is the raw ``combiners``
    mapping, to tell a ``count`` given from its default. Contradictions are refused."""
    t = c.combiners
    count_given = isinstance(given, dict) and "count" in given
    if t.min is None and t.max is None:
        low = high = t.count
    elif count_given:
        low = t.count if t.min is None else t.min
        high = t.count if t.max is None else t.max
        if not low == high == t.count:
            raise blame.among(TIER, "combiners.count",
                              f"{t.count} is the fixed-size shorthand for min = max = "
                              f"{t.count}, but min is {t.min} and max {t.max}: give count "
                              "alone, or min and max without count")
    else:
        low = 1 if t.min is None else t.min
        high = low if t.max is None else t.max
    if low < 1:
        raise blame.error("combiners.min", f"must be at least 1, got {low}")
    if high < low:
        raise blame.among(TIER[1:], "combiners.max",
                          f"({high}) must be at least combiners.min ({low})")
    if t.clients_per_combiner < 1:
        raise blame.error("combiners.clients_per_combiner",
                          f"must be at least 1, got {t.clients_per_combiner}")
    if t.scale_interval_s <= 0:
        raise blame.error("combiners.scale_interval_s", f"must be positive, got {t.scale_interval_s}")
    if t.scale_cooldown_s < 0:
        raise blame.error("combiners.scale_cooldown_s",
                          f"must be 0 or more, got {t.scale_cooldown_s}")
    return replace(c, combiners=replace(t, min=low, max=high, count=low))


STRATEGY = ("session.aggregator", "session.aggregator_kwargs", "session.secagg")
BLOCKS = {"secagg": "session.secagg"}  # strategies whose options have a block of their own


def _check_block(c: FederationConfig, blame: Blame) -> None:
    """``session.secagg`` adds to ``aggregator_kwargs`` (``SessionConfig.strategy_options``):
    a block for a strategy the session does not run is refused, not ignored, and so is
    one option set in both to different values."""
    s = c.session
    if not s.secagg:
        return
    if s.aggregator != "secagg":
        raise blame.among(("session.secagg", "session.aggregator"), "session.secagg",
                          f"holds secagg's options, but session.aggregator is "
                          f"{s.aggregator!r}: set session.aggregator: secagg, or remove "
                          "session.secagg")
    for key, value in s.secagg.items():
        if key in s.aggregator_kwargs and s.aggregator_kwargs[key] != value:
            raise blame.among(("session.secagg", "session.aggregator_kwargs"),
                              "session.secagg", f"sets {key}: {value!r}, and "
                              f"session.aggregator_kwargs sets it to "
                              f"{s.aggregator_kwargs[key]!r}: set it in one place")


def _check_placement(c: FederationConfig, blame: Blame) -> None:
    if c.combiners.placement not in PLACEMENTS:
        raise blame.error("combiners.placement", f"must be {' or '.join(PLACEMENTS)}, got "
                          f"{c.combiners.placement!r}")
    for name, amount in c.combiners.resources.items():
        where = f"combiners.resources.{name}"
        if not isinstance(name, str) or not name:
            raise blame.error("combiners.resources", f"names a resource {name!r}: names are "
                              "Ray resource names such as fedray_combiner")
        if isinstance(amount, bool) or not isinstance(amount, int | float) or amount <= 0:
            raise blame.error(where, f"must be a number greater than 0 (what one combiner "
                              f"takes of a node's {name}), got {amount!r}")


def _check_session(c: FederationConfig, blame: Blame) -> None:
    """Strategy, selection and straggler settings: everything loadable is loaded now."""

    bad = blame.error
    s = c.session
    nonnegative = {"session.buffer_size": s.buffer_size, "session.over_select": s.over_select,
                   "session.min_updates": s.min_updates}
    for where, value in nonnegative.items():
        if value < 0:
            raise bad(where, f"must be 0 or more, got {value}")
    if s.min_updates > s.min_clients:
        raise blame.among(("session.min_updates", "session.min_clients"), "session.min_updates",
                          f"must be at most session.min_clients ({s.min_clients}, the "
                          f"clients a round waits for), got {s.min_updates}: lower it, or "
                          "leave it 0 (a round then needs min_clients updates)")
    for where, value in {"session.max_examples_per_update": s.max_examples_per_update,
                         "session.max_kept_updates": s.max_kept_updates,
                         "session.max_update_norm": s.max_update_norm,
                         "session.max_update_norm_ratio": s.max_update_norm_ratio,
                         "session.time_budget_s": s.time_budget_s}.items():
        if value is not None and not value > 0:
            raise bad(where, f"must be greater than 0, got {value}")
    if s.max_examples_per_update > 2**53:
        raise bad("session.max_examples_per_update", f"must be at most 2**53, got "
                  f"{s.max_examples_per_update}")
    _check_block(c, blame)
    try:
        problem = options_problem(s.aggregator, strategy_class(s.aggregator),
                                  s.strategy_options,
                                  BLOCKS.get(s.aggregator, "session.aggregator_kwargs"))
        strategy = None if problem else make_strategy(s.aggregator, s.strategy_options)
    except ConfigError as exc:
        raise blame.among(STRATEGY, "session.aggregator",
                          f"names no strategy that loads: {exc}") from None
    if strategy is None:  # an option to set (with an example) or one that does not exist
        raise blame.among(STRATEGY, "session.aggregator", problem)
    try:
        strategy.check_settings(s)
    except ValueError as exc:
        raise blame.among(STRATEGY, "session.aggregator", f"{s.aggregator!r}: {exc}") from None
    try:
        check_select(s.select)
    except ConfigError as exc:  # it names the field itself
        origin = blame.touched("session.select")
        raise ConfigError(f"--set {origin}: {exc}" if origin else f"{c.source}: {exc}") from None
    declared = strategy.declare()
    asynchronous = declared.asynchronous is not None
    # The fewest updates a round can commit with: session.min_clients, or more when the
    # strategy cannot aggregate fewer (Krum); the runtime raises min_clients to it.
    need = max(s.min_clients, declared.min_updates)
    needs = f"session.min_clients ({need}) updates" if need == s.min_clients else \
        f"the {need} updates {s.aggregator!r} needs per round"
    if s.buffer_size and s.buffer_size < need and not asynchronous:
        raise blame.among(("session.buffer_size", "session.min_clients",
                           *(STRATEGY if need > s.min_clients else ())),
                          "session.buffer_size",
                          f"({s.buffer_size}) closes rounds before {needs} can arrive; raise "
                          f"it{' or lower min_clients' if need == s.min_clients else ''}")
    if s.max_update_norm is not None and declared.layout.norm is NormCheck.OFF:
        raise blame.among((*STRATEGY, "session.max_update_norm"), "session.max_update_norm",
                          f"cannot apply: {s.aggregator!r} sends updates whose layout has no "
                          "norm (encoded or masked); leave max_update_norm unset")
    if declared.keeps_updates and not asynchronous and s.max_kept_updates < need:
        # Each round's plan is bounded by max_kept_updates (sampled down to it when more
        # clients are online); only a bound below what a round needs can never work.
        raise blame.among((*STRATEGY, "session.max_kept_updates", "session.min_clients"),
                          "session.max_kept_updates",
                          f"({s.max_kept_updates}): {s.aggregator!r} keeps at most that many "
                          f"updates per round, fewer than {needs}, so no round could "
                          f"commit; raise it to {need} or more")
    codec_fields = ("session.codec", "session.codec_kwargs")
    try:
        with_codec(declared.layout, make_codec(s.codec, s.codec_kwargs))
    except ConfigError as exc:  # it names the field itself
        origin = blame.touched(*codec_fields)
        raise ConfigError(f"--set {origin}: {exc}" if origin else f"{c.source}: {exc}") from None
    except ValueError as exc:
        raise blame.among((*STRATEGY, *codec_fields), "session.codec",
                          f"{s.codec!r} cannot apply to {s.aggregator!r}: {exc}") from None
