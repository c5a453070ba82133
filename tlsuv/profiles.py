"""TLS profiles: Mozilla's "Server Side TLS" configurations (modern, intermediate, old).

Every Context tlsuv builds -- :func:`tlsuv.server_context`,
:func:`tlsuv.policy.build_server_context`, the client's
:func:`tlsuv.policy.build_client_context` -- starts from one of these
profiles, **intermediate** unless told otherwise.  A profile sets the whole
TLS surface at once: protocol versions, the TLS 1.2 (and older) cipher list,
the TLS 1.3 suites, the key-exchange groups and whether the server or the
client orders the ciphers.  Single settings (``--tls-min``, ``--ciphers``...)
are applied afterwards by :mod:`tlsuv.policy`, so they win over the profile.

Where the sets come from
========================

Mozilla's guidelines, published as versioned JSON.  In 2026 they moved from
Mozilla (ssl-config.mozilla.org) to TLSRef (data.tlsref.org, with the
configurator at configurator.tlsref.org) keeping their name and numbering;
the current version is **6.0**.  6.0 removed the DHE suites from
intermediate, put the post-quantum hybrid group X25519MLKEM768 first, and
has no "old" configuration any more -- so tlsuv's "old" is version 5.7's
(5.7 is the last release before the rework that led to 6.0).

Decisions, and the traps behind them
====================================

* **No DHE.**  tlsuv configures no Diffie-Hellman parameters, and OpenSSL 3+
  never negotiates a DHE suite without them, so listing DHE would change
  nothing but the output of ``openssl ciphers``.  Guidelines 6.0 dropped DHE
  too: every client that can do DHE with AES-GCM can do ECDHE.  Old's list
  (5.7) is taken without its DHE suites for the same reason.

* **Intermediate orders the ciphers on the server, the guideline does not.**
  6.0 says "client chooses" for intermediate so that a phone without AES
  hardware may pick ChaCha20.  testssl.sh (3.0, the version Debian ships)
  rates a TLS 1.2 server without its own order as a HIGH finding, and tlsuv
  is checked by testssl.sh.  OpenSSL's ``SSL_OP_PRIORITIZE_CHACHA`` keeps
  what the guideline wants: the server's order applies, except that a client
  listing ChaCha20 first gets ChaCha20.  Every suite in the list is AEAD
  with forward secrecy, so the order only ever decides speed, never safety.
  Modern (TLS 1.3 only) keeps the client's choice, as the guideline says;
  testssl.sh does not mind it there.

* **Groups go through pyOpenSSL's private binding.**  pyOpenSSL 26's only
  public call, ``Context.set_tmp_ecdh``, sets a *single* curve.
  ``SSL_CTX_set1_groups_list`` is called through :mod:`tlsuv._openssl`.
  OpenSSL refuses a whole list for one name it does not know (before 3.5 it
  has no X25519MLKEM768), so the list is cut down to the names this
  OpenSSL knows, measured once per process.

* **The client offers two key shares**, X25519MLKEM768 and X25519 (``*``
  marks, OpenSSL 3.5+), as OpenSSL's own default does: with one share, every
  server without the hybrid group costs a HelloRetryRequest round trip.

* **"old" needs security level 0.**  The OpenSSL bundled with
  ``cryptography`` (4.0 at the time of writing) refuses TLS 1.0 and 1.1 at
  its default security level ("no protocols available") and refuses RSA keys
  below 2048 bits; ``@SECLEVEL=0`` in the cipher string is the only switch
  pyOpenSSL reaches, and it also lets through 1024-bit keys and SHA-1
  signatures.  That build has no 3DES at all (``DES-CBC3-SHA`` matches no
  cipher even at level 0), so old cannot offer it; it is left out of the list
  rather than listed and silently dropped.  Old serves TLS 1.0-1.3 with the
  CBC and RSA-key-exchange suites below.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

from OpenSSL import SSL

from . import _openssl


class ProfileError(ValueError):
    """An unknown profile name (tlsuv.policy turns it into a PolicyError)."""


# The versions a profile may name.  Users of tlsuv.policy may only pick 1.2
# and 1.3 themselves; 1.0 and 1.1 come only with the "old" profile, which
# also lowers the security level they need.
PROTOCOL_VERSIONS: Final[dict[str, int]] = {
    "1.0": SSL.TLS1_VERSION, "1.1": SSL.TLS1_1_VERSION,
    "1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION,
}

# SSL_OP_PRIORITIZE_CHACHA, SSL_OP_BIT(21) in OpenSSL 3's ssl.h; pyOpenSSL does
# not export it.  With server preference on: if the client's most preferred
# suite is ChaCha20-Poly1305, ChaCha20 goes to the top of the server's order
# (a client that says so has no AES hardware).  See the module docstring.
OP_PRIORITIZE_CHACHA: Final = 0x00200000


@dataclass(frozen=True)
class Profile:
    """One Server Side TLS configuration, as tlsuv applies it."""

    name: str
    guideline: str  # the version of the guidelines it is taken from
    min_version: str
    max_version: str | None  # None: the newest this OpenSSL has
    ciphers: str  # TLS 1.0-1.2 suites, OpenSSL names, most preferred first
    ciphersuites: str  # TLS 1.3 suites
    groups: tuple[str, ...]  # key exchange, most preferred first
    server_preference: bool
    security_level: int | None = None  # None: OpenSSL's default

    @property
    def cipher_string(self) -> str:
        """The ``set_cipher_list`` argument, with the security level if the profile needs one."""
        if self.security_level is None:
            return self.ciphers
        return f"@SECLEVEL={self.security_level}:{self.ciphers}"


# Server Side TLS guidelines 6.0 (https://data.tlsref.org/guidelines/6.0.json,
# formerly ssl-config.mozilla.org): the same three TLS 1.3 suites, in this
# order, in every configuration.
GUIDELINES_VERSION: Final = "6.0"
TLS13_SUITES: Final = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# Guidelines 6.0, "tls_curves" of modern and intermediate.
GROUPS: Final = ("X25519MLKEM768", "X25519", "prime256v1", "secp384r1")

# Guidelines 6.0, intermediate, "ciphers"/"openssl": ECDHE with AES-GCM and
# ChaCha20-Poly1305 only (6.0 removed the DHE suites 5.7 still had).
INTERMEDIATE_CIPHERS: Final = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])

# Guidelines 5.7 (https://ssl-config.mozilla.org/guidelines/5.7.json), old,
# "ciphers"/"openssl", without DHE-* (no DH parameters: see the module
# docstring) and without DES-CBC3-SHA (the bundled OpenSSL has no 3DES).
# 6.0 has no old configuration; 5.7 is the last that had one.
OLD_GUIDELINES_VERSION: Final = "5.7"
OLD_CIPHERS: Final = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-SHA256", "ECDHE-RSA-AES128-SHA256",
    "ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA384", "ECDHE-RSA-AES256-SHA384",
    "ECDHE-ECDSA-AES256-SHA", "ECDHE-RSA-AES256-SHA",
    "AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-SHA256", "AES256-SHA256",
    "AES128-SHA", "AES256-SHA",
])

PROFILES: Final[dict[str, Profile]] = {
    "modern": Profile(
        name="modern", guideline=GUIDELINES_VERSION, min_version="1.3", max_version=None,
        # Modern has no TLS 1.2 suites.  They only matter if --tls-min 1.2
        # re-enables TLS 1.2, and then intermediate's are the safe ones.
        ciphers=INTERMEDIATE_CIPHERS, ciphersuites=TLS13_SUITES, groups=GROUPS,
        server_preference=False),
    "intermediate": Profile(
        name="intermediate", guideline=GUIDELINES_VERSION, min_version="1.2", max_version=None,
        ciphers=INTERMEDIATE_CIPHERS, ciphersuites=TLS13_SUITES, groups=GROUPS,
        # The guideline says false: see "Intermediate orders the ciphers" above.
        server_preference=True),
    "old": Profile(
        name="old", guideline=OLD_GUIDELINES_VERSION, min_version="1.0", max_version=None,
        ciphers=OLD_CIPHERS, ciphersuites=TLS13_SUITES,
        # 5.7's groups plus 6.0's hybrid: a client that has it is no old client,
        # and offering it costs nothing.
        groups=GROUPS, server_preference=True,
        # TLS 1.0/1.1 need it with OpenSSL 3+ (see the module docstring).
        security_level=0),
}

DEFAULT_PROFILE: Final = "intermediate"


def get(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ProfileError(f"TLS profile must be one of {', '.join(PROFILES)}, not {name!r}") from None


@functools.cache
def supported_groups(groups: tuple[str, ...]) -> tuple[str, ...]:
    """The names in ``groups`` that this OpenSSL knows, in the same order."""
    probe = SSL.Context(SSL.TLS_METHOD)
    return tuple(name for name in groups if _openssl.set_groups(probe, name))


@functools.cache
def _group_string(groups: tuple[str, ...], client: bool) -> str | None:
    names = supported_groups(groups)
    if not names:
        return None
    plain = ":".join(names)
    if not client:
        return plain
    # Key shares for the first two (OpenSSL 3.5+ syntax); older OpenSSL
    # refuses the marks and sends one share for the first name.
    marked = ":".join(("*" + n if i < 2 else n) for i, n in enumerate(names))
    return marked if _openssl.set_groups(SSL.Context(SSL.TLS_METHOD), marked) else plain


def apply(ctx: SSL.Context, profile: Profile | str, *, server: bool) -> None:
    """Set ``profile``'s versions, ciphers, TLS 1.3 suites, groups and (servers) cipher order."""
    p = get(profile) if isinstance(profile, str) else profile
    ctx.set_min_proto_version(PROTOCOL_VERSIONS[p.min_version])
    # 0: the newest this OpenSSL has.
    ctx.set_max_proto_version(PROTOCOL_VERSIONS[p.max_version] if p.max_version else 0)
    ctx.set_cipher_list(p.cipher_string.encode("ascii"))
    ctx.set_tls13_ciphersuites(p.ciphersuites.encode("ascii"))
    groups = _group_string(p.groups, client=not server)
    if groups is not None:
        # Accepted when probed, so it cannot fail here; if the binding lacks
        # the call, OpenSSL's default groups stay (a superset of the profile's).
        _openssl.set_groups(ctx, groups)
    if server and p.server_preference:
        ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE | OP_PRIORITIZE_CHACHA)

