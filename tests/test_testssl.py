"""testssl.sh, the well-known TLS scanner, against ``python -m tlsuv.echo``.

Two scans: the default profile (intermediate) with an RSA certificate, and
``--tls-profile modern`` with an ECDSA one, so both key types' suites are
seen.  Each scan's JSON must hold no finding of severity LOW or above, except
the ones the test's own certificate causes (listed in EXCLUDED, each with its
reason), and must show exactly the profile's protocols, suites and groups.

Run time: testssl.sh is bash; one scan starts about 150 openssl processes
and 2,500 others (sed, awk, tr...), so its time depends mostly on how busy
the machine is (about 20 s of CPU per scan).  The checks are therefore
chosen rather than "everything": protocols, cipher categories, forward
secrecy, server preference, server defaults (certificate, resumption) and
the vulnerabilities -- not client simulation, HTTP headers or one handshake
per cipher, which add time and no finding for a non-HTTP server whose suites
the forward-secrecy list already names.  ``--fast``, no DNS, and a short
wait for the HTTP banner the echo server never sends save the rest.

Missing testssl.sh skips these tests with the install command; under
``TLSUV_REQUIRE_TESTSSL=1`` (set by ``.ci/run``, which installs it) it fails.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from helpers import unavailable
from peers import Interactive, echo_cli

from tlsuv import profiles

INSTALL = "apt-get install -y testssl.sh"
# Debian installs the script as "testssl"; upstream's name is testssl.sh.
TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")

# testssl.sh's severities that are not a problem.  LOW, MEDIUM, HIGH and
# CRITICAL are findings; WARN is a check that could not run; FATAL ends the scan.
HARMLESS = {"OK", "INFO", "DEBUG"}
FINDINGS = {"LOW", "MEDIUM", "HIGH", "CRITICAL"}

# Findings the test's own certificate causes, by testssl.sh id.  Nothing else
# may be excluded: a finding about the server's TLS is a failure.
EXCLUDED = {
    # The test CA runs no revocation service, so its certificates carry neither
    # a CRL distribution point nor an OCSP URI.  Revocation is the CA's business.
    "cert_revocation": "no CRL or OCSP URI in the test CA's certificate",
}

# WARN is not a severity but "this check could not run".  A check that did not
# run hides whatever it would have found, so a WARN fails too, except these,
# which come from the scanner's side, not the server's.
TOLERATED_WARNINGS = {
    # Debian's /usr/bin/openssl has no GOST engine: GOST suites cannot be
    # tried.  tlsuv's OpenSSL has no GOST either.
    "engine_problem": "the local openssl has no GOST engine",
    # Debian's openssl has no RC4 suites for testssl.sh's openssl-based RC4
    # check; its socket-based cipher-category check ("cipherlist_LOW") still
    # tries every RC4 suite, and must find none.
    "RC4": "the local openssl has no RC4",
    # testssl.sh tests ticket resumption with `openssl s_client </dev/null`,
    # which closes as soon as stdin is at its end -- often before a TLS 1.3
    # server's NewSessionTicket, sent after the handshake, has arrived (it does
    # the same against openssl s_server).  Resumption is tested in test_policy.py.
    "sessionresumption_ticket": "s_client may exit before the TLS 1.3 ticket arrives",
}

# The checks (see the module docstring); --fast uses one handshake per answer.
CHECKS = ("-p", "-s", "-f", "-P", "-S", "-U", "--fast")

# Ids every complete scan reports: if one is missing, a check did not run.
REQUIRED_IDS = {
    "TLS1", "TLS1_1", "TLS1_2", "TLS1_3", "cipherlist_NULL", "cipherlist_AVERAGE", "PFS_ciphers",
    "PFS_ECDHE_curves", "cipher_order", "cert_chain_of_trust", "cert_revocation", "heartbleed",
    "CCS", "ROBOT", "secure_renego", "secure_client_renego", "CRIME_TLS", "POODLE_SSL",
    "fallback_SCSV", "FREAK", "LOGJAM", "BEAST", "LUCKY13", "scanTime",
}
# Skipped by testssl.sh when there is no TLS 1.2 or older to test it on.
TLS12_IDS = {"SWEET32"}

# Seconds: the wait for an HTTP banner (testssl.sh's HEADER_MAXSLEEP, default 5)
# -- the echo server answers with its greeting and an echo, never with HTTP,
# so every scan waits it out in full.
HEADER_WAIT = "2"
# Seconds before a hung scan is a failure; far above a scan on a busy machine.
SCAN_TIMEOUT = 300


@pytest.fixture(autouse=True)
def _testssl_installed() -> None:
    if TESTSSL is not None:
        return
    unavailable(f"testssl.sh is not installed (Debian/Ubuntu, as root: {INSTALL})", "TLSUV_REQUIRE_TESTSSL")


@dataclass
class ScanCerts:
    ca_file: Path
    cert_file: Path
    key_file: Path


def issue(tmp: Path, key_type: trustme.KeyType) -> ScanCerts:
    """A test CA and a leaf for localhost and 127.0.0.1, valid 90 days.

    90 days is Mozilla's recommended certificate lifespan: short enough for
    testssl.sh's validity checks, long enough for its expiry warnings (60 days).
    """
    ca = trustme.CA(key_type=key_type)
    now = datetime.datetime.now(datetime.UTC)
    leaf = ca.issue_cert("localhost", "127.0.0.1", not_before=now - datetime.timedelta(hours=1),
                         not_after=now + datetime.timedelta(days=90), key_type=key_type)
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp / "server.pem"))
    leaf.private_key_pem.write_to_path(str(tmp / "server.key"))
    return ScanCerts(tmp / "ca.pem", tmp / "server.pem", tmp / "server.key")


@dataclass
class Scan:
    findings: list[dict[str, Any]]
    seconds: float

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {f["id"]: f for f in self.findings}

    def finding(self, ident: str) -> str:
        return str(self.by_id()[ident]["finding"])


def scan(port: int, certs: ScanCerts, out: Path) -> Scan:
    assert TESTSSL is not None
    openssl = shutil.which("openssl")
    assert openssl is not None, "testssl.sh depends on openssl"
    argv = [TESTSSL, "--quiet", "--color", "0", "--warnings", "batch", "--openssl", openssl,
            # The server is on loopback: no DNS (it would only add CAA and rDNS lookups).
            "--ip", "127.0.0.1", "--nodns", "none",
            # Trust the test CA, so that the chain of trust is checked, not excluded.
            "--add-ca", str(certs.ca_file),
            "--jsonfile", str(out), *CHECKS, f"localhost:{port}"]
    env = dict(os.environ, HEADER_MAXSLEEP=HEADER_WAIT)
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=SCAN_TIMEOUT,
                          check=False)
    seconds = time.monotonic() - start
    if not out.exists():
        pytest.fail(f"testssl.sh wrote no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    findings: list[dict[str, Any]] = json.loads(out.read_text())
    # Not an assertion (tests never assert timings): shown with -s, and in the report.
    print(f"testssl.sh scan took {seconds:.1f} s", file=sys.stderr)
    return Scan(findings, seconds)


def problems(result: Scan, required: set[str]) -> list[str]:
    """Every finding that fails the test, as text."""
    bad = []
    for f in result.findings:
        ident, severity = f["id"], f["severity"]
        if severity in HARMLESS or (severity in FINDINGS and ident in EXCLUDED) or \
                (severity == "WARN" and ident in TOLERATED_WARNINGS):
            continue
        label = "WARN (check did not run)" if severity == "WARN" else severity
        bad.append(f"{label} {ident}: {f['finding']}")
    missing = required - result.by_id().keys()
    if missing:
        bad.append(f"checks missing from the scan: {sorted(missing)}")
    return bad


@pytest.fixture(scope="module")
def rsa_certs(tmp_path_factory: pytest.TempPathFactory) -> ScanCerts:
    return issue(tmp_path_factory.mktemp("rsa"), trustme.KeyType.RSA)


@pytest.fixture(scope="module")
def ecdsa_certs(tmp_path_factory: pytest.TempPathFactory) -> ScanCerts:
    return issue(tmp_path_factory.mktemp("ecdsa"), trustme.KeyType.ECDSA)


def echo(certs: ScanCerts, *args: str) -> contextlib.AbstractContextManager[tuple[Interactive, int]]:
    return echo_cli("--cert", str(certs.cert_file), "--key", str(certs.key_file), *args)


def offered_suites(result: Scan) -> set[str]:
    # Every suite the server accepted, in OpenSSL's names (all forward secret:
    # a suite without forward secrecy would show as a failing finding instead).
    return set(result.finding("PFS_ciphers").split())


def expected_suites(profile: profiles.Profile, auth: str) -> set[str]:
    tls12 = set() if profile.min_version == "1.3" else {
        c for c in profile.ciphers.split(":") if c.startswith(f"ECDHE-{auth}-")}
    return set(profile.ciphersuites.split(":")) | tls12


# testssl.sh 3.0 does not know the post-quantum hybrid group, so it sees the others.
CLASSIC_GROUPS = {g for g in profiles.GROUPS if "MLKEM" not in g}


@pytest.mark.timeout(SCAN_TIMEOUT + 60)
def test_default_profile_has_no_finding(rsa_certs: ScanCerts, tmp_path: Path) -> None:
    with echo(rsa_certs) as (_, port):
        result = scan(port, rsa_certs, tmp_path / "default.json")
    bad = problems(result, REQUIRED_IDS | TLS12_IDS)
    assert not bad, "\n".join(bad)
    intermediate = profiles.get("intermediate")
    assert offered_suites(result) == expected_suites(intermediate, "RSA")
    assert set(result.finding("PFS_ECDHE_curves").split()) == CLASSIC_GROUPS
    found = result.by_id()
    assert {v: found[v]["finding"].startswith("offered") for v in ("TLS1", "TLS1_1", "TLS1_2", "TLS1_3")} \
        == {"TLS1": False, "TLS1_1": False, "TLS1_2": True, "TLS1_3": True}
    assert found["cipher_order"]["severity"] == "OK"  # the server orders TLS 1.2 (tlsuv.profiles)
    assert found["cert_chain_of_trust"]["severity"] == "OK"  # --add-ca: really checked


@pytest.mark.timeout(SCAN_TIMEOUT + 60)
def test_modern_profile_has_no_finding(ecdsa_certs: ScanCerts, tmp_path: Path) -> None:
    with echo(ecdsa_certs, "--tls-profile", "modern") as (_, port):
        result = scan(port, ecdsa_certs, tmp_path / "modern.json")
    bad = problems(result, REQUIRED_IDS)
    assert not bad, "\n".join(bad)
    assert offered_suites(result) == expected_suites(profiles.get("modern"), "ECDSA")
    assert set(result.finding("PFS_ECDHE_curves").split()) == CLASSIC_GROUPS
    found = result.by_id()
    assert {v: found[v]["finding"].startswith("offered") for v in ("TLS1", "TLS1_1", "TLS1_2", "TLS1_3")} \
        == {"TLS1": False, "TLS1_1": False, "TLS1_2": False, "TLS1_3": True}
    assert found["cert_chain_of_trust"]["severity"] == "OK"
