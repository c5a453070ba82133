"""Certificates and server contexts.

Two ways to get a server :class:`OpenSSL.SSL.Context`: from PEM files
(:func:`server_context`), or from a throw-away self-signed certificate made in
memory (:func:`self_signed`) so ``make run`` works on a fresh machine with no
files at all.  Both report problems as :class:`CertificateError` with one
readable sentence, which the CLIs print as their single line of stderr.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from .errors import TLSUVError, describe_openssl_error

# Long enough for any test or demo session, short enough that a leaked
# throw-away certificate is worthless soon.
SELF_SIGNED_DAYS: Final = 30

DEFAULT_NAMES: Final = ("localhost", "127.0.0.1", "::1")

# The key types OpenSSL can serve TLS with through pyOpenSSL.
_SERVER_KEY_TYPES: Final = (
    rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)


class CertificateError(TLSUVError):
    """A certificate or key could not be loaded or does not fit."""


@dataclass(frozen=True)
class CertificateBundle:
    """A certificate and its key, as PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 fingerprint, colon-separated upper-case hex (as ``openssl x509 -fingerprint``)."""
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def self_signed(names: tuple[str, ...] = DEFAULT_NAMES) -> CertificateBundle:
    """Make an ECDSA P-256 self-signed certificate for ``names`` (host names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertificateBundle(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def load_bundle(cert_file: str | Path, key_file: str | Path) -> CertificateBundle:
    """Read a PEM certificate (chain) and key, with one-line errors."""
    return CertificateBundle(read_file(cert_file, "certificate"), read_file(key_file, "key"))


def read_file(path: str | Path, what: str) -> bytes:
    """A PEM file's bytes; a missing or unreadable file is a one-line :class:`CertificateError`."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise CertificateError(f"{what} file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise CertificateError(f"{what} file is a directory: {path}") from exc
    except OSError as exc:
        raise CertificateError(f"cannot read {what} file {path}: {exc.strerror}") from exc


def new_context() -> SSL.Context:
    """A server context with safe defaults: TLS 1.2 or newer."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    # TLS 1.0/1.1 are deprecated by RFC 8996.
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    # No TLS-level compression (CRIME).  OpenSSL 3 also refuses client
    # renegotiation unless asked: see tls.OP_ALLOW_CLIENT_RENEGOTIATION.
    ctx.set_options(SSL.OP_NO_COMPRESSION)
    return ctx


def server_context(bundle: CertificateBundle, ctx: SSL.Context | None = None) -> SSL.Context:
    """Load ``bundle`` into ``ctx`` (a new one by default) and check that key and certificate match."""
    ctx = ctx or new_context()
    try:
        certs = x509.load_pem_x509_certificates(bundle.cert_pem)
    except ValueError as exc:
        raise CertificateError("certificate file holds no valid PEM certificate") from exc
    try:
        key = serialization.load_pem_private_key(bundle.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"key file holds no valid unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, _SERVER_KEY_TYPES):
        raise CertificateError(f"unsupported private key type: {type(key).__name__}")
    try:
        ctx.use_certificate(certs[0])
        for extra in certs[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise CertificateError(f"key does not match the certificate ({describe_openssl_error(exc)})") from exc
    return ctx
