"""TLS for the bridge: certificate files in, gRPC credentials out, for both ends.

The server side (gateway and combiners) reads ``tls.cert``/``tls.key`` (and ``tls.ca`` for
mutual TLS) once, on the driver, and ships the PEM bytes to the actors, so a Ray cluster's
nodes need no copy of the files. The edge side builds channel credentials from ``--ca``
(and ``--cert``/``--key`` for mutual TLS) and always verifies the server's certificate.
A missing or unreadable file stops everything with a ``ConfigError`` naming the field or
option. This module imports only grpc, so the edge can use it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from fedray.errors import ConfigError

if TYPE_CHECKING:
    from fedray.config import TlsConfig

_CERT = b"-----BEGIN CERTIFICATE-----"
_KEY = b"PRIVATE KEY-----"


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes a server needs; ``ca`` set means client certificates are checked."""

    cert: bytes
    key: bytes = field(repr=False)  # a private key: never in logs or tracebacks
    ca: bytes | None = None
    require_client_cert: bool = False

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=self.require_client_cert)


@dataclass(frozen=True)
class ClientTls:
    """How an edge client dials: verify the server against ``ca`` (None: the system's
    trusted roots), and present ``cert``/``key`` when the federation asks for mutual TLS."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)  # a private key: never in logs
    server_name: str = ""  # the name the server certificate must carry, if not the host dialed

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    @classmethod
    def from_files(cls, ca: str | None = None, cert: str | None = None, key: str | None = None,
                   server_name: str = "") -> ClientTls:
        """TLS from PEM files, e.g. ``ClientTls.from_files(ca="ca.pem")``; no ``ca``: the
        system's trusted roots."""
        tls = client_tls(ca, cert, key, server_name, system_roots=True)
        assert tls is not None
        return tls


def read_pem(path: str | Path, where: str, kind: str = "certificate") -> bytes:
    """The bytes of a PEM file; ``where`` names the config field or option for errors."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.strerror or exc})") from None
    marker = _KEY if kind == "key" else _CERT
    if marker not in data:
        what = "a PEM private key" if kind == "key" else "a PEM certificate"
        raise ConfigError(f"{where}: {path} is not {what}")
    return data


def server_tls(tls: TlsConfig, source: str = "<dict>") -> ServerTls | None:
    """Read the files ``tls`` names (None when TLS is off); errors name the field."""
    def bad(field: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: tls.{field} {why}")

    if tls.cert is None and tls.key is None:
        if tls.ca is not None or tls.client_auth:
            raise bad("cert", "and tls.key are needed for tls.ca / tls.client_auth")
        return None
    if tls.cert is None or tls.key is None:
        raise bad("key" if tls.key is None else "cert", "must be set together with "
                  f"tls.{'cert' if tls.key is None else 'key'}")
    require = tls.client_auth if tls.client_auth is not None else tls.ca is not None
    if require and tls.ca is None:
        raise bad("client_auth", "needs tls.ca (the CA that signs client certificates)")

    def pem(field: str, path: str, kind: str = "certificate") -> bytes:
        try:
            return read_pem(path, f"tls.{field}", kind)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    material = ServerTls(cert=pem("cert", tls.cert), key=pem("key", tls.key, "key"),
                         ca=pem("ca", tls.ca) if tls.ca else None, require_client_cert=require)
    try:
        check_pair(tls.cert, tls.key, "tls.key", "tls.cert")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return material


def check_pair(cert: str, key: str, key_where: str, cert_where: str) -> None:
    """Refuse a key that does not belong to the certificate (or is encrypted) now, rather
    than as an obscure failure to bind or to connect later."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(Path(cert).expanduser(), Path(key).expanduser(),
                                password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        why = getattr(exc, "reason", None) or str(exc)
        raise ConfigError(f"{key_where}: {key} is not the unencrypted private key of "
                          f"{cert_where} {cert} ({why})") from None


def client_tls(ca: str | None = None, cert: str | None = None, key: str | None = None,
               server_name: str = "", system_roots: bool = False) -> ClientTls | None:
    """Edge TLS from CLI paths (None: plaintext); errors name the option."""
    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together (the client certificate and its key)")
    if ca is None and cert is None and not system_roots and not server_name:
        return None
    tls = ClientTls(ca=read_pem(ca, "--ca") if ca else None,
                    cert=read_pem(cert, "--cert") if cert else None,
                    key=read_pem(key, "--key", "key") if key else None,
                    server_name=server_name)
    if cert is not None and key is not None:
        check_pair(cert, key, "--key", "--cert")
    return tls
