"""What every test module shares and nothing else owns: the greeting, scripts/, waiting.

Waiting is the trap here.  A loopback test that sleeps "long enough" is slow
when the machine is idle and fails when it is busy; :func:`wait_until` polls
the condition itself and fails with what it was waiting for.  A test that
must let time pass (a timer that must *not* fire) says so where it sleeps.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

# What tlsuv.echo greets every client with, spelt out so the tests pin it.
GREETING = b"OK\r\n"

# scripts/ holds the benchmark and soak code (not an installed package), which
# some tests drive in short form: ``from bench import ...``, ``from lifecycle import ...``.
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

# How often wait_until asks again: short next to any timeout the tests use,
# long enough that a poll over the loop thread (ServerThread.call) stays cheap.
POLL_INTERVAL = 0.005

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], *, timeout: float = 10.0, what: str,
               interval: float = POLL_INTERVAL) -> T:
    """Poll ``predicate`` until it returns something true, and return that.

    Fails with ``waiting for <what>`` after ``timeout`` seconds, so a hung
    test says which condition never came.  The predicate is asked once more
    after the deadline, so a descheduled test thread does not fail by a hair.
    """
    deadline = time.monotonic() + timeout
    while True:
        expired = time.monotonic() > deadline  # taken first: one last look after the deadline
        result = predicate()
        if result:
            return result
        if expired:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)  # the poll interval itself: the one sleep the tests need


def unavailable(message: str, require: str) -> NoReturn:
    """A real peer or tool a test needs is missing: skip, or fail where it was promised.

    ``.ci/run`` installs every such tool and sets its ``require`` variable
    (``TLSUV_REQUIRE_HAPROXY=1``, ...): there a missing tool is a failure, so
    CI cannot pass by skipping.  On a developer's machine it is a skip that
    says what to install.
    """
    if os.environ.get(require) == "1":
        pytest.fail(f"{message}; {require}=1 requires it")
    pytest.skip(message)
