"""Throw-away TLS certificates for local test servers: a CA, a server and a client certificate.

Made with the ``cryptography`` package (``pip install memsess[crypto]``), imported only when
:func:`make_test_certs` runs. EC P-256 keys: a full set takes a few milliseconds. For tests
only: the private keys are written unencrypted and the CA signs anything it is asked to.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["TestCerts", "make_test_certs"]

#: The server certificate's names: what a client connecting to a local server checks.
LOCAL_HOSTS: Final = ("localhost", "127.0.0.1", "::1")
_NOT_BEFORE: Final = datetime.timedelta(days=1)  # clock skew between machines is no concern
_NOT_AFTER: Final = datetime.timedelta(days=30)
_CRYPTO_HINT: Final = (
    "TLS test certificates need the 'cryptography' package: pip install memsess[crypto]"
)


@dataclass(frozen=True)
class TestCerts:
    """Paths of the PEM files :func:`make_test_certs` wrote."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    ca: str  # the CA certificate: what clients trust, and the server trusts for client certs
    server_cert: str  # for localhost, 127.0.0.1 and ::1
    server_key: str
    client_cert: str  # signed by the same CA
    client_key: str


def make_test_certs(
    directory: str | os.PathLike[str], *, hosts: Sequence[str] = LOCAL_HOSTS
) -> TestCerts:
    """Write a fresh CA, server and client certificate with their keys into ``directory``.

    Files: ``ca.pem``, ``server.pem``, ``server.key``, ``client.pem``, ``client.key``
    (keys unencrypted PKCS#8, mode 0600; ``directory`` is created if need be). The server
    certificate names ``hosts`` (IP addresses as IP SANs, others as DNS SANs; default
    ``localhost``, 127.0.0.1 and ::1). Valid from a day ago to 30 days from now. Raises
    ImportError naming ``pip install memsess[crypto]`` without the ``cryptography`` package.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise ImportError(_CRYPTO_HINT) from exc

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "memsess tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    def builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _NOT_BEFORE)
            .not_valid_after(now + _NOT_AFTER)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )

    def leaf(
        common_name: str, usage: x509.ObjectIdentifier, names: list[x509.GeneralName] | None
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(name(common_name), key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if names:
            cert = cert.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return cert.sign(ca_key, hashes.SHA256()), key

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("memsess test CA")
    ca_cert = (
        builder(ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            server_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            server_names.append(x509.DNSName(host))
    server_cert, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, server_names)
    client_cert, client_key = leaf("memsess test client", ExtendedKeyUsageOID.CLIENT_AUTH, None)

    os.makedirs(directory, exist_ok=True)
    certs = TestCerts(
        *(
            os.path.join(directory, file)
            for file in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
        )
    )

    def write(path: str, data: bytes, mode: int) -> None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    pem = serialization.Encoding.PEM
    write(certs.ca, ca_cert.public_bytes(pem), 0o644)
    write(certs.server_cert, server_cert.public_bytes(pem), 0o644)
    write(certs.server_key, key_pem(server_key), 0o600)
    write(certs.client_cert, client_cert.public_bytes(pem), 0o644)
    write(certs.client_key, key_pem(client_key), 0o600)
    return certs
