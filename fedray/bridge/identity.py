"""Per-client identity by key pair: what a client holds, and how it proves it on each call.

A client's identity is an Ed25519 key pair. The federation keeps only the public key (a
row in tracking, MAC'd under the federation's token secret like a token row); the client
keeps the private key, in its credential bundle (``fedray client add``). Every call it
makes carries its public key, a timestamp, the federation's id and a signature over all
of them (``x-fedray-key``, ``x-fedray-ts``, ``x-fedray-federation``, ``x-fedray-sig``):
the servers check the signature against the public key registered under that name, so
nothing a server or tracking holds lets anyone in.

A client signs once per ``SIGNATURE_WINDOW_S`` and sends that signature with every call of
the window; a server verifies each distinct signature once and remembers it until the
window (and ``MAX_SKEW_S`` of clock difference) is over. One Ed25519 verification per
client per minute is all it costs, whatever the call rate. A signature seen on the wire
would open the window to whoever saw it, which is why the bridge is TLS whenever it
binds anything but loopback.

Why signed calls and not client certificates: gRPC's Python server either asks every
caller for a certificate or asks none, so certificates would shut out every client without
one, the quick-start token included; signed calls work alike over TLS and over loopback
plaintext, revocation is a row (no CRL to ship), and this is how Flower's SuperNodes
authenticate to their SuperLink.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass, field

from fedray.errors import ConfigError

KEY_HEADER, TS_HEADER, SIG_HEADER = "x-fedray-key", "x-fedray-ts", "x-fedray-sig"
FEDERATION_HEADER = "x-fedray-federation"
SIGNATURE_WINDOW_S = 60  # a client signs once per window
MAX_SKEW_S = 300  # how far a client's clock may be from the server's


def _ed25519():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def fingerprint(public: bytes) -> str:
    """How a public key is named in metadata and looked up: sha256 of its 32 raw bytes."""
    return hashlib.sha256(b"fedray-key\0" + public).hexdigest()


def _message(federation: str, public: bytes, ts: int) -> bytes:
    return f"fedray-call\0{federation}\0{public.hex()}\0{ts}".encode()


def public_text(public: bytes) -> str:
    """A public key as the ``x-fedray-key`` header carries it (unpadded base64url)."""
    return base64.urlsafe_b64encode(public).decode().rstrip("=")


def public_from_text(text: str) -> bytes | None:
    """The 32 bytes of an ``x-fedray-key`` header, or None when it is not a key."""
    if len(text) != 43:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=")
    except (ValueError, TypeError):
        return None
    return raw if len(raw) == 32 else None


@dataclass(frozen=True)
class ClientKey:
    """A client's private key, and what it signs calls with."""

    private: bytes = field(repr=False)  # 32 raw bytes: never in logs

    @classmethod
    def generate(cls) -> ClientKey:
        from cryptography.hazmat.primitives import serialization

        key = _ed25519().Ed25519PrivateKey.generate()
        return cls(key.private_bytes(serialization.Encoding.Raw,
                                     serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption()))

    @classmethod
    def from_hex(cls, text: str, where: str) -> ClientKey:
        try:
            raw = bytes.fromhex(text)
        except (TypeError, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ConfigError(f"{where}: not an Ed25519 private key (64 hex characters)")
        return cls(raw)

    @property
    def public(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        key = _ed25519().Ed25519PrivateKey.from_private_bytes(self.private)
        return key.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return fingerprint(self.public)

    def hex(self) -> str:
        return self.private.hex()


class CallSigner:
    """The identity headers of every call, signed again at the start of each window."""

    def __init__(self, key: ClientKey, federation: str, clock=time.time) -> None:
        self.public = key.public
        self.federation = federation
        self._key = _ed25519().Ed25519PrivateKey.from_private_bytes(key.private)
        self._clock = clock
        self._signed: tuple[int, tuple[tuple[str, str], ...]] | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        ts = int(self._clock()) // SIGNATURE_WINDOW_S * SIGNATURE_WINDOW_S
        if self._signed is None or self._signed[0] != ts:
            sig = self._key.sign(_message(self.federation, self.public, ts))
            self._signed = (ts, ((KEY_HEADER, public_text(self.public)), (TS_HEADER, str(ts)),
                                 (FEDERATION_HEADER, self.federation),
                                 (SIG_HEADER, base64.b64encode(sig).decode())))
        return self._signed[1]


class SignatureCheck:
    """A server's checks of call signatures; each distinct one is verified once (in its
    window), so a flood of calls repeating a signature costs dictionary lookups."""

    MAX_REMEMBERED = 100_000  # signatures remembered (then the oldest go)

    def __init__(self, federation: str, clock=time.time) -> None:
        self.federation = federation
        self._clock = clock
        self._good: dict[tuple[bytes, int, str], float] = {}  # -> remembered until

    def why_not(self, public: bytes, ts_text: str, sig_text: str) -> str:
        """"" when the signature is this key's, for this federation and current; else why
        it is refused."""
        try:
            ts = int(ts_text)
        except ValueError:
            return "a call signature without a valid timestamp"
        now = self._clock()
        if abs(now - ts) > MAX_SKEW_S + SIGNATURE_WINDOW_S:
            return (f"a call signature {int(now - ts)}s old; check this client's clock "
                    f"(it must be within {MAX_SKEW_S // 60} minutes of the server's)")
        entry = (public, ts, sig_text)
        if self._good.get(entry, 0.0) > now:
            return ""
        try:
            signature = base64.b64decode(sig_text, validate=True)
            _ed25519().Ed25519PublicKey.from_public_bytes(public).verify(
                signature, _message(self.federation, public, ts))
        except Exception:  # noqa: BLE001 - InvalidSignature, bad base64, bad key: refused
            return "a call signature that does not verify (signed for another federation, or altered)"
        if len(self._good) >= self.MAX_REMEMBERED:
            for old in [k for k, until in self._good.items() if until <= now] \
                    or list(self._good)[: self.MAX_REMEMBERED // 10]:
                del self._good[old]
        self._good[entry] = ts + SIGNATURE_WINDOW_S + MAX_SKEW_S
        return ""
