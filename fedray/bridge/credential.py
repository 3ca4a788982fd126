"""A client's credential bundle: one file that is everything a site needs to join.

``fedray client add NAME`` writes it (mode 0600) and registers its public key with the
federation; ``fedray edge start --credentials FILE`` (or ``$FEDRAY_CREDENTIALS``) reads
it. It holds the client's name, its Ed25519 private key (``fedray.bridge.identity``), the
federation's id, the gateway address clients dial and the CA certificate that signs the
federation's server certificates. Nothing in it is a secret of the federation: a stolen
bundle lets its thief act as that one client until ``fedray client revoke NAME``, and
nothing more. JSON, so an operator can read what it says (all but the key).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedray.bridge.identity import CallSigner, ClientKey
from fedray.bridge.tls import ClientTls
from fedray.errors import ConfigError

FORMAT = "fedray-credential/1"
MAX_BYTES = 64 * 1024  # a bundle is ~1 KiB (a CA certificate and a key)
ENV = "FEDRAY_CREDENTIALS"


@dataclass(frozen=True)
class CredentialBundle:
    name: str
    federation: str  # the federation's id (``fedray.bridge.keys.federation_id``)
    key: ClientKey = field(repr=False)
    gateway: str = ""  # HOST:PORT, or "" when the operator did not say
    ca: bytes | None = None  # PEM: the federation's CA (None: its servers are plaintext or
    # use certificates the system trusts)
    attrs: dict[str, str] = field(default_factory=dict)
    label: str = ""  # the federation's name in its config, for messages

    def signer(self) -> CallSigner:
        return CallSigner(self.key, self.federation)

    def tls(self, server_name: str = "") -> ClientTls | None:
        return ClientTls(ca=self.ca, server_name=server_name) if self.ca else None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": FORMAT, "name": self.name,
                               "federation": self.federation, "label": self.label,
                               "gateway": self.gateway, "attrs": dict(self.attrs),
                               "private_key": self.key.hex()}
        if self.ca is not None:
            doc["ca"] = self.ca.decode()
        return doc

    def write(self, path: Path, force: bool = False) -> None:
        """Write the bundle 0600 (never over an existing file unless ``force``)."""
        data = json.dumps(self.to_json(), indent=2).encode() + b"\n"
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise ConfigError(f"{path} exists; choose another -o FILE or pass --force") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot write it ({exc.strerror or exc})") from None
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(data)


def read_bundle(path: str | Path, where: str = "--credentials") -> CredentialBundle:
    """The bundle at ``path``; refused (``ConfigError`` naming ``where``) when it is
    missing, readable by others, or not a bundle."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
        if info.st_size > MAX_BYTES:
            raise ConfigError(f"{where}: {path} is {info.st_size} bytes, not a fedray "
                              "credential bundle (fedray client add writes one)")
        if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.getuid():
            raise ConfigError(f"{where}: {path} holds a private key and others can read it; "
                              f"run chmod 600 {path}")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.strerror or exc})") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{where}: {path} is not a fedray credential bundle "
                          "(fedray client add NAME -o FILE writes one)")

    def text(key: str, required: bool = True) -> str:
        value = doc.get(key, "")
        if not isinstance(value, str) or (required and not value):
            raise ConfigError(f"{where}: {path}: {key!r} is missing or not a string")
        return value

    attrs = doc.get("attrs") or {}
    if not isinstance(attrs, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in attrs.items()):
        raise ConfigError(f"{where}: {path}: 'attrs' must map strings to strings")
    ca = text("ca", required=False)
    if ca and "-----BEGIN CERTIFICATE-----" not in ca:
        raise ConfigError(f"{where}: {path}: 'ca' is not a PEM certificate")
    return CredentialBundle(name=text("name"), federation=text("federation"),
                            key=ClientKey.from_hex(text("private_key"), f"{where}: {path}"),
                            gateway=text("gateway", required=False), ca=ca.encode() or None,
                            attrs=dict(attrs), label=text("label", required=False))
