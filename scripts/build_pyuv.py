#!/usr/bin/env python3
"""Build a pyuv 1.4.0 wheel that works on Python 3.10+ and cache it in a wheelhouse.

Why this exists: pyuv 1.4.0 (2017) is the last release. Its C source has two
incompatibilities with modern CPython:

* ``Py_REFCNT(self) = refcnt;`` in ``src/handle.c`` -- ``Py_REFCNT`` stopped
  being an lvalue in 3.10, so the file no longer compiles;
* ``PyUnicode_EncodeUTF8(...)`` in ``src/common.c`` -- removed from the C API
  in 3.11, so the module compiles with a warning and then fails to import.

We fetch the sdist with pip (never committing pyuv's source), apply exactly
those two replacements, and refuse to continue if either pattern is missing:
a silently unpatched build would fail much later with a confusing error.

Usage: build_pyuv.py WHEELHOUSE [--python PYTHON]
The wheel is reused when one for this interpreter's tag is already present.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "1.4.0"

# (file, exact old text, new text).  The old text must occur exactly once.
PATCHES: tuple[tuple[str, str, str], ...] = (
    (
        "src/handle.c",
        "Py_REFCNT(self) = refcnt;",
        "Py_SET_REFCNT(self, refcnt);",
    ),
    (
        "src/common.c",
        'PyUnicode_EncodeUTF8(PyUnicode_AS_UNICODE(unicode), '
        'PyUnicode_GET_SIZE(unicode), "surrogateescape")',
        'PyUnicode_AsEncodedString(unicode, "utf-8", "surrogateescape")',
    ),
)


class PatchError(Exception):
    pass


def apply_patches(root: Path) -> None:
    for rel, old, new in PATCHES:
        path = root / rel
        text = path.read_text(encoding="utf-8")
        count = text.count(old)
        if count != 1:
            raise PatchError(
                f"{rel}: expected exactly one occurrence of {old!r}, found {count}; "
                "is this really pyuv 1.4.0?"
            )
        path.write_text(text.replace(old, new), encoding="utf-8")


def cached_wheel(wheelhouse: Path, python: str) -> Path | None:
    tag = subprocess.run(
        [python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    for whl in sorted(wheelhouse.glob(f"pyuv-{VERSION}-{tag}-*.whl")):
        return whl
    return None


def build(wheelhouse: Path, python: str) -> Path:
    wheelhouse.mkdir(parents=True, exist_ok=True)
    found = cached_wheel(wheelhouse, python)
    if found is not None:
        print(f"pyuv: using cached {found.name}")
        return found
    with tempfile.TemporaryDirectory(prefix="tlsuv-pyuv-") as tmp:
        tmpdir = Path(tmp)
        subprocess.run(
            [python, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", ":all:", f"pyuv=={VERSION}", "-d", str(tmpdir)],
            check=True,
        )
        sdists = list(tmpdir.glob(f"pyuv-{VERSION}.tar.gz"))
        if len(sdists) != 1:
            raise PatchError(f"pip did not download pyuv-{VERSION}.tar.gz into {tmpdir}")
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(tmpdir, filter="data")
        src = tmpdir / f"pyuv-{VERSION}"
        apply_patches(src)
        subprocess.run(
            [python, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "-w", str(wheelhouse), str(src)],
            check=True,
        )
    found = cached_wheel(wheelhouse, python)
    if found is None:
        raise PatchError("the pyuv build finished but left no wheel for this interpreter")
    print(f"pyuv: built {found.name}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheelhouse", type=Path)
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter the wheel is built for (default: this one)")
    args = parser.parse_args(argv)
    try:
        build(args.wheelhouse, args.python)
    except PatchError as exc:
        print(f"build_pyuv: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"build_pyuv: command failed ({exc.returncode}): {' '.join(exc.cmd)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
