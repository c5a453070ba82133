"""A real Prometheus scrapes a running tlsuv, with the configuration docs/deployment.md shows.

Needs Debian's ``prometheus`` package; without it the test is skipped,
unless ``TLSUV_REQUIRE_PROMETHEUS=1`` (set by ``.ci/run``, which installs
it) makes that a failure.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from clients import CountingClient
from conftest import Certs
from cryptography import x509
from helpers import GREETING, unavailable
from test_metrics import echo_with_metrics

DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        unavailable("prometheus is not installed (apt-get install prometheus)", "TLSUV_REQUIRE_PROMETHEUS")
    return path


def doc_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), re.S)


def free_port() -> int:
    # Prometheus cannot report a port 0 it was given: pick one, then hand it over.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def query(base: str, promql: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    assert answer["status"] == "success", answer
    return answer["data"]  # type: ignore[no-any-return]  # JSON: Any by nature, checked by the callers


def wait(predicate: Any, what: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (urllib.error.URLError, ConnectionError):
            pass  # Prometheus (or tlsuv) not answering yet: the deadline below decides
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}; prometheus log:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_prometheus_scrapes_tlsuv_and_the_documented_queries_run(certs: Certs, tmp_path: Path) -> None:
    binary = prometheus_binary()
    (config,) = doc_blocks("yaml")
    queries = doc_blocks("promql")
    assert len(queries) == 3
    with echo_with_metrics(certs) as (sup, mport):
        for _ in range(3):
            c = CountingClient(sup.port, certs.client_ssl_context())
            c.handshake()
            assert c.read_exactly(len(GREETING)) == GREETING
            c.close_clean()
        garbage = CountingClient(sup.port, None, prefix=b"not TLS\r\n\r\n")
        garbage.wait_eof()

        config = re.sub(r'targets: \[.*\]', f'targets: ["127.0.0.1:{mport}"]', config)
        config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
        (tmp_path / "prometheus.yml").write_text(config)
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={tmp_path / 'data'}",
                                     f"--web.listen-address=127.0.0.1:{port}"],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            def handshakes() -> float | None:
                result = query(base, 'tlsuv_handshakes_completed_total{job="tlsuv"}')["result"]
                return float(result[0]["value"][1]) if result else None

            wait(lambda: handshakes() == 3, "Prometheus never saw the 3 handshakes", 90, proc, log)
            up = query(base, 'up{job="tlsuv"}')["result"]
            assert [float(r["value"][1]) for r in up] == [1.0]
            failed = query(base, 'tlsuv_handshakes_failed_total{reason="protocol"}')["result"]
            assert float(failed[0]["value"][1]) == 1
            # Each documented query runs; rates need two scrapes in their window.
            wait(lambda: query(base, queries[0])["result"], "the failure-rate query stayed empty", 30, proc,
                 log)
            reasons = {r["metric"]["reason"] for r in query(base, queries[0])["result"]}
            assert reasons >= {"protocol", "timeout", "certificate_rejected"}
            versions = {r["metric"]["version"] for r in query(base, queries[1])["result"]}
            assert versions == {"TLSv1.3"}
            (days,) = query(base, queries[2])["result"]
            not_after = x509.load_pem_x509_certificate(certs.cert_file.read_bytes()).not_valid_after_utc
            assert days["metric"] == {"name": "default"}
            assert float(days["value"][1]) == pytest.approx((not_after.timestamp() - time.time()) / 86400,
                                                            abs=0.01)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover - only if it hangs
                proc.kill()
                proc.wait(10)
