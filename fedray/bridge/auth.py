"""Who is calling the bridge, and whether to let them: credentials, identities, rate limits.

Every RPC to the gateway or a combiner is admitted by an ``AuthGate`` (the gRPC
interceptor in ``fedray.bridge.server`` only translates its verdict into a status). A caller is:

- ``client``: it signed the call with a registered key pair (``fedray.bridge.identity``)
  or presented a per-client token; its identity is the credential's name, whatever name
  or client id its messages claim;
- ``shared``: it presented the federation token or a live shared token from tracking; its
  messages name it, except that names owned by a client's own credential are refused
  (nobody can pose as a client that has one);
- ``open``: the federation has no shared token and no credential at all.

Credentials come from ``fedray.bridge.client_tokens`` (a cache of tracking's rows, checked
under the federation's token secret, ``BridgeKeys``). Refusals become warning events,
throttled so a flood cannot fill tracking, and each caller's RPCs go through a token
bucket (``fedray.bridge.limits``). Pure asyncio: no grpc here.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hmac
import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedray.bridge.client_tokens import ClientTokens, TokenLoader
from fedray.bridge.identity import (
    FEDERATION_HEADER,
    KEY_HEADER,
    SIG_HEADER,
    TS_HEADER,
    SignatureCheck,
    fingerprint,
    public_from_text,
)
from fedray.bridge.keys import federation_id
from fedray.bridge.limits import (
    MAX_CALLS_IN_FLIGHT,
    EventThrottle,
    InFlight,
    PeerIds,
    RateLimiter,
    Slots,
)
from fedray.bridge.wire import AUTH_HEADER, CLIENT_HEADER

log = logging.getLogger(__name__)

MAX_CLAIM_CHARS = 256  # a claimed name (x-fedray-client) longer than this is refused
MAX_IDS_PER_PEER = 256  # default of combiners.max_clients_per_connection
AUTH_FAILURES_PER_S = 2.0  # refused authentications answered per host and second...
AUTH_FAILURE_BURST_S = 5.0  # ...after a burst of this many seconds' worth (10)

EventSink = Callable[..., None]  # (level, message, **data), e.g. TrackingObserver.event


@dataclass(frozen=True)
class BridgeKeys:
    """What the gateway's and combiners' gates check callers with, handed from the driver
    to the actors (which may run on other nodes): the shared token, the token secret
    (``fedray.bridge.keys``), and whether per-client tokens were ever issued."""

    shared_token: str | None = field(default=None, repr=False)
    token_secret: bytes | None = field(default=None, repr=False)
    tokens_issued: bool = False

    @classmethod
    def of(cls, value: BridgeKeys | str | None) -> BridgeKeys:
        """``value``, or keys with only the shared token ``value``."""
        return value if isinstance(value, BridgeKeys) else cls(shared_token=value)


class Refused(Exception):
    """A call that must not reach its handler; ``code`` names a gRPC status code, and
    ``reason``/``why`` say (to tracking, never to the caller) what was wrong."""

    def __init__(self, code: str, message: str, reason: str = "", why: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason, self.why = reason, why or message


@dataclass(frozen=True)
class Caller:
    kind: str  # "client" | "shared" | "open"
    name: str = ""  # the token's name for kind "client"
    gate: AuthGate | None = field(default=None, compare=False, repr=False)
    peer: str = field(default="", compare=False)  # the connection it called on
    slots: Slots = field(default=(), compare=False, repr=False)  # its calls-in-flight caps

    def client_id(self, claimed: str, claimed_name: str = "") -> str:
        """The id to act on: the token's name, or what the message claims if that is allowed
        (not a name with its own token, and not more ids than one connection may hold)."""
        if self.kind == "client":
            if claimed_name and claimed_name != self.name and self.gate is not None:
                self.gate.report("warning", f"a client claimed the name {claimed_name!r}; its "
                                 f"token belongs to {self.name!r}, which it is tracked as",
                                 reason="claimed_name", client_id=self.name,
                                 claimed=claimed_name[:MAX_CLAIM_CHARS])
            return self.name
        if max(len(claimed), len(claimed_name)) > MAX_CLAIM_CHARS:  # before it is kept
            raise Refused("INVALID_ARGUMENT", f"client ids and names are at most "
                          f"{MAX_CLAIM_CHARS} characters")
        if self.gate is not None:
            if not self.gate.tokens.loaded:  # cannot tell yet whose names are reserved
                self.gate.report("warning", "refused a shared-token caller: the token list "
                                 "was not read yet (tracking unreachable?)", reason="unvouched",
                                 claimed=claimed[:MAX_CLAIM_CHARS])
                raise Refused("UNAVAILABLE", "this server cannot check client names yet; "
                              "try again shortly")
            for value in {claimed, claimed_name} - {""}:
                if value in self.gate.tokens.names:
                    self.gate.report("warning", f"refused a caller posing as {value!r}, a "
                                     "client with its own token", reason="posing", claimed=value)
                    raise Refused("PERMISSION_DENIED", f"{value!r} must use its own token")
            if claimed:
                self.gate.hold(self.peer, claimed)
        return claimed


OPEN = Caller("open")
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("fedray_caller", default=OPEN)


def current_caller() -> Caller:
    """The caller of the RPC being handled (``OPEN`` outside a gated server)."""
    return CALLER.get()


class AuthGate:
    """Admits or refuses each RPC; one per gRPC server (gateway or combiner)."""

    def __init__(self, shared_token: str | None, tokens: ClientTokens | None = None,
                 max_rpcs_per_s: float | None = None, on_event: EventSink | None = None,
                 max_ids_per_peer: int = MAX_IDS_PER_PEER) -> None:
        self._shared = shared_token.encode() if shared_token else None
        self.tokens = tokens or ClientTokens(None)
        secret = self.tokens.secret
        self.federation = federation_id(secret) if secret is not None else ""
        self.signatures = SignatureCheck(self.federation)
        self._shared_digest = self.tokens.digest(shared_token) if shared_token else None
        self.tokens.on_untrusted = self._untrusted
        self.limiter = RateLimiter(max_rpcs_per_s) if max_rpcs_per_s else None
        self.peer_ids = PeerIds(max_ids_per_peer)
        self.in_flight = InFlight()
        self.failures = RateLimiter(AUTH_FAILURES_PER_S, burst_s=AUTH_FAILURE_BURST_S)
        self.on_event = on_event
        self.throttles: dict[str, EventThrottle] = {}  # one per reason: a flood of wrong
        # tokens cannot hide the use of a revoked one

    @property
    def required(self) -> bool:
        """Whether callers need a token: a shared token is set, or per-client tokens exist
        or existed (``ClientTokens.required``)."""
        return self._shared is not None or self.tokens.required

    def _untrusted(self, count: int) -> None:
        self.report("warning", f"tracking holds {count} token row(s) that do not verify under "
                    "this federation's token secret (forged, altered, or made before keyed "
                    "tokens); they are ignored", reason="untrusted_tokens", rows=count)

    async def start(self) -> None:
        await self.tokens.start()

    async def close(self) -> None:
        await self.tokens.close()

    def report(self, level: str, message: str, *, reason: str, **data: Any) -> None:
        """A security event, unless its reason's throttle says tracking has seen enough."""
        throttle = self.throttles.setdefault(reason, EventThrottle())
        record, dropped = throttle.allow()
        if not record:
            log.debug("not recorded (throttled): %s", message)
            return
        if dropped:
            message += f" ({dropped} similar event(s) before this one were not recorded)"
            data["suppressed"] = dropped
        if self.on_event is not None:
            with contextlib.suppress(Exception):  # observability never refuses a call
                self.on_event(level, message, reason=reason, **data)

    def hold(self, peer: str, client_id: str) -> None:
        """Let ``peer`` act for ``client_id``, or refuse: it already acts for too many."""
        if not self.peer_ids.hold(peer, client_id):
            self.report("warning", f"refused {client_id!r} from {peer}: that connection already "
                        f"acts for {self.peer_ids.per_peer} client ids", reason="peer_ids",
                        peer=peer, claimed=client_id[:MAX_CLAIM_CHARS])
            raise Refused("RESOURCE_EXHAUSTED", f"one connection may act for at most "
                          f"{self.peer_ids.per_peer} client ids")

    def admit(self, metadata: Mapping[str, Any], method: str, peer: str) -> Caller:
        """The caller, or ``Refused``: ``identify``, then ``limit`` (what the interceptor
        does in two steps, so that a refused call never has its request read)."""
        try:
            caller = self.identify(metadata)
        except Refused as exc:
            raise self.refused(exc, method, peer) from None
        return self.limit(caller, metadata, method, peer)

    def identify(self, metadata: Mapping[str, Any]) -> Caller:
        """Who presents this metadata's key or token, or ``Refused`` (UNAUTHENTICATED, with
        the reason for ``refused``); needs nothing but the metadata, and never waits: an
        unknown token or key is refused at once (its re-read goes on in the background)."""
        if KEY_HEADER in metadata:
            return self._identify_key(metadata)
        header = str(metadata.get(AUTH_HEADER, ""))
        token = header[7:] if header.startswith("Bearer ") and len(header) > 7 else None
        if token is not None and self._shared is not None \
                and hmac.compare_digest(token.encode(), self._shared):
            row = self.tokens.entries.get(self._shared_digest) if self._shared_digest else None
            if row is None or not (row.revoked or row.expired()):  # no miss re-read: it
                return Caller("shared", gate=self)  # is known without a row
            raise Refused("UNAUTHENTICATED", "missing, wrong, expired or revoked token",
                          "revoked" if row.revoked else "expired",
                          f"the {'revoked' if row.revoked else 'expired'} shared token")
        why, reason = "no token", "no_token"
        digest = self.tokens.digest(token) if token is not None else None
        if digest is not None:
            hit = self.tokens.find(digest)
            if hit is not None and hit.kind != "key" and not hit.revoked and not hit.expired():
                return Caller("shared", gate=self) if hit.kind == "shared" \
                    else Caller("client", hit.name, gate=self)
            what = "shared token" if hit is not None and hit.kind == "shared" \
                else f"token of {hit.name!r}" if hit is not None else ""
            why, reason = ((f"the revoked {what}", "revoked") if hit is not None and hit.revoked
                           else (f"the expired {what}", "expired") if hit is not None
                           and hit.kind != "key" else ("a wrong token", "wrong_token"))
        elif token is not None:
            why, reason = "a wrong token", "wrong_token"
        if not self.required:
            return Caller("open", gate=self)
        if token is None:
            raise Refused("UNAUTHENTICATED", "this federation needs a credential and none was "
                          "sent", reason, why)
        raise Refused("UNAUTHENTICATED", "missing, wrong, expired or revoked token", reason, why)

    def _identify_key(self, metadata: Mapping[str, Any]) -> Caller:
        """A caller signing with a key pair (``fedray.bridge.identity``): its registered
        name once the signature verifies. Its refusals say exactly why: nothing in them
        helps anyone without the private key."""
        def refuse(reason: str, message: str) -> Refused:
            return Refused("UNAUTHENTICATED", message, reason, message)

        public = public_from_text(str(metadata.get(KEY_HEADER, "")))
        if public is None:
            raise refuse("bad_key", f"{KEY_HEADER} is not an Ed25519 public key")
        federation = str(metadata.get(FEDERATION_HEADER, ""))
        if self.federation and federation and federation != self.federation:
            raise refuse("other_federation", "this credential was issued by another "
                         f"federation ({federation[:16]}, this is {self.federation}); get one "
                         "from this federation's operator (fedray client add)")
        hit = self.tokens.find(fingerprint(public))
        if hit is None or hit.kind != "key" or hit.public != public:
            raise refuse("unknown_key", "this credential's key is not registered with this "
                         "federation (fedray client add registers one; fedray client list "
                         "shows them)")
        why = self.signatures.why_not(public, str(metadata.get(TS_HEADER, "")),
                                      str(metadata.get(SIG_HEADER, "")))
        if why:
            raise refuse("bad_signature", f"refused {why}")
        if hit.revoked:
            raise refuse("revoked", f"the credential of {hit.name!r} was revoked")
        if hit.expired():
            raise refuse("expired", f"the credential of {hit.name!r} expired; ask for a new "
                         "one (fedray client add)")
        return Caller("client", hit.name, gate=self)

    def refused(self, exc: Refused, method: str, peer: str) -> Refused:
        """Record a refused authentication and say how to answer it: RESOURCE_EXHAUSTED
        once ``peer``'s host failed more than ``AUTH_FAILURES_PER_S`` (a guesser gets no
        answer about its guesses, and tracking hears of it once in a while)."""
        host = peer_host(peer)
        if not self.failures.allow(host):
            self.report("warning", f"refused {method} from {peer}: too many failed "
                        f"authentications from {host}", reason="auth_rate_limit",
                        method=method, peer=peer)
            return Refused("RESOURCE_EXHAUSTED", "too many failed authentications; slow down")
        self.report("warning", f"refused {method} from {peer}: {exc.why}", reason=exc.reason,
                    method=method, peer=peer)
        return exc

    def limit(self, caller: Caller, metadata: Mapping[str, Any], method: str,
              peer: str) -> Caller:
        """``caller`` bound to its connection, within its budget, or ``Refused``
        (INVALID_ARGUMENT or RESOURCE_EXHAUSTED).

        Budgets are keyed by identity: a per-client token's name, wherever it calls from.
        A shared-token (or open) caller has no identity beyond its connection, so it is
        keyed by its peer and the name it claims, and one peer may claim only
        ``max_ids_per_peer`` names: renaming buys no fresh budget past that."""
        claimed = str(metadata.get(CLIENT_HEADER, ""))
        if len(claimed) > MAX_CLAIM_CHARS:
            raise Refused("INVALID_ARGUMENT", f"{CLIENT_HEADER} is at most {MAX_CLAIM_CHARS} "
                          "characters")
        if caller.kind != "client" and claimed:
            self.hold(peer, claimed)
        key = f"client:{caller.name}" if caller.kind == "client" else f"peer:{peer}|{claimed}"
        # A nameless shared-token connection may carry many clients: it gets theirs.
        cap = MAX_CALLS_IN_FLIGHT * (1 if caller.kind == "client" or claimed
                                     else self.peer_ids.per_peer)
        caller = dataclasses.replace(caller, peer=peer, slots=((key, cap),))
        if self.limiter is not None and not self.limiter.allow(key):
            who = (f"client {caller.name!r}" if caller.kind == "client"
                   else f"{claimed!r} on {peer}" if claimed else peer)
            self.report("warning", f"{who} exceeds {self.limiter.rate:g} calls/s; refused "
                        f"{method}", reason="rate_limit", method=method, peer=peer)
            raise Refused("RESOURCE_EXHAUSTED",
                          f"more than {self.limiter.rate:g} calls per second; slow down")
        return caller


def peer_host(peer: str) -> str:
    """Who a failure limit counts a caller as: its IPv4 address (``ipv4:10.0.0.1:5555`` ->
    ``ipv4:10.0.0.1``), or its IPv6 /64 prefix (``ipv6:[2001:db8::1]:5555`` ->
    ``ipv6:2001:db8::/64``: one host holds a whole /64, so counting addresses would give
    it 2^64 fresh budgets)."""
    kind, _, address = peer.partition(":")
    if kind not in {"ipv4", "ipv6"} or address.count(":") < 1 \
            or not address.rsplit(":", 1)[1].isdigit():
        return peer
    host = address.rsplit(":", 1)[0]
    if kind == "ipv6":
        with contextlib.suppress(ValueError):
            ip = ipaddress.IPv6Address(host.strip("[]").split("%", 1)[0])
            if ip.ipv4_mapped is not None:
                return f"ipv4:{ip.ipv4_mapped}"
            return f"ipv6:{ipaddress.IPv6Network(f'{ip}/64', strict=False)}"
    return f"{kind}:{host}"


def make_gate(keys: BridgeKeys | str | None,
              source: tuple[TokenLoader | None, Callable[[], None] | None],
              max_rpcs_per_s: float | None, on_event: EventSink | None = None,
              on_revoked: Callable[[set[str]], None] | None = None,
              max_ids_per_peer: int = MAX_IDS_PER_PEER) -> AuthGate:
    """The gate of an actor's server: the shared token plus per-client tokens, read with
    ``source`` (a loader and its close: ``fedray.tracking.tokens.tracking_token_loader``;
    ``(None, None)`` without tracking). ``keys`` may be just the shared token; without a
    token secret, per-client tokens are never accepted (nothing can verify them)."""
    keys = BridgeKeys.of(keys)
    load, release = source
    if keys.token_secret is None and load is not None:
        log.warning("no token secret: per-client tokens cannot be checked and are refused")
    tokens = ClientTokens(load, on_revoked=on_revoked, release=release,
                          secret=keys.token_secret, issued=keys.tokens_issued)
    return AuthGate(keys.shared_token, tokens, max_rpcs_per_s, on_event,
                    max_ids_per_peer=max_ids_per_peer)
