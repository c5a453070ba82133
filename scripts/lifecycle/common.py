"""What the lifecycle scripts share: a tlsuv echo server in a child process, and its memory."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tlsuv.certs import self_signed


@dataclass
class EchoProcess:
    proc: subprocess.Popen[str]
    port: int

    def rss_bytes(self) -> int:
        """Resident memory of the server process (VmRSS from /proc)."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        assert m, "no VmRSS in /proc status"
        return int(m.group(1)) * 1024

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_echo(workdir: Path, *extra: str) -> EchoProcess:
    """Start ``python -m tlsuv.echo`` on a free port with a fresh certificate in ``workdir``."""
    bundle = self_signed()
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    cert.write_bytes(bundle.cert_pem)
    key.write_bytes(bundle.key_pem)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlsuv.echo", "--port", "0", "--cert", str(cert), "--key", str(key),
         "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"listening on .*:(\d+)$", line.strip())
        if m:
            return EchoProcess(proc, int(m.group(1)))
        if not line:
            break
    proc.kill()
    raise RuntimeError("echo server did not start")
