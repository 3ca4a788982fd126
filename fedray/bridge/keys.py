"""A federation's secrets on disk, and the strength of its shared token.

``<data_dir>/secrets/`` (mode 0700) holds:

    token.key       32 random bytes (hex), mode 0600: the key of the HMAC-SHA256 that
                    per-client tokens are stored as in tracking. Created on first use by
                    the driver (``Federation.deploy``) or ``fedray token create``; the
                    driver hands the bytes to the actors, which may run on other nodes.
    tokens-issued   written by the first ``fedray token create``: from then on the
                    federation requires a token from every caller, even if someone
                    deletes every token from tracking.

Tracking's integrity is not needed for token checks: whoever can write the ``tokens``
collection but cannot read ``token.key`` can revoke or delete tokens, never mint one.
Nothing here imports grpc, Ray or pymongo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import logging
import math
import os
import secrets
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path

from fedray.errors import ConfigError

log = logging.getLogger(__name__)

SECRET_BYTES = 32
MIN_TOKEN_BITS = 128  # a shared token needs at least 16 bytes of entropy
MIN_TOKEN_DISTINCT = 8  # ...and not be one or two characters repeated
GENERATE = 'python -c "import secrets; print(secrets.token_hex(16))"'
_ALPHABETS = (  # the smallest of these that holds a token decides its bits per character
    set(string.digits),
    set(string.hexdigits.lower()) | set(string.digits),
    set(string.hexdigits),
    set(string.ascii_letters + string.digits + "-_"),
    set(string.ascii_letters + string.digits + "+/="),
    set(string.ascii_letters + string.digits + "-_+/="),
    set(string.printable.strip()),
)


def private_dir(path: Path | str) -> Path:
    """``path`` as a directory only its owner can enter; created 0700 (with its missing
    parents), and tightened to 0700 when it exists and is ours."""
    path = Path(path).expanduser()
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for created in missing:
        with contextlib.suppress(OSError):
            created.chmod(0o700)
    info = path.stat()
    if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def secrets_dir(data_dir: Path | str) -> Path:
    return Path(data_dir).expanduser().resolve() / "secrets"


def load_token_secret(data_dir: Path | str, create: bool = True) -> bytes | None:
    """The federation's token secret, made (0600) when missing and ``create``; None when
    it is missing and not to be made."""
    folder = secrets_dir(data_dir)
    path = folder / "token.key"
    if not path.exists():
        if not create:
            return None
        try:
            _create_secret(folder, path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot create the token secret ({exc.strerror or exc}); "
                              f"check that {folder.parent} is a folder you can write") from None
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("%s was readable by others; making it private (0600)", path)
        path.chmod(0o600)
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a fedray token secret ({exc})") from None
    if len(secret) < SECRET_BYTES:
        raise ConfigError(f"{path}: a token secret has {SECRET_BYTES} bytes, this one "
                          f"{len(secret)}")
    return secret


def _create_secret(folder: Path, path: Path) -> None:
    _private_data_dir(folder.parent)
    private_dir(folder)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made by another process a moment ago
        return
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(SECRET_BYTES) + "\n")


def _private_data_dir(data_dir: Path) -> None:
    """Create the data directory 0700 when it does not exist yet (an existing one is the
    operator's to set)."""
    if not data_dir.exists():
        private_dir(data_dir)


def mark_tokens_issued(data_dir: Path | str) -> None:
    marker = secrets_dir(data_dir) / "tokens-issued"
    try:
        private_dir(marker.parent)
        if not marker.exists():
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError as exc:
        raise ConfigError(f"{marker}: cannot write it ({exc.strerror or exc}); check that "
                          f"{marker.parent} is a folder you can write") from None


def tokens_issued(data_dir: Path | str) -> bool:
    """Whether ``fedray token create`` was ever used for this data directory."""
    return (secrets_dir(data_dir) / "tokens-issued").exists()


def token_bits(token: str) -> float:
    """An upper bound of a token's entropy: its length times the bits per character of
    the smallest usual alphabet that holds it (hex, base64, printable ASCII)."""
    chars = set(token)
    for alphabet in _ALPHABETS:
        if chars <= alphabet:
            return len(token) * math.log2(len(alphabet))
    return len(token) * 8.0


def check_shared_token(token: str | None, env: str) -> None:
    """Refuse a shared token that is guessable; no shared token at all is allowed."""
    if token is None:
        return
    if token_bits(token) < MIN_TOKEN_BITS or len(set(token)) < MIN_TOKEN_DISTINCT:
        raise ConfigError(f"${env} is too weak for a shared token: it needs at least 16 "
                          f"random bytes (32 hex or 22 base64 characters); make one with "
                          f"{GENERATE}")


def hash_token(token: str, secret: bytes) -> str:
    """The keyed hash a token is stored and looked up as."""
    return hmac.new(secret, b"fedray-token\0" + token.encode(), hashlib.sha256).hexdigest()


KINDS = ("token", "key", "shared")  # a client's bearer token, a client's public key, a
# shared token (any name, like $FEDRAY_TOKEN, but with an expiry and revocable)


@dataclass(frozen=True)
class TokenRow:
    """One credential row of tracking's ``tokens`` collection, as a server reads it.

    ``hash`` is the keyed hash of a token (kinds ``token`` and ``shared``) or the
    fingerprint of a public key (kind ``key``, ``public_key`` its 32 bytes in hex);
    ``expires_at`` is a Unix time (None: never). The MAC binds all of it to ``name``."""

    hash: str
    name: str
    revoked: bool = False
    mac: str = field(default="", repr=False)
    kind: str = "token"
    public_key: str = ""
    expires_at: float | None = None

    def terms(self) -> str:
        """What the MAC covers beyond hash and name; "" for a plain token (so rows made
        before kinds and expiries verify as they did)."""
        if self.kind == "token" and not self.public_key and self.expires_at is None:
            return ""
        expires = "" if self.expires_at is None else f"{self.expires_at:.0f}"
        return f"{self.kind}\0{self.public_key}\0{expires}"

    def signed(self, secret: bytes) -> TokenRow:
        return dataclasses.replace(self, mac=row_mac(secret, self.hash, self.name, self.terms()))

    def verifies(self, secret: bytes | None) -> bool:
        return verifies(secret, self.hash, self.name, self.mac, self.terms())


def row_mac(secret: bytes, digest: str, name: str, terms: str = "") -> str:
    """What binds a stored hash (and its terms: kind, key, expiry) to its client's name."""
    text = f"fedray-row\0{digest}\0{name}" + (f"\0{terms}" if terms else "")
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def verifies(secret: bytes | None, digest: str, name: str, mac: str, terms: str = "") -> bool:
    """Whether a stored token row is one this federation's secret vouches for."""
    return secret is not None and hmac.compare_digest(mac, row_mac(secret, digest, name, terms))


def federation_id(secret: bytes) -> str:
    """A public name of the federation that holds ``secret``: credential bundles carry it,
    so a server can tell a client that its credential is another federation's."""
    return hmac.new(secret, b"fedray-federation-id", hashlib.sha256).hexdigest()[:16]
