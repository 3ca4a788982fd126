"""A throwaway PKI for the TLS tests, made with the ``cryptography`` package: a CA, a server
certificate for 127.0.0.1 and localhost, a client certificate from the same CA, and a
second CA (with a client certificate of its own) that nobody trusts."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fedray.bridge.tls import ClientTls


@dataclass
class Pki:
    folder: Path
    ca: bytes  # the federation's CA (signs the server and the good client)
    other_ca: bytes  # a CA nobody trusts

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def client(self, ca: bytes | None = None, cert: str | None = None) -> ClientTls:
        return ClientTls(ca=self.ca if ca is None else ca,
                         cert=self.read(f"{cert}.pem") if cert else None,
                         key=self.read(f"{cert}.key") if cert else None)


def make_pki(folder: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(cn: str, issuer: tuple | None, *, usage=None, san: bool = False):
        key = ec.generate_private_key(ec.SECP256R1())
        signer_key, signer_name = issuer if issuer else (key, name(cn))
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(signer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5))
                   .not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None),
                                  critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False))
        if issuer is None:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        cert = builder.sign(signer_key, hashes.SHA256())
        return key, cert

    def write(stem: str, key, cert) -> None:
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    ca_key, ca_cert = issue("fedray test CA", None)
    other_key, other_cert = issue("someone else's CA", None)
    write("ca", ca_key, ca_cert)
    write("other-ca", other_key, other_cert)
    write("server", *issue("fedray server", (ca_key, ca_cert.subject),
                           usage=ExtendedKeyUsageOID.SERVER_AUTH, san=True))
    write("client", *issue("site-a", (ca_key, ca_cert.subject),
                           usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    write("rogue", *issue("rogue", (other_key, other_cert.subject),
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    return Pki(folder, (folder / "ca.pem").read_bytes(), (folder / "other-ca.pem").read_bytes())
