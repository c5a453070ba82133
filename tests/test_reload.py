"""Certificate reload: real echo servers, real signals, PEM files replaced the way deploy tools do.

Files are always replaced atomically (write a temporary file, then
``os.replace``), except where a test writes a broken file on purpose.  The
certificate a client got is checked by its DER bytes.
"""

from __future__ import annotations

import contextlib
import datetime
import grp
import hashlib
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from conftest import Certs, ServerThread, recv_exactly, server_thread
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hammer import Hammer, LongLived, ServedBy
from helpers import GREETING
from OpenSSL import SSL
from test_workers import ECHO, Supervised

import tlsuv
from tlsuv.certs import CertificateError
from tlsuv.policy import ContextSet, PolicyError, ServerPolicy, build_context_set
from tlsuv.reload import CertificateFiles, Reloader

NAMES = ("localhost", "127.0.0.1")


def deploy(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically, as certbot, cert-manager and most deploy tools do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def der(leaf: trustme.LeafCert) -> bytes:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)


@dataclass
class Site:
    """A certificate and key deployed in a directory of their own."""

    cert: Path
    key: Path

    def put(self, leaf: trustme.LeafCert) -> None:
        deploy(self.cert, b"".join(p.bytes() for p in leaf.cert_chain_pems))
        deploy(self.key, leaf.private_key_pem.bytes())


def site(tmp_path: Path, leaf: trustme.LeafCert, stem: str = "server") -> Site:
    s = Site(tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key")
    s.put(leaf)
    return s


def connect(certs: Certs, port: int, *, server_hostname: str = "localhost",
            ctx: ssl.SSLContext | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    ctx = ctx or certs.client_ssl_context()
    s = ctx.wrap_socket(raw, server_hostname=server_hostname, session=session)
    assert recv_exactly(s, len(GREETING)) == GREETING
    return s


def served(certs: Certs, port: int, **kwargs: object) -> bytes:
    """The DER of the certificate a fresh connection gets (after a full echo)."""
    # connect()'s keyword arguments, forwarded; ** hides their types.
    with connect(certs, port, **kwargs) as s:  # type: ignore[arg-type]
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        cert = s.getpeercert(binary_form=True)
        s.unwrap()
    assert cert is not None
    return cert


@contextlib.contextmanager
def echo(*args: str) -> Iterator[Supervised]:
    sup = Supervised([*ECHO, "--port", "0", *args])
    try:
        yield sup
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
    finally:
        sup.stop()
        assert not any("Traceback" in line for line in sup.lines), "\n".join(sup.lines)


def problems(sup: Supervised, start: int) -> list[str]:
    return [line for line in sup.lines[start:] if " WARNING " in line or " ERROR " in line]


# -- SIGHUP ------------------------------------------------------------------------


def test_sighup_serves_the_new_certificate_and_open_connections_keep_echoing(
        certs: Certs, tmp_path: Path) -> None:
    old, new = certs.ca.issue_cert(*NAMES), certs.ca.issue_cert(*NAMES)
    files = site(tmp_path, old)
    with echo("--cert", str(files.cert), "--key", str(files.key)) as sup:
        assert served(certs, sup.port) == der(old)
        before = connect(certs, sup.port)
        files.put(new)
        mark = len(sup.lines)
        sup.signal(signal.SIGHUP)
        sup.wait_for(r"SIGHUP: certificates reloaded", start=mark)
        assert served(certs, sup.port) == der(new)
        # Opened before: still served, with the certificate it started with.
        before.sendall(b"still here")
        assert recv_exactly(before, 10) == b"still here"
        assert before.getpeercert(binary_form=True) == der(old)
        before.unwrap()
        before.close()
        # The new certificate is described in the log (subject, names, end of validity).
        subject = x509.load_pem_x509_certificate(new.cert_chain_pems[0].bytes()).subject.rfc4514_string()
        line = sup.wait_for(r"default certificate: subject (.*)", start=mark)
        assert line.group(1).startswith(f"{subject}, names localhost, 127.0.0.1, valid until ")
        assert not problems(sup, mark)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_reloads_under_a_hammer_drop_nothing(certs: Certs, tmp_path: Path, workers: str) -> None:
    """Clients connecting in a tight loop through several SIGHUP reloads: not one session lost,
    each reload served from the next fresh connection on, connections opened before untouched."""
    leaves = [certs.ca.issue_cert(*NAMES) for _ in range(3)]
    digests = [hashlib.sha256(der(leaf)).hexdigest() for leaf in leaves]
    files = site(tmp_path, leaves[0])
    ctx = certs.client_ssl_context()
    with echo("--cert", str(files.cert), "--key", str(files.key), "--workers", workers) as sup:
        held = LongLived("127.0.0.1", sup.port, ctx, 4)
        served_by = ServedBy()
        hammer = Hammer("127.0.0.1", sup.port, ctx, clients=4, check=served_by)
        hammer.start()
        try:
            hammer.wait_ok(20)
            for leaf in leaves[1:]:
                files.put(leaf)
                mark = len(sup.lines)
                sup.signal(signal.SIGHUP)
                if workers == "1":
                    sup.wait_for(r"SIGHUP: certificates reloaded", start=mark)
                else:  # every worker says it
                    for number in (1, 2):
                        sup.wait_for(rf"worker {number}: SIGHUP: certificates reloaded", start=mark)
                hammer.wait_ok(20)
                held.echo("between reloads")
        finally:
            result = hammer.stop()
        held.echo("after the reloads")
        held.close()
    print(f"\nSIGHUP x2 (--workers {workers}): hammer {result.summary()}; served by certificate: "
          f"{[served_by.counts[d] for d in digests]}")
    result.assert_clean()
    assert all(served_by.counts[d] > 0 for d in digests), "each certificate served in its turn"
    assert served_by.order[-1] == digests[-1]


def _garbage(site: Site, certs: Certs) -> Path:
    deploy(site.key, b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    return site.key


def _mismatched_key(site: Site, certs: Certs) -> Path:
    deploy(site.key, certs.ca.issue_cert("other.test").private_key_pem.bytes())
    return site.key


def _half_written_chain(site: Site, certs: Certs) -> Path:
    # A chain cut inside its intermediate, as a non-atomic copy leaves it midway:
    # the first certificate still parses on its own.
    leaf = certs.ca.create_child_ca().issue_cert(*NAMES)
    chain = b"".join(p.bytes() for p in leaf.cert_chain_pems)
    deploy(site.key, leaf.private_key_pem.bytes())
    site.cert.write_bytes(chain[: len(chain) - 200])
    return site.cert


def _garbage_certificate(site: Site, certs: Certs) -> Path:
    deploy(site.cert, b"this is not PEM\n")
    return site.cert


def _missing(site: Site, certs: Certs) -> Path:
    site.key.unlink()
    return site.key


@pytest.mark.parametrize(("breakage", "reason"), [
    (_garbage, "holds no valid unencrypted PEM private key"),
    (_mismatched_key, "key does not match the certificate"),
    (_half_written_chain, "is damaged or incomplete: 2 certificates begin but 1 certificate(s) parse"),
    (_garbage_certificate, "holds no valid PEM certificate"),
    (_missing, "key file not found: "),
], ids=["garbage key", "mismatched key", "half-written chain", "garbage certificate", "missing key"])
def test_a_bad_reload_keeps_the_old_certificate_and_says_why_in_one_line(
        certs: Certs, tmp_path: Path, breakage: object, reason: str) -> None:
    good = certs.ca.issue_cert(*NAMES)
    files = site(tmp_path, good)
    with echo("--cert", str(files.cert), "--key", str(files.key)) as sup:
        before = connect(certs, sup.port)
        assert callable(breakage)
        culprit = breakage(files, certs)
        mark = len(sup.lines)
        sup.signal(signal.SIGHUP)
        sup.wait_for(r"reload failed", start=mark)
        assert served(certs, sup.port) == der(good)
        before.sendall(b"on")
        assert recv_exactly(before, 2) == b"on"
        lines = problems(sup, mark)
        assert len(lines) == 1, lines
        assert re.search(r"ERROR tlsuv.reload: SIGHUP: reload failed, still serving the previous "
                         r"certificates: .*" + re.escape(str(culprit)), lines[0]), lines[0]
        assert reason in lines[0], lines[0]
        # Fixed files are picked up by the next signal.
        fixed = certs.ca.issue_cert(*NAMES)
        files.put(fixed)
        mark = len(sup.lines)
        sup.signal(signal.SIGHUP)
        sup.wait_for(r"SIGHUP: certificates reloaded \(reloads so far: 1 ok, 1 failed\)", start=mark)
        assert served(certs, sup.port) == der(fixed)
        before.unwrap()
        before.close()


# -- polling ----------------------------------------------------------------------------


def test_reload_interval_picks_up_a_change_and_reports_bad_content_once(
        certs: Certs, tmp_path: Path) -> None:
    old, new = certs.ca.issue_cert(*NAMES), certs.ca.issue_cert(*NAMES)
    files = site(tmp_path, old)
    with echo("--cert", str(files.cert), "--key", str(files.key), "--reload-interval", "0.1",
              "--stats-interval", "0.2") as sup:
        assert served(certs, sup.port) == der(old)
        mark = len(sup.lines)
        files.put(new)
        sup.wait_for(r"certificate files changed: certificates reloaded", start=mark)
        assert served(certs, sup.port) == der(new)
        # Bad content fails once and is not retried (nor logged) at every poll.
        mark = len(sup.lines)
        deploy(files.key, b"garbage\n")
        sup.wait_for(r"certificate files changed: reload failed", start=mark)
        # The stats line ticks every 0.2 s: five of them span several polls.
        for _ in range(5):
            sup.wait_for(r"stats: ", start=len(sup.lines))
        assert len(problems(sup, mark)) == 1, problems(sup, mark)
        assert served(certs, sup.port) == der(new)


def test_reload_interval_needs_files() -> None:
    proc = subprocess.run([*ECHO, "--reload-interval", "5"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "python -m tlsuv.echo: error: --reload-interval needs files to watch "
        "(--cert/--key, --sni or --client-ca)"]


# -- SNI and client CA ------------------------------------------------------------------------


def test_sighup_reloads_sni_certificates_and_the_client_ca(certs: Certs, tmp_path: Path) -> None:
    default = site(tmp_path, certs.ca.issue_cert(*NAMES))
    alpha_1, alpha_2 = certs.ca.issue_cert("alpha.test"), certs.ca.issue_cert("alpha.test")
    alpha = site(tmp_path, alpha_1, "alpha")
    ca_1, ca_2 = trustme.CA(organization_name="client CA one"), trustme.CA(organization_name="client CA two")
    client_ca = tmp_path / "client-ca.pem"
    deploy(client_ca, ca_1.cert_pem.bytes())

    def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
        ctx = certs.client_ssl_context()
        ca.issue_cert("alice@example.test", common_name="alice").configure_cert(ctx)
        return ctx

    def accepted(ca: trustme.CA) -> bool:
        try:
            with connect(certs, sup.port, ctx=client_ctx(ca)) as s:
                s.sendall(b"x")
                return recv_exactly(s, 1) == b"x"
        except (ssl.SSLError, ConnectionResetError, EOFError):
            return False

    with echo("--cert", str(default.cert), "--key", str(default.key),
              "--sni", f"alpha.test:{alpha.cert}:{alpha.key}",
              "--client-ca", str(client_ca), "--require-client-cert") as sup:
        assert served(certs, sup.port, server_hostname="alpha.test", ctx=client_ctx(ca_1)) == der(alpha_1)
        assert accepted(ca_1) and not accepted(ca_2)
        alpha.put(alpha_2)
        deploy(client_ca, ca_2.cert_pem.bytes())
        mark = len(sup.lines)
        sup.signal(signal.SIGHUP)
        sup.wait_for(r"SIGHUP: certificates reloaded", start=mark)
        sup.wait_for(r"SNI alpha\.test: subject .*names alpha\.test", start=mark)
        assert served(certs, sup.port, server_hostname="alpha.test", ctx=client_ctx(ca_2)) == der(alpha_2)
        assert accepted(ca_2) and not accepted(ca_1)
        # A certificate for another name under alpha.test's files: refused, named.
        alpha.put(certs.ca.issue_cert("beta.test"))
        mark = len(sup.lines)
        sup.signal(signal.SIGHUP)
        m = sup.wait_for(r"reload failed, still serving the previous certificates: (.*)$", start=mark)
        assert m.group(1) == (f"SNI name alpha.test: certificate file {alpha.cert} is for beta.test, "
                              f"not alpha.test")
        assert served(certs, sup.port, server_hostname="alpha.test", ctx=client_ctx(ca_2)) == der(alpha_2)


# -- workers ----------------------------------------------------------------------------------


def _session(certs: Certs, sup: Supervised, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None,
             ) -> tuple[int, ssl.SSLSession, bool, bytes]:
    """One echo session: (the worker that served it, its session, whether resumed, the certificate)."""
    with connect(certs, sup.port, ctx=ctx, session=session) as s:
        local = s.getsockname()[1]
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"  # TLS 1.3 tickets have arrived by now
        result = (s.session, bool(s.session_reused), s.getpeercert(binary_form=True))
        s.unwrap()
    worker = int(sup.wait_for(rf"worker (\d+): 127\.0\.0\.1:{local}: accepted").group(1))
    new_session, reused, cert = result
    assert new_session is not None and cert is not None
    return worker, new_session, reused, cert


def test_one_sighup_reloads_every_worker_and_sessions_resume_across_them(
        certs: Certs, tmp_path: Path) -> None:
    old, new = certs.ca.issue_cert(*NAMES), certs.ca.issue_cert(*NAMES)
    files = site(tmp_path, old)
    with echo("--cert", str(files.cert), "--key", str(files.key), "--workers", "2",
              "--log-level", "debug") as sup:
        pids = sup.worker_pids(2)
        ctx = certs.client_ssl_context()  # sessions resume only through the context that made them
        _, early_session, _, cert = _session(certs, sup, ctx)
        assert cert == der(old)
        files.put(new)
        mark = len(sup.lines)
        sup.signal(signal.SIGHUP)
        sup.wait_for(r"SIGHUP: passing it on to 2 worker\(s\)", start=mark)
        for number in (1, 2):
            sup.wait_for(rf"worker {number}: SIGHUP: certificates reloaded", start=mark)
        # Every worker now serves the new certificate ...
        seen: dict[int, ssl.SSLSession] = {}
        for _ in range(80):
            worker, session, reused, cert = _session(certs, sup, ctx)
            assert not reused and cert == der(new)
            seen[worker] = session
            if len(seen) == 2:
                break
        assert set(seen) == {1, 2}, "every connection landed on one worker"
        # ... a ticket one worker issued after the reload is accepted by the other ...
        crossed = False
        for _ in range(80):
            worker, _, reused, _ = _session(certs, sup, ctx, seen[1])
            assert reused, f"worker {worker} refused worker 1's ticket"
            if worker == 2:
                crossed = True
                break
        assert crossed
        # ... and a ticket from before the reload still resumes, wherever it lands.
        _, _, reused, cert = _session(certs, sup, ctx, early_session)
        assert reused and cert == der(old), "a resumed session keeps the certificate it began with"
        # A worker restarted after the reload serves the files as they are now.
        mark = len(sup.lines)
        os.kill(pids[1], signal.SIGKILL)
        sup.wait_for(r"worker 1: certificate files changed: certificates reloaded", start=mark)
        sup.wait_for(r"worker 1 listening", start=mark)
        for _ in range(80):
            worker, _, _, cert = _session(certs, sup, ctx)
            assert cert == der(new)
            if worker == 1:
                break
        else:  # pragma: no cover - 2**-80
            pytest.fail("the restarted worker never served")


# -- the library ------------------------------------------------------------------------------


def _bundle(leaf: trustme.LeafCert) -> tlsuv.CertificateBundle:
    return tlsuv.CertificateBundle(b"".join(p.bytes() for p in leaf.cert_chain_pems),
                                   leaf.private_key_pem.bytes())


def _peer_der(st: ServerThread, certs: Certs, server_hostname: str = "localhost") -> bytes:
    raw = socket.create_connection(("127.0.0.1", st.port), timeout=10)
    with certs.client_ssl_context().wrap_socket(raw, server_hostname=server_hostname) as s:
        assert recv_exactly(s, len(GREETING)) == GREETING
        cert = s.getpeercert(binary_form=True)
        s.unwrap()
    assert cert is not None
    return cert


def test_context_set_swaps_default_and_sni_table_at_once(certs: Certs) -> None:
    a, b = certs.ca.issue_cert(*NAMES), certs.ca.issue_cert(*NAMES)
    alpha = certs.ca.issue_cert("alpha.test")
    contexts = build_context_set(ServerPolicy(certificate=_bundle(a)))
    with server_thread(contexts.front) as st:
        assert _peer_der(st, certs) == der(a)
        with pytest.raises(ssl.SSLCertVerificationError):  # no SNI table yet: the default answers
            _peer_der(st, certs, "alpha.test")

        def swap() -> None:
            new_default = tlsuv.server_context(_bundle(b), _like_front())
            contexts.swap(new_default, {"alpha.test": tlsuv.server_context(_bundle(alpha), _like_front())})

        st.call(swap)
        assert contexts.swaps == 1
        assert _peer_der(st, certs) == der(b)
        assert _peer_der(st, certs, "alpha.test") == der(alpha)


def _like_front() -> SSL.Context:
    """A Context with the settings build_context_set gives the front."""
    ctx = tlsuv.certs.new_context()
    ctx.set_session_id(tlsuv.policy.SESSION_ID_CONTEXT)
    return ctx


def test_context_set_reload_refuses_other_settings(certs: Certs) -> None:
    contexts = build_context_set(ServerPolicy(certificate=_bundle(certs.ca.issue_cert(*NAMES))))
    with pytest.raises(PolicyError, match="not settings: alpn, max_version differ"):
        contexts.reload(ServerPolicy(certificate=_bundle(certs.ca.issue_cert(*NAMES)),
                                     alpn=("h2",), max_version="1.2"))
    assert contexts.swaps == 0


def test_server_set_context(certs: Certs) -> None:
    a, b = certs.ca.issue_cert(*NAMES), certs.ca.issue_cert(*NAMES)
    with server_thread(tlsuv.server_context(_bundle(a))) as st:
        open_before = st.connect(certs)
        assert recv_exactly(open_before, len(GREETING)) == GREETING
        st.call(lambda: st.server.set_context(tlsuv.server_context(_bundle(b))))
        assert _peer_der(st, certs) == der(b)
        open_before.sendall(b"hi")
        assert recv_exactly(open_before, 2) == b"hi"
        open_before.unwrap()
        open_before.close()


def test_reloader_counts_and_keeps_the_old_set(certs: Certs, tmp_path: Path) -> None:
    files = site(tmp_path, certs.ca.issue_cert(*NAMES))
    reloader = Reloader(CertificateFiles(cert=str(files.cert), key=str(files.key)))
    front, first = reloader.context, reloader.contexts.default
    started = reloader.last_reload
    assert reloader.poll() is None  # nothing changed
    deploy(files.key, b"garbage")
    assert reloader.poll() is False
    assert reloader.poll() is None  # the same bad content is not tried again
    assert (reloader.reloads_ok, reloader.reloads_failed) == (0, 1)
    assert reloader.last_error is not None and str(files.key) in reloader.last_error
    assert reloader.contexts.default is first and reloader.last_reload == started
    files.put(certs.ca.issue_cert(*NAMES))
    assert reloader.poll() is True
    assert (reloader.reloads_ok, reloader.reloads_failed) == (1, 1)
    assert reloader.last_error is None
    assert reloader.contexts.default is not first and reloader.context is front
    assert reloader.last_reload >= started


def test_a_bad_start_raises_one_clear_error(certs: Certs, tmp_path: Path) -> None:
    files = site(tmp_path, certs.ca.issue_cert(*NAMES))
    deploy(files.key, certs.ca.issue_cert(*NAMES).private_key_pem.bytes())
    with pytest.raises(CertificateError, match=re.escape(f"key does not match the certificate (key file "
                                                         f"{files.key}, certificate file {files.cert})")):
        Reloader(CertificateFiles(cert=str(files.cert), key=str(files.key)))


@pytest.mark.parametrize(("days", "level", "text"), [
    (5, logging.WARNING, "certificate expires in 4 day(s), renew it"),
    (-1, logging.WARNING, "certificate EXPIRED, clients will refuse it"),
    (40, logging.INFO, "valid until"),
])
def test_expiry_is_logged_and_warned_two_weeks_ahead(
        certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture, *, days: int, level: int,
        text: str) -> None:
    now = datetime.datetime.now(datetime.UTC)
    leaf = certs.ca.issue_cert(*NAMES, not_before=now - datetime.timedelta(days=30),
                               not_after=now + datetime.timedelta(days=days, hours=-1))
    files = site(tmp_path, leaf)
    reloader = Reloader(CertificateFiles(cert=str(files.cert), key=str(files.key)))
    with caplog.at_level(logging.INFO, logger="tlsuv.reload"):
        reloader.log_certificates()  # what the echo server logs at start, and after each reload
    records = [r for r in caplog.records if r.name == "tlsuv.reload"]
    assert len(records) == 1 and records[0].levelno == level and text in records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tlsuv.reload"):
        reloader.log_certificates(only_expiring=True)  # what the daily check logs
    assert len(caplog.records) == (1 if level == logging.WARNING else 0)


def test_context_set_is_what_build_server_context_returns(certs: Certs) -> None:
    contexts: ContextSet = build_context_set(ServerPolicy(certificate=_bundle(certs.ca.issue_cert(*NAMES))))
    assert contexts.default is contexts.front and dict(contexts.sni) == {}
    assert contexts.served()[0][0] == "default certificate"


# -- the documented certbot deploy hook -------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _hook_from_docs(source: str) -> str:
    if source == "docs/deployment.md":
        blocks = re.findall(r"```sh\n(.*?)```", (ROOT / source).read_text(), re.S)
        hooks = [b for b in blocks if b.startswith("#!/bin/sh") and "RENEWED_LINEAGE" in b]
    else:  # README.md: the hook inline in the certbot command
        hooks = re.findall(r"--deploy-hook '(.*?)'\n```", (ROOT / source).read_text(), re.S)
    assert len(hooks) == 1, f"{source}: {len(hooks)} deploy hooks"
    hook: str = hooks[0]
    return hook


@pytest.mark.parametrize("source", ["docs/deployment.md", "README.md"])
def test_the_documented_certbot_deploy_hook_reloads_a_running_server(
        certs: Certs, tmp_path: Path, source: str) -> None:
    """The hook as the documentation prints it, with only its paths, group and reload command
    pointed at this test (certbot sets RENEWED_LINEAGE to the renewed live directory)."""
    old, renewed = certs.ca.issue_cert(*NAMES), certs.ca.issue_cert(*NAMES)
    dest = tmp_path / "etc-tlsuv"
    dest.mkdir()
    served_files = Site(dest / "fullchain.pem", dest / "privkey.pem")
    served_files.put(old)
    live = tmp_path / "live" / "tls.example.com"
    live.mkdir(parents=True)
    (live / "fullchain.pem").write_bytes(b"".join(p.bytes() for p in renewed.cert_chain_pems))
    (live / "privkey.pem").write_bytes(renewed.private_key_pem.bytes())
    with echo("--cert", str(served_files.cert), "--key", str(served_files.key)) as sup:
        assert served(certs, sup.port) == der(old)
        hook = _hook_from_docs(source)
        for doc, here in (("/etc/tlsuv", str(dest)), ("tlsuv-certs", grp.getgrgid(os.getgid()).gr_name),
                          ('"$(systemctl show --property MainPID --value tlsuv)"', str(sup.proc.pid))):
            assert doc in hook, f"{source}'s hook no longer mentions {doc}"
            hook = hook.replace(doc, here)
        mark = len(sup.lines)
        subprocess.run(["sh", "-c", hook], env={**os.environ, "RENEWED_LINEAGE": str(live)},
                       check=True, timeout=30)
        sup.wait_for(r"SIGHUP: certificates reloaded", start=mark)
        assert served(certs, sup.port) == der(renewed)
        assert (served_files.key.stat().st_mode & 0o777) == 0o640
        assert sorted(p.name for p in dest.iterdir()) == ["fullchain.pem", "privkey.pem"]
        assert not problems(sup, mark)


# -- the checks a reload makes -------------------------------------------------------------------


@pytest.mark.parametrize(("sans", "name", "expected"), [
    (["a.test"], "a.test", True),
    (["A.Test."], "a.test", True),
    (["*.a.test"], "x.a.test", True),
    (["*.a.test"], "a.test", False),
    (["*.a.test"], "y.x.a.test", False),  # a wildcard covers one label
    (["*.a.test"], "*.a.test", True),  # an SNI wildcard entry needs the same wildcard
    (["x.a.test"], "*.a.test", False),
    (["b.test", "a.test"], "a.test", True),
    ([], "a.test", False),
])
def test_covers(certs: Certs, sans: list[str], name: str, expected: bool) -> None:
    if sans:
        leaf = certs.ca.issue_cert(*sans, common_name=name)
        cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    else:  # a certificate without subjectAltName: only a CN, which clients ignore
        cert = _without_san(name)
    assert tlsuv.certs.covers(cert, name) is expected


def _without_san(cn: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))


def test_a_combined_pem_with_key_and_chain_still_loads(certs: Certs, tmp_path: Path) -> None:
    leaf = certs.ca.create_child_ca().issue_cert(*NAMES)
    combined = tmp_path / "combined.pem"
    combined.write_bytes(leaf.private_key_pem.bytes() + b"".join(p.bytes() for p in leaf.cert_chain_pems))
    reloader = Reloader(CertificateFiles(cert=str(combined), key=str(combined)))
    assert reloader.contexts.served()[0][1].public_bytes(Encoding.DER) == der(leaf)
