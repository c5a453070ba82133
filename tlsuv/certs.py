"""Certificates and server contexts.

Two ways to get a server :class:`OpenSSL.SSL.Context`: from PEM files
(:func:`server_context`), or from a throw-away self-signed certificate made in
memory (:func:`self_signed`) so ``make run`` works on a fresh machine with no
files at all.  Both report problems as :class:`CertificateError` with one
readable sentence, which the CLIs print as their single line of stderr; a
bundle read from files names them in that sentence, so a failed reload says
which file is wrong.

A file being replaced while it is read is the common failure of a reload, and
PEM hides it: a chain cut after its first certificate still parses, as one
certificate, and the intermediate is silently gone.  :func:`server_context`
therefore counts the certificates that begin and refuses a file in which not
all of them parse.

:func:`describe_certificate` and :func:`log_certificate` say what is served
(subject, names, expiry) and warn :data:`EXPIRY_WARNING` ahead of the end.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from . import profiles
from .errors import TLSUVError, describe_openssl_error

# Long enough for any test or demo session, short enough that a leaked
# throw-away certificate is worthless soon.
SELF_SIGNED_DAYS: Final = 30

DEFAULT_NAMES: Final = ("localhost", "127.0.0.1", "::1")

# Renewal tools renew 30 days ahead (certbot, acme.sh, cert-manager's default
# is two thirds of the lifetime); a certificate still served two weeks before
# it ends means renewal or the reload after it failed, and two weeks leave
# time to notice and fix it.
EXPIRY_WARNING: Final = datetime.timedelta(days=14)

# Where a certificate's PEM block starts, in the two labels cryptography reads
# (RFC 7468 section 5.1 and its legacy form): counted to catch a chain cut short
# (module docstring).  Other blocks (a key in a combined file) are not counted.
_PEM_CERT_BEGINS: Final = (b"-----BEGIN CERTIFICATE-----", b"-----BEGIN X509 CERTIFICATE-----")

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
    # Where they were read from (load_bundle), for error messages; not part of equality.
    cert_file: str | None = field(default=None, compare=False)
    key_file: str | None = field(default=None, compare=False)

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
    return CertificateBundle(read_file(cert_file, "certificate"), read_file(key_file, "key"),
                             cert_file=str(cert_file), key_file=str(key_file))


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


def new_context(profile: str = profiles.DEFAULT_PROFILE) -> SSL.Context:
    """A server context with safe defaults: a Server Side TLS profile, intermediate by default.

    Intermediate is TLS 1.2 and 1.3 with forward-secret AEAD suites only
    (:mod:`tlsuv.profiles`).
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    # No TLS-level compression (CRIME).  OpenSSL 3 also refuses client
    # renegotiation unless asked: see tls.OP_ALLOW_CLIENT_RENEGOTIATION.
    ctx.set_options(SSL.OP_NO_COMPRESSION)
    profiles.apply(ctx, profile, server=True)
    return ctx


def server_context(bundle: CertificateBundle, ctx: SSL.Context | None = None) -> SSL.Context:
    """Load ``bundle`` into ``ctx`` (a new one by default) and check that key and certificate match."""
    ctx = ctx or new_context()
    certs = certificate_chain(bundle)
    cert_file = f"certificate file {bundle.cert_file}" if bundle.cert_file else "certificate"
    key_file = f"key file {bundle.key_file}" if bundle.key_file else "key file"
    try:
        key = serialization.load_pem_private_key(bundle.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        # cryptography appends a FAQ link to its PEM errors: one line is enough.
        detail = str(exc).split(" See https://", 1)[0]
        raise CertificateError(f"{key_file} holds no valid unencrypted PEM private key ({detail})") from exc
    if not isinstance(key, _SERVER_KEY_TYPES):
        raise CertificateError(f"{key_file}: unsupported private key type: {type(key).__name__}")
    try:
        ctx.use_certificate(certs[0])
        for extra in certs[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except SSL.Error as exc:
        where = f" ({key_file}, {cert_file})" if bundle.key_file else ""
        raise CertificateError(f"key does not match the certificate{where}: "
                               f"{describe_openssl_error(exc)}") from exc
    return ctx


def certificate_chain(bundle: CertificateBundle) -> list[x509.Certificate]:
    """The bundle's certificates, server first; every PEM block must parse (module docstring)."""
    what = f"certificate file {bundle.cert_file}" if bundle.cert_file else "certificate file"
    return parse_certificates(bundle.cert_pem, what)


def parse_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate of PEM ``data``; :class:`CertificateError` naming ``what`` if any block is bad."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(f"{what} holds no valid PEM certificate") from exc
    blocks = sum(data.count(label) for label in _PEM_CERT_BEGINS)
    if blocks != len(certs):
        raise CertificateError(f"{what} is damaged or incomplete: {blocks} certificates begin but "
                               f"{len(certs)} certificate(s) parse (a half-written file?)")
    return certs


# -- what is served ---------------------------------------------------------------


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses of the subjectAltName extension, in order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


def covers(cert: x509.Certificate, name: str) -> bool:
    """Whether the certificate is valid for host ``name`` (lower case, A-labels) or the same wildcard.

    RFC 6125 matching, as clients do it: exact, or ``*.example.com`` for one
    label; the subject's CN is not consulted (browsers stopped in 2017).
    """
    name = name.lower()
    for dns in (n.lower().rstrip(".") for n in certificate_names(cert)):
        if dns == name:
            return True
        if dns.startswith("*.") and not name.startswith("*.") and "." in name \
                and name.split(".", 1)[1] == dns[2:]:
            return True
    return False


def describe_certificate(cert: x509.Certificate, now: datetime.datetime | None = None) -> str:
    """One line: subject, names, end of validity and days left."""
    now = now or datetime.datetime.now(datetime.UTC)
    ends = cert.not_valid_after_utc
    left = (ends - now).total_seconds() / 86400
    names = ", ".join(certificate_names(cert)) or "none"
    return (f"subject {cert.subject.rfc4514_string() or '(empty)'}, names {names}, "
            f"valid until {ends:%Y-%m-%d %H:%M} UTC ({left:.1f} days)")


def expires_soon(cert: x509.Certificate, now: datetime.datetime | None = None) -> bool:
    """Whether ``cert`` has ended or ends within :data:`EXPIRY_WARNING`."""
    now = now or datetime.datetime.now(datetime.UTC)
    return cert.not_valid_after_utc - now <= EXPIRY_WARNING


def log_certificate(log: logging.Logger, role: str, cert: x509.Certificate,
                    now: datetime.datetime | None = None) -> bool:
    """Log what ``role`` serves; a warning instead if it ends within :data:`EXPIRY_WARNING`.

    Returns True when it warned.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    text = describe_certificate(cert, now)
    left = cert.not_valid_after_utc - now
    if left <= datetime.timedelta(0):
        log.warning("%s: certificate EXPIRED, clients will refuse it: %s", role, text)
        return True
    if left <= EXPIRY_WARNING:
        log.warning("%s: certificate expires in %d day(s), renew it: %s", role, left.days, text)
        return True
    log.info("%s: %s", role, text)
    return False
