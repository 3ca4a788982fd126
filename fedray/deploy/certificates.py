"""The federation's own CA and server certificate: TLS with nothing to set up.

When a bridge binds anything but loopback and the config names no ``tls.cert``,
``fedray run`` serves TLS with a certificate its own CA signed. Both live in
``<data_dir>/tls/`` (0700; keys 0600):

    ca.pem, ca.key          the federation's CA (ECDSA P-256, 10 years), made once
    server.pem, server.key  the gateway's and combiners' certificate (1 year), made again
                            when it lacks a host clients dial, nears its end, or another
                            CA signed it

Credential bundles (``fedray client add``) carry ``ca.pem``, so clients verify the
servers with no file to copy. The server certificate names every address clients may
dial: loopback, this machine's names and addresses, the configured hosts, and each Ray
node's address (combiners advertise their node's).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
from collections.abc import Iterable
from pathlib import Path

from fedray.bridge.addresses import primary_ip
from fedray.bridge.keys import private_dir
from fedray.bridge.tls import ServerTls
from fedray.errors import ConfigError

CA_DAYS, SERVER_DAYS, RENEW_DAYS = 3650, 365, 30
WILDCARDS = {"", "0.0.0.0", "::", "[::]", "*"}


def tls_dir(data_dir: Path | str) -> Path:
    return Path(data_dir).expanduser().resolve() / "tls"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def federation_ca(data_dir: Path | str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of the federation's CA, made on first use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tls_dir(data_dir)
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    if cert_path.exists() and key_path.exists():
        return _read(cert_path), _read(key_path)
    try:
        private_dir(folder)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"fedray federation CA {os.urandom(4).hex()}")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(minutes=5))
                .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False),
                    critical=True)
                .sign(key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        _write_private(key_path, key_pem)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot write the federation's CA "
                          f"({exc.strerror or exc})") from None
    return _read(cert_path), _read(key_path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def dialable_hosts(configured: Iterable[str]) -> list[str]:
    """Every name and address clients may dial this federation's servers by."""
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn(),
             primary_ip()]
    hosts += [h.strip("[]") for h in configured if h.strip("[]") not in WILDCARDS
              and h != "auto"]
    with contextlib.suppress(OSError):  # a host name that does not resolve: no addresses
        hosts += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
    return sorted({h for h in hosts if h}, key=lambda h: (h.count(":"), h))


def _san(hosts: Iterable[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.split("%", 1)[0])))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def server_tls_for(data_dir: Path | str, hosts: Iterable[str]) -> ServerTls:
    """The federation's server certificate for ``hosts`` (``dialable_hosts``), reused
    while it covers them and is not near its end, else issued again by its CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_pem, ca_key_pem = federation_ca(data_dir)
    folder = tls_dir(data_dir)
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    wanted = set(_san(hosts))
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(_read(cert_path))
        ca = x509.load_pem_x509_certificate(ca_pem)
        try:
            covered = set(cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            covered = set()
        fresh = cert.not_valid_after_utc - _now() > datetime.timedelta(days=RENEW_DAYS)
        if wanted <= covered and fresh and cert.issuer == ca.subject:
            return ServerTls(cert=_read(cert_path), key=_read(key_path))
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedray bridge")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(sorted(wanted, key=str)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM) + ca_pem
    try:
        _write_private(key_path, key_pem)
        cert_path.write_bytes(cert_pem)
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot write the server certificate "
                          f"({exc.strerror or exc})") from None
    return ServerTls(cert=cert_pem, key=key_pem)
