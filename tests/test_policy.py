"""Server-side TLS policy (tlsuv.policy) with real clients: Python's ssl and openssl s_client."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Certs, CheckedLoop, ServerThread, TLSFiles, recv_exactly
from cryptography import x509
from helpers import GREETING, wait_until
from OpenSSL import SSL
from peers import ClientRecorder, Interactive, echo_cli, require_tool, run_loop

import tlsuv
from tlsuv import _openssl, profiles
from tlsuv.client import connect
from tlsuv.echo import EchoHandler
from tlsuv.errors import CertificateVerifyError
from tlsuv.policy import PolicyError, ServerPolicy, build_client_context, build_server_context

BOTH_VERSIONS = [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2]


class InfoEcho(EchoHandler):
    """The echo handler, remembering what the handshake negotiated and how the connection ended."""

    __slots__ = ("info", "reason")

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.reason: BaseException | None = None

    def handshake_complete(self, conn: tlsuv.Connection) -> None:
        self.info = {
            "server_name": conn.server_name, "alpn": conn.alpn_protocol, "version": conn.tls_version,
            "cipher": conn.cipher, "subject": conn.peer_subject, "cert": conn.peer_certificate,
            "reused": conn.session_reused, "group": _openssl.group_name(conn.ssl),
        }

    def closed(self, conn: tlsuv.Connection, reason: BaseException | None) -> None:
        self.reason = reason


def serve(policy: ServerPolicy, **kwargs: Any) -> ServerThread:
    return ServerThread(build_server_context(policy), factory=lambda conn: InfoEcho(), **kwargs)


def default_bundle(certs: Certs) -> tlsuv.CertificateBundle:
    return tlsuv.load_bundle(certs.cert_file, certs.key_file)


def client_ctx(certs: Certs, *, check_hostname: bool = True, alpn: list[str] | None = None,
               version: ssl.TLSVersion | None = None, cert: tuple[Path, Path] | None = None,
               keylog: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    ctx.check_hostname = check_hostname
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(*cert)
    if keylog is not None:
        ctx.keylog_filename = str(keylog)
    return ctx


def echo_with(st: ServerThread, ctx: ssl.SSLContext, server_hostname: str | None = "localhost",
              session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    """Connect, read the greeting and one echo; return the socket (still open)."""
    raw = socket.create_connection(("127.0.0.1", st.port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname=server_hostname, session=session)
    assert recv_exactly(s, len(GREETING)) == GREETING
    s.sendall(b"ping")
    assert recv_exactly(s, 4) == b"ping"
    return s


def cipher_name(s: ssl.SSLSocket) -> str:
    cipher = s.cipher()
    assert cipher is not None
    return cipher[0]


def handler(st: ServerThread, index: int = -1) -> InfoEcho:
    st.wait_for(lambda: bool(st.handlers))
    h = st.handlers[index]
    assert isinstance(h, InfoEcho)
    return h


def closed_reason(st: ServerThread, index: int = -1) -> BaseException | None:
    st.wait_for(lambda: not st.server.connections)
    return handler(st, index).reason


# -- SNI ---------------------------------------------------------------------------------------


def sni_policy(certs: Certs, files: TLSFiles) -> ServerPolicy:
    return ServerPolicy(certificate=default_bundle(certs),
                        sni={name: files.bundle(name) for name in files.sni})


@pytest.mark.parametrize("name", ["alpha.test", "beta.test", "one.wild.test", "Alpha.TEST"])
def test_sni_chooses_the_certificate(certs: Certs, tls_files: TLSFiles, name: str) -> None:
    # check_hostname: the handshake only succeeds with the certificate for that name.
    with serve(sni_policy(certs, tls_files)) as st, echo_with(st, client_ctx(certs), server_hostname=name):
        assert handler(st).info["server_name"].lower() == name.lower()


@pytest.mark.parametrize("name", ["unknown.test", "a.b.wild.test", None])
def test_other_names_get_the_default_certificate(certs: Certs, tls_files: TLSFiles, name: str | None) -> None:
    with serve(sni_policy(certs, tls_files)) as st, \
            echo_with(st, client_ctx(certs, check_hostname=False), server_hostname=name) as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        assert "localhost" in san.get_values_for_type(x509.DNSName)


# -- ALPN --------------------------------------------------------------------------------------


def test_alpn_server_preference_wins(certs: Certs) -> None:
    policy = ServerPolicy(certificate=default_bundle(certs), alpn=("h2", "http/1.1"))
    with serve(policy) as st:
        with echo_with(st, client_ctx(certs, alpn=["http/1.1", "h2"])) as s:
            assert s.selected_alpn_protocol() == "h2"
            assert handler(st).info["alpn"] == "h2"
        with echo_with(st, client_ctx(certs, alpn=["http/1.1"])) as s:
            assert s.selected_alpn_protocol() == "http/1.1"
            assert handler(st).info["alpn"] == "http/1.1"
        with echo_with(st, client_ctx(certs)) as s:  # no ALPN offered: served without
            assert s.selected_alpn_protocol() is None
            assert handler(st).info["alpn"] is None


def test_alpn_without_common_protocol_is_refused(certs: Certs) -> None:
    policy = ServerPolicy(certificate=default_bundle(certs), alpn=("h2",))
    with serve(policy) as st:
        with pytest.raises(ssl.SSLError, match=r"NO_APPLICATION_PROTOCOL|no application protocol"):
            echo_with(st, client_ctx(certs, alpn=["imap"]))
        reason = closed_reason(st)
        assert isinstance(reason, tlsuv.HandshakeError), reason
        assert reason.alert == "no_application_protocol"
        assert "client offered imap" in str(reason)


# -- client certificates ---------------------------------------------------------------------------


def client_cert_policy(certs: Certs, files: TLSFiles, required: bool) -> ServerPolicy:
    return ServerPolicy(certificate=default_bundle(certs), client_ca=files.client_ca_file,
                        require_client_cert=required)


def test_optional_client_certificate(certs: Certs, tls_files: TLSFiles) -> None:
    with serve(client_cert_policy(certs, tls_files, required=False)) as st:
        with echo_with(st, client_ctx(certs)):
            assert handler(st).info["subject"] is None
        alice = (tls_files.client_cert, tls_files.client_key)
        with echo_with(st, client_ctx(certs, cert=alice)):
            info = handler(st).info
            assert "CN=alice" in info["subject"].split(",")
            assert isinstance(info["cert"], x509.Certificate)
            san = info["cert"].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.RFC822Name) == ["alice@example.test"]


@pytest.mark.parametrize("required", [False, True])
def test_untrusted_client_certificate_is_refused(certs: Certs, tls_files: TLSFiles, required: bool) -> None:
    mallory = (tls_files.rogue_cert, tls_files.rogue_key)
    with serve(client_cert_policy(certs, tls_files, required)) as st:
        # TLS 1.3: the client's handshake ends before the server verifies; the alert follows.
        with pytest.raises((ssl.SSLError, EOFError, ConnectionError)):
            echo_with(st, client_ctx(certs, cert=mallory))
        reason = closed_reason(st)
    assert isinstance(reason, CertificateVerifyError), reason
    assert "unable to get local issuer certificate" in reason.verify_message


def test_required_client_certificate(certs: Certs, tls_files: TLSFiles) -> None:
    with serve(client_cert_policy(certs, tls_files, required=True)) as st:
        with pytest.raises((ssl.SSLError, EOFError, ConnectionError)):
            echo_with(st, client_ctx(certs))
        reason = closed_reason(st)
        assert isinstance(reason, tlsuv.HandshakeError), reason
        assert "certificate" in str(reason)
        with echo_with(st, client_ctx(certs, cert=(tls_files.client_cert, tls_files.client_key))):
            assert "CN=alice" in handler(st).info["subject"].split(",")


# -- session resumption ----------------------------------------------------------------------------


def resume_twice(st: ServerThread, ctx: ssl.SSLContext) -> tuple[bool, bool]:
    """Two connections, the second offering the first one's session; (client, server) saw reuse."""
    with echo_with(st, ctx) as s:
        session = s.session  # read after the echo: TLS 1.3 tickets come after the handshake
    with echo_with(st, ctx, session=session) as s:
        return bool(s.session_reused), handler(st).info["reused"]


@pytest.mark.parametrize(("version", "tickets"), [
    (ssl.TLSVersion.TLSv1_3, True),  # stateless tickets
    (ssl.TLSVersion.TLSv1_3, False),  # stateful tickets from the server cache
    (ssl.TLSVersion.TLSv1_2, True),  # RFC 5077 tickets
    (ssl.TLSVersion.TLSv1_2, False),  # session IDs
], ids=["tls1.3-tickets", "tls1.3-stateful", "tls1.2-tickets", "tls1.2-session-id"])
def test_session_resumption(certs: Certs, version: ssl.TLSVersion, tickets: bool) -> None:
    with serve(ServerPolicy(certificate=default_bundle(certs), session_tickets=tickets)) as st:
        assert resume_twice(st, client_ctx(certs, version=version)) == (True, True)


@pytest.mark.parametrize("version", BOTH_VERSIONS, ids=["tls1.3", "tls1.2"])
def test_no_resumption_when_turned_off(certs: Certs, version: ssl.TLSVersion) -> None:
    policy = ServerPolicy(certificate=default_bundle(certs), session_tickets=False, session_cache=False)
    with serve(policy) as st:
        assert resume_twice(st, client_ctx(certs, version=version)) == (False, False)


def test_resumption_with_client_certificates_keeps_the_peer(certs: Certs, tls_files: TLSFiles) -> None:
    # Needs the session id context: OpenSSL refuses to resume without it once peers are verified.
    alice = (tls_files.client_cert, tls_files.client_key)
    with serve(client_cert_policy(certs, tls_files, required=True)) as st:
        assert resume_twice(st, client_ctx(certs, cert=alice, version=ssl.TLSVersion.TLSv1_2)) == (True, True)
        assert "CN=alice" in handler(st).info["subject"].split(",")


# -- versions and ciphers ----------------------------------------------------------------------------


def test_version_limits(certs: Certs) -> None:
    with serve(ServerPolicy(certificate=default_bundle(certs), max_version="1.2")) as st, \
            echo_with(st, client_ctx(certs)) as s:
        assert s.version() == "TLSv1.2"
        assert handler(st).info["version"] == "TLSv1.2"
    with serve(ServerPolicy(certificate=default_bundle(certs), min_version="1.3")) as st:
        with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|protocol version"):
            echo_with(st, client_ctx(certs, version=ssl.TLSVersion.TLSv1_2))
        assert isinstance(closed_reason(st), tlsuv.HandshakeError)


def test_cipher_list_and_tls13_ciphersuites(certs: Certs) -> None:
    policy = ServerPolicy(certificate=default_bundle(certs), ciphers="ECDHE-ECDSA-CHACHA20-POLY1305",
                          ciphersuites="TLS_CHACHA20_POLY1305_SHA256")
    with serve(policy) as st:
        with echo_with(st, client_ctx(certs, version=ssl.TLSVersion.TLSv1_2)) as s:
            assert cipher_name(s) == "ECDHE-ECDSA-CHACHA20-POLY1305"
            assert handler(st).info["cipher"] == "ECDHE-ECDSA-CHACHA20-POLY1305"
        with echo_with(st, client_ctx(certs)) as s:
            assert cipher_name(s) == "TLS_CHACHA20_POLY1305_SHA256"


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"min_version": "1.3", "max_version": "1.2"}, "above the maximum"),
    ({"min_version": "1.1"}, "must be one of 1.2, 1.3"),
    ({"ciphers": "NOT-A-CIPHER"}, "no usable TLS 1.2 cipher"),
    ({"ciphersuites": "TLS_AES_128_GCM_SHA256:TLS_TYPO_SHA256"}, "unknown TLS 1.3 ciphersuite 'TLS_TYPO"),
    ({"ciphersuites": ""}, "cannot be empty"),
    ({"alpn": ("h2", "")}, "1-255 bytes"),
    ({"require_client_cert": True}, "needs a client CA"),
    ({"sni": {"bad name!*": None}}, "not a host name"),
    ({"keylog": "/nonexistent-dir/keys.log"}, "cannot open key-log file"),
    ({"profile": "recent"}, "TLS profile must be one of modern, intermediate, old, not 'recent'"),
    ({"profile": "modern", "max_version": "1.2"},
     "minimum TLS version 1.3 (from the modern profile) is above the maximum 1.2"),
])
def test_bad_policies_raise_one_clear_error(certs: Certs, kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        build_server_context(ServerPolicy(certificate=default_bundle(certs), **kwargs))
    assert fragment in str(info.value)


def test_missing_client_ca_file(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(tlsuv.CertificateError, match="client CA file not found"):
        build_server_context(ServerPolicy(certificate=default_bundle(certs), client_ca=tmp_path / "no.pem"))


# -- TLS profiles -----------------------------------------------------------------------------------

INTERMEDIATE = profiles.get("intermediate")


def tls12_client(certs: Certs, ciphers: str) -> ssl.SSLContext:
    ctx = client_ctx(certs, version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers(ciphers)
    return ctx


def test_every_default_context_offers_exactly_the_intermediate_profile(certs: Certs) -> None:
    # What OpenSSL will really offer: a name it did not know would be missing here.
    expected = INTERMEDIATE.ciphersuites.split(":") + INTERMEDIATE.ciphers.split(":")
    bundle = default_bundle(certs)
    for ctx in (tlsuv.server_context(bundle), build_server_context(ServerPolicy(certificate=bundle)),
                build_client_context(verify=False)):
        assert SSL.Connection(ctx, None).get_cipher_list() == expected


def test_default_server_refuses_obsolete_tls12_suites(certs: Certs) -> None:
    # CBC suites (LUCKY13's target), offered by OpenSSL's own default list, are out.
    cbc = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA"
    with ServerThread(tlsuv.server_context(default_bundle(certs)), factory=lambda conn: InfoEcho()) as st:
        with pytest.raises(ssl.SSLError, match=r"HANDSHAKE_FAILURE|handshake failure"):
            echo_with(st, tls12_client(certs, cbc))
        assert isinstance(closed_reason(st), tlsuv.HandshakeError)
        with echo_with(st, tls12_client(certs, f"{cbc}:ECDHE-ECDSA-CHACHA20-POLY1305")) as s:
            assert cipher_name(s) == "ECDHE-ECDSA-CHACHA20-POLY1305"
    with serve(ServerPolicy(certificate=default_bundle(certs), profile="old")) as st, \
            echo_with(st, tls12_client(certs, cbc)) as s:
        assert cipher_name(s) == "ECDHE-ECDSA-AES128-SHA256"  # old: the server's order


@pytest.mark.parametrize(("client_order", "chosen"), [
    # The client prefers AES-256: the server's order (AES-128 first) wins.
    ("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305",
     "ECDHE-ECDSA-AES128-GCM-SHA256"),
    # A client listing ChaCha20 first (no AES hardware) gets it: SSL_OP_PRIORITIZE_CHACHA.
    ("ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"),
], ids=["server-order", "chacha-first"])
def test_intermediate_orders_tls12_suites_but_honours_chacha_first(certs: Certs, client_order: str,
                                                                   chosen: str) -> None:
    with serve(ServerPolicy(certificate=default_bundle(certs))) as st, \
            echo_with(st, tls12_client(certs, client_order)) as s:
        assert cipher_name(s) == chosen


AES_256_THEN_128 = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"


@pytest.mark.parametrize(("profile", "chosen"), [
    ("intermediate", "TLS_AES_128_GCM_SHA256"),  # the server's order
    ("modern", "TLS_AES_256_GCM_SHA384"),  # the client's, as the guideline says
])
def test_tls13_suite_order_follows_the_profile(certs: Certs, profile: str, chosen: str) -> None:
    with serve(ServerPolicy(certificate=default_bundle(certs), profile=profile)) as st, \
            s_client(st, certs, "-tls1_3", "-ciphersuites", AES_256_THEN_128) as p:
        p.read_until(GREETING)
        assert handler(st).info["cipher"] == chosen
        p.close_stdin()
        assert p.wait() == 0


def test_key_exchange_groups_follow_the_profile(certs: Certs, loop: CheckedLoop) -> None:
    with serve(ServerPolicy(certificate=default_bundle(certs))) as st:
        # Groups outside the profile are refused, in TLS 1.3 and in TLS 1.2's ECDHE.
        for args in (["-tls1_3", "-groups", "X448"], ["-tls1_2", "-groups", "secp521r1"]):
            with s_client(st, certs, *args) as p:
                assert p.wait() != 0
                assert GREETING not in bytes(p.out)
        with s_client(st, certs, "-groups", "secp384r1") as p:
            p.read_until(GREETING)
            assert handler(st).info["group"] == "secp384r1"
            p.close_stdin()
            assert p.wait() == 0
        with echo_with(st, client_ctx(certs)):  # Python's ssl: the system OpenSSL's first choice
            assert handler(st).info["group"] == "x25519"
        # tlsuv to tlsuv: the post-quantum hybrid, where this OpenSSL has it (3.5 and later).
        h = ClientRecorder(b"pq", len(GREETING) + 2)
        run_loop(loop, [connect(loop, "localhost", st.port, lambda c: h, cafile=certs.ca_file)])
        assert h.reason is None, h.reason
        hybrid = "X25519MLKEM768" in profiles.supported_groups(profiles.GROUPS)
        assert handler(st).info["group"] == ("X25519MLKEM768" if hybrid else "x25519")


def test_explicit_settings_win_over_the_profile(certs: Certs) -> None:
    modern_with_tls12 = ServerPolicy(certificate=default_bundle(certs), profile="modern", min_version="1.2")
    tls12 = client_ctx(certs, version=ssl.TLSVersion.TLSv1_2)
    with serve(modern_with_tls12) as st, echo_with(st, tls12) as s:
        assert s.version() == "TLSv1.2"
        assert cipher_name(s) in INTERMEDIATE.ciphers.split(":")  # modern has no TLS 1.2 suites of its own
    one_cipher = ServerPolicy(certificate=default_bundle(certs), ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
    with serve(one_cipher) as st, echo_with(st, client_ctx(certs, version=ssl.TLSVersion.TLSv1_2)) as s:
        assert cipher_name(s) == "ECDHE-ECDSA-AES256-GCM-SHA384"
    with serve(ServerPolicy(certificate=default_bundle(certs), profile="modern")) as st:
        with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|protocol version"):
            echo_with(st, client_ctx(certs, version=ssl.TLSVersion.TLSv1_2))
        assert isinstance(closed_reason(st), tlsuv.HandshakeError)


@pytest.mark.parametrize("module", ["tlsuv.echo", "tlsuv.client"])
def test_help_says_which_setting_wins(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    text = " ".join(out.split())  # argparse wraps lines
    assert "--tls-profile {modern,intermediate,old}" in text
    assert "--tls-min, --tls-max, --ciphers and --ciphersuites win over the profile" in text


# -- key log ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", BOTH_VERSIONS, ids=["tls1.3", "tls1.2"])
def test_keylog_matches_the_clients_secrets(certs: Certs, tmp_path: Path, version: ssl.TLSVersion) -> None:
    server_log, client_log = tmp_path / "server.keys", tmp_path / "client.keys"
    with serve(ServerPolicy(certificate=default_bundle(certs), keylog=server_log)) as st, \
            echo_with(st, client_ctx(certs, version=version, keylog=client_log)):
        pass
    theirs = {line for line in client_log.read_text().splitlines() if line and not line.startswith("#")}
    ours = server_log.read_text().splitlines()
    assert ours and set(ours) == theirs  # the very secrets Wireshark needs, in NSS format
    labels = {line.split()[0] for line in ours}
    if version is ssl.TLSVersion.TLSv1_3:
        assert {"CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_TRAFFIC_SECRET_0"} <= labels
    else:
        assert labels == {"CLIENT_RANDOM"}
    assert stat.S_IMODE(os.stat(server_log).st_mode) == 0o600


# -- renegotiation and KeyUpdate with openssl s_client --------------------------------------------


def s_client(st: ServerThread, certs: Certs, *args: str) -> Interactive:
    openssl = require_tool("openssl")
    # No -quiet: it would turn off the interactive command letters (R, k, K).
    return Interactive([openssl, "s_client", "-connect", f"127.0.0.1:{st.port}", "-brief",
                        "-CAfile", str(certs.ca_file), "-servername", "localhost", *args])


def test_tls13_key_update_keeps_the_echo_exact(certs: Certs) -> None:
    with serve(ServerPolicy(certificate=default_bundle(certs))) as st, s_client(st, certs, "-tls1_3") as p:
        p.read_until(GREETING)
        p.write(b"before\n")
        p.read_until(b"before\n")
        for n, command in enumerate([b"k\n", b"K\n", b"K\n"], 1):
            # k: s_client updates its sending keys; K: it also asks us to update ours.
            p.write(command)
            assert p.read_until(b"KEYUPDATE\n" * n, stream="err").count(b"KEYUPDATE") == n
            line = b"after update %d\n" % n
            p.write(line)
            p.read_until(line)
        p.close_stdin()
        assert p.wait() == 0
        assert bytes(p.out) == GREETING + b"before\n" + b"".join(b"after update %d\n" % n for n in (1, 2, 3))
        assert closed_reason(st) is None


def client_renegotiation(st: ServerThread, certs: Certs) -> tuple[Interactive, bytes | None]:
    p = s_client(st, certs, "-tls1_2")
    p.read_until(GREETING)
    p.write(b"one\n")
    p.read_until(b"one\n")
    conn = st.connections[-1]
    before = st.call(conn.ssl.client_random)
    p.write(b"R\n")
    p.read_until(b"RENEGOTIATING", stream="err")
    return p, before


def test_client_renegotiation_refused_by_default(certs: Certs) -> None:
    with serve(ServerPolicy(certificate=default_bundle(certs))) as st:
        p, _ = client_renegotiation(st, certs)
        with p:
            assert p.wait() != 0
            assert b"no renegotiation" in p.err
        reason = closed_reason(st)
        assert isinstance(reason, tlsuv.TLSError), reason


def test_client_renegotiation_allowed_by_option(certs: Certs) -> None:
    options = tlsuv.ConnectionOptions(allow_client_renegotiation=True)
    with serve(ServerPolicy(certificate=default_bundle(certs)), options=options) as st:
        p, before = client_renegotiation(st, certs)
        with p:
            p.write(b"two\n")
            p.read_until(b"two\n")
            # A new handshake ran: a new ClientHello brought a new client random.
            assert st.call(st.connections[-1].ssl.client_random) != before
            p.close_stdin()
            assert p.wait() == 0
        assert closed_reason(st) is None


# s_client needs -nbio here.  With its default blocking socket, OpenSSL finishes a
# renegotiation inside SSL_read and then (SSL_MODE_AUTO_RETRY) goes on blocking in read(2)
# for application data, so the next line on its stdin stays unread until the server sends
# something.  Depending on how s_client's select loop interleaves "three" with the
# handshake, that deadlocked about one run in three under load: tlsuv had flushed every byte
# (its send queue empty, every byte acknowledged) while s_client sat in read(2).
def test_server_initiated_renegotiation_with_s_client(certs: Certs) -> None:
    with serve(ServerPolicy(certificate=default_bundle(certs), max_version="1.2")) as st, \
            s_client(st, certs, "-nbio") as p:
        p.read_until(GREETING)
        conn = st.connections[-1]
        assert st.call(conn.renegotiate)
        p.write(b"three\n")  # s_client answers the HelloRequest when it next reads
        p.read_until(b"three\n")
        wait_until(lambda: not st.call(conn.ssl.renegotiate_pending), what="the renegotiation to complete")
        p.write(b"four\n")  # and data flows on the renegotiated session
        p.read_until(b"four\n")
        assert st.call(lambda: conn.renegotiations) == 1
        p.close_stdin()
        assert p.wait() == 0


# -- the echo server's flags --------------------------------------------------------------------------


def run_echo(*args: str) -> Interactive:
    return Interactive([sys.executable, "-m", "tlsuv.echo", "--port", "0", *args])


@pytest.mark.parametrize(("args", "fragment"), [
    (["--alpn", ""], "1-255 bytes"),
    (["--alpn", "h2,,x"], "1-255 bytes"),
    (["--sni", "alpha.test"], "expected NAME:CERT:KEY"),
    (["--sni", "bad*name:a:b"], "not a host name"),
    (["--sni", "alpha.test:/nonexistent.pem:/nonexistent.key"],
     "--sni alpha.test: certificate file not found"),
    (["--require-client-cert"], "--require-client-cert needs --client-ca"),
    (["--client-ca", "/nonexistent-ca.pem"], "client CA file not found"),
    (["--tls-min", "1.1"], "invalid choice"),
    (["--tls-min", "1.3", "--tls-max", "1.2"], "above the maximum"),
    (["--tls-profile", "recent"], "invalid choice"),
    (["--tls-profile", "modern", "--tls-max", "1.2"], "(from the modern profile) is above the maximum 1.2"),
    (["--ciphers", "NOPE"], "no usable TLS 1.2 cipher"),
    (["--ciphersuites", "TLS_NOPE"], "unknown TLS 1.3 ciphersuite"),
    (["--keylog", "/nonexistent-dir/k.log"], "cannot open key-log file"),
])
def test_echo_flag_errors_are_one_line_exit_2(args: list[str], fragment: str) -> None:
    with run_echo(*args) as p:
        assert p.wait(20) == 2
        lines = bytes(p.err).decode().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in lines[0], p.err
        assert fragment in lines[0], lines[0]


def test_echo_flags_end_to_end(certs: Certs, tls_files: TLSFiles, tmp_path: Path) -> None:
    alpha_cert, alpha_key = tls_files.sni["alpha.test"]
    keylog = tmp_path / "echo.keys"
    with echo_cli("--cert", str(certs.cert_file), "--key", str(certs.key_file),
                  "--sni", f"alpha.test:{alpha_cert}:{alpha_key}", "--alpn", "h2,echo/1",
                  "--client-ca", str(tls_files.client_ca_file), "--require-client-cert",
                  "--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256",
                  "--keylog", str(keylog), "--no-session-tickets") as (_, port):
        alice = (tls_files.client_cert, tls_files.client_key)
        ctx = client_ctx(certs, alpn=["echo/1"], cert=alice)
        first: ssl.SSLSession | None = None
        for attempt in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname="alpha.test", session=first) as s:
                assert recv_exactly(s, len(GREETING)) == GREETING
                s.sendall(b"flags")
                assert recv_exactly(s, 5) == b"flags"
                assert s.selected_alpn_protocol() == "echo/1"
                assert s.version() == "TLSv1.2"
                assert cipher_name(s) == "ECDHE-ECDSA-AES128-GCM-SHA256"
                assert s.session_reused is (attempt == 1)  # by session ID: tickets are off
                first = s.session
        no_cert = client_ctx(certs, alpn=["echo/1"])
        with pytest.raises((ssl.SSLError, ConnectionError)), \
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                no_cert.wrap_socket(raw, server_hostname="alpha.test") as s:
            recv_exactly(s, len(GREETING))
    # The server has exited (echo_cli waits for it): its key log is complete, one line per
    # handshake that got as far as keys (TLS 1.2's CLIENT_RANDOM format).
    lines = keylog.read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith("CLIENT_RANDOM ") for line in lines), lines



def test_echo_allow_client_renegotiation_flag(certs: Certs) -> None:
    openssl = require_tool("openssl")
    with echo_cli("--cert", str(certs.cert_file), "--key", str(certs.key_file),
                  "--allow-client-renegotiation", "--tls-max", "1.2") as (_, port), \
            Interactive([openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-brief",
                         "-CAfile", str(certs.ca_file), "-servername", "localhost"]) as p:
        p.read_until(GREETING)
        p.write(b"R\n")
        p.read_until(b"RENEGOTIATING", stream="err")
        p.write(b"still here\n")
        p.read_until(b"still here\n")
        p.close_stdin()
        assert p.wait() == 0
        assert b"no renegotiation" not in p.err
