"""TLS policy: turn plain options into a ready :class:`OpenSSL.SSL.Context`.

:class:`~tlsuv.Server` takes a Context and does not care how it was made;
this module makes one from a :class:`ServerPolicy` (and the client's from
:func:`build_client_context`), so that SNI, ALPN, client certificates,
session resumption, protocol versions, ciphers and a key-log file are one
dataclass away -- and one flag away on ``python -m tlsuv.echo``
(:func:`add_arguments`, :func:`context_from_args`).

Design points
=============

* **A profile first, then single settings.**  Every Context starts from a
  Server Side TLS profile (:mod:`tlsuv.profiles`; intermediate unless
  ``profile`` says otherwise): versions, ciphers, TLS 1.3 suites, groups and
  cipher order.  ``min_version``, ``max_version``, ``ciphers`` and
  ``ciphersuites`` are applied on top of it, so an explicit setting always
  wins over the profile's, and ``None`` means "the profile's".

* **Every Context is built completely up front.**  pyOpenSSL refuses to
  change a Context once a Connection was made from it, so SNI cannot load a
  certificate on demand: :func:`build_server_context` builds one Context per
  name, each with the *same* settings (ALPN, verification, session id
  context, key log...) and its own certificate, and the default Context's
  servername callback switches a connection to the matching one.  OpenSSL
  reads the ALPN and key-log callbacks from whichever Context the connection
  has at that moment, which is why all of them carry the same callbacks.

* **Swapping certificates while serving** (:class:`ContextSet`).  The same
  mechanism reloads: connections are always made from one *front* Context
  that never changes, and its servername callback -- which OpenSSL runs for
  every ClientHello, with or without SNI -- switches each connection to the
  *current* default or SNI Context.  A swap replaces that table in one
  assignment; a connection already made keeps its Context.  The front is
  kept because OpenSSL ties two things to the Context a connection was
  created from (its ``session_ctx``), not to the one SNI switched to: the
  session cache and the session-ticket keys.  Tickets therefore stay valid
  across swaps, and workers forked after the front was made share its keys
  for good.  (Copying the keys into a new Context would need
  ``SSL_CTX_set_tlsext_ticket_keys`` -- a macro over ``SSL_CTX_ctrl`` -- or a
  ticket-key callback; pyOpenSSL's binding exposes neither.)  OpenSSL also
  copies some settings (options, verify mode, protocol versions) from the
  front when a connection is created, which is why a swap must bring
  Contexts built with the same settings: :meth:`ContextSet.reload` checks
  that.

* **ALPN with no protocol in common fails the handshake** with the
  ``no_application_protocol`` alert, as RFC 7301 section 3.2 requires.  A
  client that offers no ALPN at all is served without it.

* **Client certificates** are verified against ``client_ca``; "optional"
  means a client may send none, but one that is sent must verify.  The
  names of the CA file's certificates are sent in the CertificateRequest so
  clients can pick the right certificate.

* **Resumption** works out of the box: OpenSSL's server session cache (TLS
  1.2 session IDs, TLS 1.3 stateful tickets) and session tickets (TLS 1.2
  RFC 5077, TLS 1.3 stateless tickets) are on, and the session id context
  is set -- without it OpenSSL refuses to resume any session once client
  certificates are verified.  Ticket keys are random per front Context (see
  above): sessions resume on the process that issued them and on every
  worker forked from it, across certificate reloads, until the process ends.

* **Errors are one sentence** (:class:`PolicyError`, or
  :class:`~tlsuv.certs.CertificateError` for files), which the CLIs print as
  their single line of stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from cryptography import x509
from OpenSSL import SSL, crypto

from . import profiles
from .certs import (
    CertificateBundle,
    CertificateError,
    certificate_chain,
    certificate_names,
    covers,
    load_bundle,
    new_context,
    read_file,
    self_signed,
    server_context,
)
from .errors import TLSUVError

log = logging.getLogger("tlsuv")

# The versions a policy may name.  TLS 1.0 and 1.1 are deprecated (RFC 8996):
# only the "old" profile offers them, because they also need OpenSSL's
# security level lowered (tlsuv.profiles).
VERSIONS: Final[dict[str, int]] = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# SSL_CTX_set_session_id_context: sessions are only resumed by a Context with
# the same value.  The value is arbitrary but must be set (see the module
# docstring); it is at most SSL_MAX_SID_CTX_LENGTH (32) bytes.
SESSION_ID_CONTEXT: Final = b"tlsuv"

# RFC 7301 section 3.1: a protocol name is 1 to 255 bytes.
MAX_ALPN_LENGTH: Final = 255

# SSLKEYLOGFILE holds the secrets that decrypt every logged session: readable
# by its owner only.
KEYLOG_MODE: Final = 0o600


class PolicyError(TLSUVError):
    """An option does not make a usable TLS configuration (bad cipher list, versions...)."""


class NoApplicationProtocol(SSL.Error):
    """ALPN found no protocol in common (RFC 7301 section 3.2).

    A subclass of :class:`OpenSSL.SSL.Error` on purpose: pyOpenSSL re-raises
    what the ALPN callback raised from the ``recv`` that drove the handshake,
    and the TLS engine turns every ``SSL.Error`` into a ``HandshakeError``.
    Raising makes pyOpenSSL return ``SSL_TLSEXT_ERR_ALERT_FATAL``, so OpenSSL
    sends ``no_application_protocol``; returning ``NO_OVERLAPPING_PROTOCOLS``
    would continue without ALPN instead.
    """


@dataclass(frozen=True)
class ServerPolicy:
    """What a server's TLS should look like.  Every field has a safe default."""

    # The default certificate; None makes a throw-away self-signed one for localhost.
    certificate: CertificateBundle | None = None
    # SNI: host name (or "*.example.com") -> certificate; other names get the default.
    sni: Mapping[str, CertificateBundle] = field(default_factory=dict)
    # ALPN protocols in the server's order of preference, e.g. ("h2", "http/1.1").
    alpn: Sequence[str] = ()
    # Request client certificates and verify them against this PEM CA file
    # (or these PEM bytes: a reload loads exactly what it read and hashed).
    client_ca: str | Path | bytes | None = None
    # Refuse clients that send no certificate (needs client_ca).
    require_client_cert: bool = False
    # Server Side TLS profile: "modern", "intermediate" or "old" (tlsuv.profiles).
    profile: str = profiles.DEFAULT_PROFILE
    # The four below override the profile's value; None keeps it.
    min_version: str | None = None
    max_version: str | None = None
    # OpenSSL cipher string for TLS 1.2 ("ECDHE+AESGCM:ECDHE+CHACHA20").
    ciphers: str | None = None
    # TLS 1.3 suites, colon-separated ("TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256").
    ciphersuites: str | None = None
    # Append TLS secrets here in NSS SSLKEYLOGFILE format (Wireshark).
    keylog: str | Path | None = None
    session_tickets: bool = True
    session_cache: bool = True
    # Seconds a session stays resumable; None keeps OpenSSL's default (7200 since OpenSSL 1.1.1).
    session_timeout: int | None = None


# -- validation shared by both sides -------------------------------------------


def parse_version(text: str | None, what: str = "TLS version") -> int | None:
    if text is None:
        return None
    try:
        return VERSIONS[text]
    except KeyError:
        raise PolicyError(f"{what} must be one of {', '.join(VERSIONS)}, not {text!r}") from None


def parse_alpn(protocols: Sequence[str] | str) -> tuple[str, ...]:
    """Validate ALPN names: a list, or one comma-separated string."""
    items = protocols.split(",") if isinstance(protocols, str) else list(protocols)
    out: list[str] = []
    for raw in items:
        name = raw.strip()
        try:
            encoded = name.encode("ascii")
        except UnicodeEncodeError:
            raise PolicyError(f"ALPN protocol names are ASCII: {name!r}") from None
        if not 1 <= len(encoded) <= MAX_ALPN_LENGTH:
            raise PolicyError(f"ALPN protocol names are 1-{MAX_ALPN_LENGTH} bytes: {name!r}")
        out.append(name)
    if not out:
        raise PolicyError("ALPN needs at least one protocol")
    return tuple(out)


def normalize_server_name(name: str) -> str:
    """Lower case, no trailing dot: how SNI names are compared (RFC 6066 section 3)."""
    return name.strip().rstrip(".").lower()


def _check_sni_name(name: str) -> str:
    norm = normalize_server_name(name)
    labels = norm[2:].split(".") if norm.startswith("*.") else norm.split(".")
    if not norm or "*" in ".".join(labels) or not all(labels):
        raise PolicyError(f"not a host name for SNI: {name!r} (use e.g. example.com or *.example.com)")
    # Clients send internationalised names as A-labels (xn--...): compare in that form.
    wildcard, rest = ("*.", norm[2:]) if norm.startswith("*.") else ("", norm)
    try:
        return wildcard + rest.encode("idna").decode("ascii")
    except UnicodeError:
        raise PolicyError(f"not a host name for SNI: {name!r}") from None


def _read_ca_file(path: str | Path | bytes, what: str) -> list[x509.Certificate]:
    if isinstance(path, bytes):
        try:
            return x509.load_pem_x509_certificates(path)
        except ValueError:
            raise CertificateError(f"{what} data holds no valid PEM certificate") from None
    data = read_file(path, what)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{what} file holds no valid PEM certificate: {path}") from None


def get_profile(name: str) -> profiles.Profile:
    try:
        return profiles.get(name)
    except profiles.ProfileError as exc:
        raise PolicyError(str(exc)) from None


def _apply_versions(ctx: SSL.Context, profile: profiles.Profile, min_version: str | None,
                    max_version: str | None) -> None:
    """Override the profile's version limits (already on ``ctx``) with the explicit ones."""
    lo = parse_version(min_version, "minimum TLS version")
    hi = parse_version(max_version, "maximum TLS version")
    # The limits in effect, for the check: the explicit value, else the profile's.
    eff_lo = min_version or profile.min_version
    eff_hi = max_version or profile.max_version
    if eff_hi is not None and profiles.PROTOCOL_VERSIONS[eff_lo] > profiles.PROTOCOL_VERSIONS[eff_hi]:
        def source(explicit: str | None) -> str:
            return "" if explicit else f" (from the {profile.name} profile)"
        raise PolicyError(f"minimum TLS version {eff_lo}{source(min_version)} is above the maximum "
                          f"{eff_hi}{source(max_version)}")
    if lo is not None:
        ctx.set_min_proto_version(lo)
    if hi is not None:
        ctx.set_max_proto_version(hi)


def _apply_ciphers(ctx: SSL.Context, ciphers: str | None, ciphersuites: str | None) -> None:
    if ciphers is not None:
        try:
            ctx.set_cipher_list(ciphers.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError) as exc:
            raise PolicyError(f"no usable TLS 1.2 cipher in {ciphers!r}") from exc
    if ciphersuites is not None:
        names = [n for n in ciphersuites.split(":") if n]
        if not names:
            raise PolicyError("TLS 1.3 ciphersuites cannot be empty (to turn TLS 1.3 off, set the "
                              "maximum version to 1.2)")
        # OpenSSL silently drops unknown names from a list; a typo must not
        # quietly narrow the list, so each name is checked on its own.
        probe = SSL.Context(SSL.TLS_METHOD)
        for name in names:
            try:
                probe.set_tls13_ciphersuites(name.encode("ascii"))
            except (SSL.Error, UnicodeEncodeError) as exc:
                raise PolicyError(f"unknown TLS 1.3 ciphersuite {name!r}") from exc
        ctx.set_tls13_ciphersuites(":".join(names).encode("ascii"))


class KeyLog:
    """Appends TLS secrets to a file in NSS ``SSLKEYLOGFILE`` format, one line per secret.

    Each line is one ``write`` on an ``O_APPEND`` descriptor, so several
    processes (workers) can share the file without interleaving lines.
    The descriptor is closed when the last Context using it is gone.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               KEYLOG_MODE)
        except OSError as exc:
            raise PolicyError(f"cannot open key-log file {path}: {exc.strerror}") from exc
        self._failed = False
        weakref.finalize(self, os.close, self._fd)

    def __call__(self, conn: SSL.Connection, line: bytes) -> None:
        try:
            os.write(self._fd, line + b"\n")
        except OSError as exc:  # a full disk must not break TLS; say so once
            if not self._failed:
                self._failed = True
                log.warning("cannot write key-log file %s: %s", self.path, exc.strerror)

    def install(self, ctx: SSL.Context) -> None:
        ctx.set_keylog_callback(self)


# -- server ------------------------------------------------------------------


def _alpn_selector(preferred: tuple[str, ...]) -> Callable[[SSL.Connection, list[bytes]], bytes]:
    ours = [p.encode("ascii") for p in preferred]

    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
        for proto in ours:
            if proto in offered:
                return proto
        shown = ", ".join(p.decode("ascii", "replace") for p in offered)
        raise NoApplicationProtocol([("tlsuv", "", f"no application protocol in common "
                                      f"(client offered {shown})")])

    return select


def build_server_context(policy: ServerPolicy | None = None) -> SSL.Context:
    """The server Context for ``policy`` (its default certificate; SNI contexts hang off it).

    It is the :attr:`~ContextSet.front` of a :class:`ContextSet`; use
    :func:`build_context_set` to keep the set and swap certificates later.
    """
    return build_context_set(policy).front


def build_context_set(policy: ServerPolicy | None = None) -> ContextSet:
    """Every Context of ``policy``, as a set whose certificates can be swapped while serving."""
    policy = policy or ServerPolicy()
    keylog = KeyLog(policy.keylog) if policy.keylog is not None else None
    default, by_name, policy = _build_contexts(policy, keylog)
    return ContextSet(default, by_name, policy=policy, keylog=keylog)


def _build_contexts(
    policy: ServerPolicy, keylog: KeyLog | None,
) -> tuple[SSL.Context, dict[str, SSL.Context], ServerPolicy]:
    """The default and per-name Contexts, and the policy with its default certificate filled in."""
    if policy.require_client_cert and policy.client_ca is None:
        raise PolicyError("requiring client certificates needs a client CA file")
    alpn = parse_alpn(policy.alpn) if policy.alpn else ()
    # Read once, and loaded from what was read: the file may be replaced meanwhile.
    client_cas = _read_ca_file(policy.client_ca, "client CA") if policy.client_ca is not None else []
    if policy.session_timeout is not None and policy.session_timeout < 1:
        raise PolicyError("session timeout must be at least 1 second")
    sni = {_check_sni_name(name): bundle for name, bundle in policy.sni.items()}
    for name, bundle in sni.items():
        # A certificate that does not name its SNI name is a mix-up (files swapped,
        # a renewal for the wrong host): every client would refuse it.
        try:
            leaf = certificate_chain(bundle)[0]
        except CertificateError as exc:
            raise CertificateError(f"SNI name {name}: {exc}") from exc
        if not covers(leaf, name):
            names = ", ".join(certificate_names(leaf)) or "no DNS names"
            where = f"certificate file {bundle.cert_file}" if bundle.cert_file else "its certificate"
            raise CertificateError(f"SNI name {name}: {where} is for {names}, not {name}")

    profile = get_profile(policy.profile)

    def make(bundle: CertificateBundle) -> SSL.Context:
        ctx = new_context(profile.name)
        _apply_versions(ctx, profile, policy.min_version, policy.max_version)
        _apply_ciphers(ctx, policy.ciphers, policy.ciphersuites)
        ctx.set_session_id(SESSION_ID_CONTEXT)
        if not policy.session_tickets:
            ctx.set_options(SSL.OP_NO_TICKET)
        if not policy.session_cache:
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        if policy.session_timeout is not None:
            ctx.set_timeout(policy.session_timeout)
        if alpn:
            ctx.set_alpn_select_callback(_alpn_selector(alpn))
        if policy.client_ca is not None:
            mode = SSL.VERIFY_PEER
            if policy.require_client_cert:
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            ctx.set_verify(mode)
            store = ctx.get_cert_store()
            assert store is not None  # a server Context always has one
            for ca in client_cas:
                store.add_cert(crypto.X509.from_cryptography(ca))
                ctx.add_client_ca(ca)  # named in the CertificateRequest
        if keylog is not None:
            keylog.install(ctx)
        return server_context(bundle, ctx)

    certificate = policy.certificate or self_signed()
    default = make(certificate)
    by_name: dict[str, SSL.Context] = {}
    for name, bundle in sni.items():
        try:
            by_name[name] = make(bundle)
        except CertificateError as exc:
            raise CertificateError(f"SNI name {name}: {exc}") from exc
    return default, by_name, replace(policy, certificate=certificate, sni=sni)


# Settings OpenSSL takes from the front Context when a connection is made, or
# that the set shares (the key log): a swap may change certificates and CA
# files, not these (the module docstring).
_FIXED_SETTINGS: Final = (
    "alpn", "require_client_cert", "min_version", "max_version", "ciphers", "ciphersuites",
    "keylog", "session_tickets", "session_cache", "session_timeout")


class ContextSet:
    """The Contexts a server serves -- a default and one per SNI name -- swappable while it runs.

    Give :attr:`front` to :class:`~tlsuv.Server` and never change it; then
    :meth:`reload` (from a :class:`ServerPolicy`) or :meth:`swap` (Contexts
    you built) replace every certificate at once.  Connections accepted
    afterwards get the new ones; open connections keep theirs.  Sessions and
    tickets issued before a swap still resume after it (module docstring).
    Call from the loop's thread.
    """

    def __init__(
        self,
        default: SSL.Context,
        sni: Mapping[str, SSL.Context] | None = None,
        *,
        policy: ServerPolicy | None = None,
        keylog: KeyLog | None = None,
    ) -> None:
        # What built the current Contexts, if a policy did: reload() compares
        # settings with it, and served() reads the certificates from it.
        self.policy = policy
        self._keylog = keylog
        self.front = default
        self.swaps = 0
        self._hooked: weakref.WeakSet[SSL.Context] = weakref.WeakSet()
        self._table: tuple[SSL.Context, Mapping[str, SSL.Context]] = (default, {})
        self._install(default, sni or {})

    @property
    def default(self) -> SSL.Context:
        """The Context served to clients whose SNI name has no Context of its own."""
        return self._table[0]

    @property
    def sni(self) -> Mapping[str, SSL.Context]:
        """SNI name (lower case, A-labels, maybe ``*.example.com``) -> its Context."""
        return self._table[1]

    def swap(self, default: SSL.Context, sni: Mapping[str, SSL.Context] | None = None) -> None:
        """Serve ``default`` and the ``sni`` table from the next handshake on, in one step.

        Build them with the settings the front was built with (versions,
        ciphers, verification, ALPN): OpenSSL copies some of those from the
        front.  Unused Contexts only: this installs the SNI callback on them.
        """
        self._install(default, sni or {})
        self.policy = None  # no longer describes what is served
        self.swaps += 1

    def reload(self, policy: ServerPolicy) -> None:
        """Build every Context of ``policy`` and swap them in; on any error nothing changes.

        Raises :class:`PolicyError` if a setting differs from the one the set
        was built with (only certificates, keys and the client CA may change),
        or the errors of :func:`build_server_context`.
        """
        if self.policy is not None:
            changed = [name for name in _FIXED_SETTINGS
                       if getattr(policy, name) != getattr(self.policy, name)]
            if (policy.client_ca is None) != (self.policy.client_ca is None):
                changed.append("client_ca")
            if changed:
                raise PolicyError(f"a reload changes certificates, keys and CA files, not settings: "
                                  f"{', '.join(changed)} differ (restart to change them)")
        if self._keylog is None and policy.keylog is not None:  # a set made by hand, not by policy
            self._keylog = KeyLog(policy.keylog)
        default, by_name, built = _build_contexts(policy, self._keylog)
        self.swap(default, by_name)
        self.policy = built

    def served(self) -> list[tuple[str, x509.Certificate]]:
        """``(role, leaf certificate)`` for each certificate served, when a policy built them."""
        if self.policy is None or self.policy.certificate is None:
            return []
        out = [("default certificate", certificate_chain(self.policy.certificate)[0])]
        out += [(f"SNI {name}", certificate_chain(bundle)[0]) for name, bundle in self.policy.sni.items()]
        return out

    def _install(self, default: SSL.Context, sni: Mapping[str, SSL.Context]) -> None:
        by_name = {_check_sni_name(name): ctx for name, ctx in sni.items()}
        for ctx in (default, *by_name.values()):
            if ctx not in self._hooked:
                # On the per-name Contexts too: a TLS 1.2 renegotiation asks again.
                ctx.set_tlsext_servername_callback(self._choose)
                self._hooked.add(ctx)
        self._table = (default, by_name)  # one assignment: a handshake sees the old or the new

    def _choose(self, conn: SSL.Connection) -> None:
        default, by_name = self._table
        ctx = default
        if by_name:
            raw = conn.get_servername()
            if raw:
                name = normalize_server_name(raw.decode("ascii", "replace"))
                found = by_name.get(name)
                if found is None and "." in name:
                    found = by_name.get("*." + name.split(".", 1)[1])
                if found is not None:
                    ctx = found
        if ctx is not conn.get_context():
            conn.set_context(ctx)


# -- client ------------------------------------------------------------------


def build_client_context(
    *,
    cafile: str | Path | None = None,
    verify: bool = True,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    alpn: Sequence[str] | str | None = None,
    profile: str = profiles.DEFAULT_PROFILE,
    min_version: str | None = None,
    max_version: str | None = None,
    ciphers: str | None = None,
    ciphersuites: str | None = None,
    keylog: str | Path | None = None,
) -> SSL.Context:
    """A client Context: verification on (system CA store, or ``cafile``), optional client cert, ALPN.

    ``profile`` sets what the client offers (versions, ciphers, groups), as
    on the server; ``min_version`` and the others override single settings.
    The host name is checked per connection (:mod:`tlsuv.client`), not here.
    """
    if (cert is None) != (key is None):
        raise PolicyError("a client certificate needs both a certificate and a key file")
    chosen = get_profile(profile)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_options(SSL.OP_NO_COMPRESSION)
    profiles.apply(ctx, chosen, server=False)
    _apply_versions(ctx, chosen, min_version, max_version)
    _apply_ciphers(ctx, ciphers, ciphersuites)
    if verify:
        ctx.set_verify(SSL.VERIFY_PEER)
        if cafile is not None:
            _read_ca_file(cafile, "CA")
            ctx.load_verify_locations(os.fsencode(cafile))
        else:
            ctx.set_default_verify_paths()
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    if cert is not None and key is not None:
        server_context(load_bundle(cert, key), ctx)
    if alpn:
        ctx.set_alpn_protos([p.encode("ascii") for p in parse_alpn(alpn)])
    if keylog is not None:
        KeyLog(keylog).install(ctx)
    return ctx


# -- command line ----------------------------------------------------------------


def alpn_argument(text: str) -> tuple[str, ...]:
    try:
        return parse_alpn(text)
    except PolicyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sni_arg(text: str) -> tuple[str, str, str]:
    parts = text.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected NAME:CERT:KEY, got {text!r}")
    try:
        name = _check_sni_name(parts[0])
    except PolicyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name, parts[1], parts[2]


def add_arguments(parser: argparse.ArgumentParser, *, server: bool = True) -> None:
    """Add the TLS policy flags (server side: all of them; client side: versions, ciphers, key log)."""
    if server:
        parser.add_argument("--alpn", type=alpn_argument, metavar="PROTO[,PROTO...]",
                            help="ALPN protocols, most preferred first; a client offering none of "
                                 "them is refused")
        parser.add_argument("--client-ca", metavar="FILE",
                            help="request client certificates and verify them against this PEM CA file")
        parser.add_argument("--require-client-cert", action="store_true",
                            help="refuse clients without a certificate (needs --client-ca)")
        parser.add_argument("--sni", type=_sni_arg, action="append", default=[],
                            metavar="NAME:CERT:KEY",
                            help="serve this certificate to clients asking for NAME (repeatable; "
                                 "*.example.com matches one label); others get --cert")
        parser.add_argument("--no-session-tickets", action="store_true",
                            help="no session tickets (TLS 1.2 resumes by session ID instead)")
    parser.add_argument("--tls-profile", choices=list(profiles.PROFILES), default=profiles.DEFAULT_PROFILE,
                        help="Mozilla Server Side TLS profile: versions, ciphers, groups and cipher "
                             "order in one (default intermediate: TLS 1.2+ with ECDHE and AES-GCM or "
                             "ChaCha20; modern: TLS 1.3 only; old: TLS 1.0+ with CBC suites, for "
                             "legacy clients only).  --tls-min, --tls-max, --ciphers and "
                             "--ciphersuites win over the profile for their one setting")
    parser.add_argument("--tls-min", choices=list(VERSIONS), default=None,
                        help="lowest TLS version accepted (default: the profile's; overrides it)")
    parser.add_argument("--tls-max", choices=list(VERSIONS), default=None,
                        help="highest TLS version offered (default: the newest; overrides the profile)")
    parser.add_argument("--ciphers", metavar="LIST",
                        help="OpenSSL cipher string for TLS 1.2, e.g. ECDHE+AESGCM "
                             "(default: the profile's; overrides it)")
    parser.add_argument("--ciphersuites", metavar="LIST",
                        help="TLS 1.3 ciphersuites, colon-separated, e.g. TLS_AES_256_GCM_SHA384 "
                             "(default: the profile's; overrides it)")
    parser.add_argument("--keylog", metavar="FILE",
                        help="append TLS secrets to FILE (SSLKEYLOGFILE format, for Wireshark)")


def policy_from_args(args: argparse.Namespace, certificate: CertificateBundle | None) -> ServerPolicy:
    """The :class:`ServerPolicy` for flags added by :func:`add_arguments` (loads the SNI files)."""
    if args.require_client_cert and args.client_ca is None:
        raise PolicyError("--require-client-cert needs --client-ca")
    sni: dict[str, CertificateBundle] = {}
    for name, cert_file, key_file in args.sni:
        if name in sni:
            raise PolicyError(f"--sni names {name} twice")
        try:
            sni[name] = load_bundle(cert_file, key_file)
        except CertificateError as exc:
            raise CertificateError(f"--sni {name}: {exc}") from exc
    return ServerPolicy(
        certificate=certificate,
        sni=sni,
        alpn=args.alpn or (),
        client_ca=args.client_ca,
        require_client_cert=args.require_client_cert,
        profile=args.tls_profile,
        min_version=args.tls_min,
        max_version=args.tls_max,
        ciphers=args.ciphers,
        ciphersuites=args.ciphersuites,
        keylog=args.keylog,
        session_tickets=not args.no_session_tickets,
    )


def context_from_args(args: argparse.Namespace, certificate: CertificateBundle | None) -> SSL.Context:
    """Flags to a server Context.  Raises :class:`PolicyError` or ``CertificateError`` (one line each)."""
    return build_server_context(policy_from_args(args, certificate))
