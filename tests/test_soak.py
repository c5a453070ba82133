"""The long runs, kept out of ``make test`` (``make soak`` runs them), and their short forms."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SCRIPTS
from lifecycle.common import start_echo
from lifecycle.flood import flood

MIB = 1 << 20


def test_memory_stays_bounded_when_the_peer_does_not_read(tmp_path: Path) -> None:
    """The short form of scripts/lifecycle/flood.py: 256 MiB offered in 3 s, never read."""
    server = start_echo(tmp_path)
    try:
        r = flood(server, total=256 * MIB, seconds=3.0)
    finally:
        assert server.stop() == 0
    assert r.sent < 256 * MIB, "the server must stop reading a peer that does not read"
    assert r.growth < 64 * MIB, f"server grew by {r.growth / MIB:.1f} MiB"


@pytest.mark.slow
@pytest.mark.timeout(400)  # the script's own limit (300 s) decides; pyproject's 120 s is for the suite
def test_flood_one_gib() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPTS / "lifecycle" / "flood.py"), "--total", "1G",
                           "--seconds", "60"], capture_output=True, text=True, timeout=300, check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(1900)  # ~110 s on a quiet machine, several times that on a busy one
def test_ten_thousand_bad_peer_cycles() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPTS / "lifecycle" / "soak.py"), "--cycles", "10000"],
                          capture_output=True, text=True, timeout=1800, check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
