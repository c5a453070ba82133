#!/usr/bin/env python3
"""Run pytest under valgrind memcheck and fail on any error that involves tlsuv._speedups.

Why a script and not just ``valgrind python -m pytest``: CPython 3.11 itself
makes memcheck report errors on every run -- integers built by
``int.from_bytes``/``int()`` carry an uninitialised digit that the small-int
check reads, and glibc's AVX2 ``wmemcmp`` reads past the end of short
strings.  None of that is tlsuv's, and a suppression list for it would be
long and tied to one CPython build.  So valgrind runs with
``--track-origins=yes`` and this script reads its log: an error counts if
``_speedups`` appears anywhere in it -- in the stack where it happened, in
the stack that allocated the memory it touched, or in the stack that created
an uninitialised value -- or if it is a kind CPython's noise never produces
(an invalid write or free, overlapping memcpy, a system call given bad
memory).  Everything else is summarised as other errors, with their origin
functions, so a reader can check that claim.

    .venv/bin/python scripts/memcheck.py tests/test_speedups.py tests/test_tls_core.py -k compiled

Exit status: pytest's if it failed, 1 if a counted error was found, else 0.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Kinds of error that CPython's known noise never produces: any of these fails the run.
ALWAYS_COUNTED = ("Invalid write", "Invalid free", "Mismatched free", "Source and destination overlap",
                  "Syscall param", "Argument 'size' of function")


def split_errors(log: str) -> list[str]:
    """The error records of a valgrind log: blocks of ``==PID==`` lines between blank ones."""
    records: list[str] = []
    current: list[str] = []
    for line in log.splitlines():
        m = re.match(r"==\d+== ?(.*)$", line)
        if m is None:
            continue
        text = m.group(1)
        if not text.strip():
            if current:
                records.append("\n".join(current))
                current = []
            continue
        current.append(text)
    if current:
        records.append("\n".join(current))
    # Keep error records only (they start with a description, then "at 0x...").
    return [r for r in records if "\n" in r and re.search(r"^\s+at 0x", r, re.M)]


def counted(record: str) -> bool:
    return "_speedups" in record or record.startswith(ALWAYS_COUNTED)


def origin(record: str) -> str:
    """Where the memory or value came from, in one phrase, for the summary of the rest."""
    m = re.search(r"(?:was created by|alloc'd|free'd).*?\n(?:.*\n)*?\s+by 0x[0-9A-F]+: (\S+)", record)
    if m:
        return m.group(1)
    m = re.search(r"at 0x[0-9A-F]+: (\S+)", record)
    return m.group(1) if m else "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--log", type=Path, help="keep valgrind's log here (default: a temporary file)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log_path = args.log or Path(tmp) / "memcheck.log"
        env = os.environ | {
            # Every Python allocation through malloc, so memcheck sees each block's bounds.
            "PYTHONMALLOC": "malloc",
            # No bytecode writes under valgrind: they are slow there and nothing is gained.
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        argv = ["valgrind", "--tool=memcheck", "--track-origins=yes", "--num-callers=40",
                "--errors-for-leak-kinds=none", "--leak-check=no", "--trace-children=no",
                f"--log-file={log_path}", sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                *args.pytest_args]
        print("+", " ".join(argv), flush=True)
        rc = subprocess.run(argv, env=env, check=False).returncode
        log = log_path.read_text(errors="replace")
    records = split_errors(log)
    ours = [r for r in records if counted(r)]
    rest = collections.Counter(f"{r.splitlines()[0]} (from {origin(r)})" for r in records if not counted(r))
    print(f"\nmemcheck: {len(records)} error records; {len(ours)} involve tlsuv._speedups "
          f"or are of a kind CPython's noise never is")
    for r in ours:
        print("\n" + r)
    if rest:
        print("\nthe others (CPython and glibc, not tlsuv):")
        for what, n in rest.most_common():
            print(f"  {n:5d}  {what}")
    if rc != 0:
        print(f"\nmemcheck: pytest failed (exit {rc})")
        return rc
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
