#!/usr/bin/env python3
"""Build a pyuv 1.4.0 wheel that works on CPython 3.11-3.13 and cache it in a wheelhouse.

Why this exists: pyuv 1.4.0 (2017) is the last release. Its C source has two
incompatibilities with modern CPython:

* ``Py_REFCNT(self) = refcnt;`` in ``src/handle.c`` -- ``Py_REFCNT`` stopped
  being an lvalue in 3.10, so the file no longer compiles;
* ``PyUnicode_EncodeUTF8(...)`` in ``src/common.c`` -- removed from the C API
  in 3.11, so the module compiles with a warning and then fails to import.

We fetch the sdist with pip (never committing pyuv's source), apply exactly
those two replacements, and refuse to continue if either pattern is missing:
a silently unpatched build would fail much later with a confusing error.

The wheel is versioned ``1.4.0+tlsuv1``: a PEP 440 *local* version, which
PyPI never hosts.  tlsuv requires exactly that version, so pip can only
satisfy it with a wheel made here; without one it stops at once with
"No matching distribution found for pyuv==1.4.0+tlsuv1" instead of
compiling the unpatched sdist into a page of C errors.  Bump the label (here
and in pyproject.toml; a test checks they agree) whenever PATCHES changes.

The script stands alone (standard library only, nothing from tlsuv), for a
user who wants just the wheel:

    python3.12 build_pyuv.py wheels/          # builds for python3.12
    python3 build_pyuv.py wheels/ --python /path/to/venv/bin/python

It needs pip in the target interpreter, a C compiler, that Python's headers,
and PyPI (for pyuv's sdist and setuptools).  A wheel already in the
wheelhouse for the target's tag is reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "1.4.0"
# The local label that marks our patched build (see the module docstring).
LOCAL_LABEL = "tlsuv1"
WHEEL_VERSION = f"{VERSION}+{LOCAL_LABEL}"

# The CPython minor versions these patches were written for and the whole test
# suite passes on (CI checks each one present).  3.10 needs only the first
# patch but is not tested; 3.14 changes the C API again and has not been tried.
SUPPORTED: tuple[tuple[int, int], ...] = ((3, 11), (3, 12), (3, 13))

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
    (
        "pyuv/_version.py",
        f'__version__ = "{VERSION}"',
        f'__version__ = "{WHEEL_VERSION}"',
    ),
)

# Asked of the target interpreter, which may not be the one running this script.
_PROBE = (
    "import json, sys, importlib.util; print(json.dumps([sys.implementation.name, "
    "list(sys.version_info[:3]), importlib.util.find_spec('pip') is not None]))"
)


class BuildError(Exception):
    """Anything that stops the build; main() prints it as one line."""


# The old name, kept for callers of this module.
PatchError = BuildError


def supported_text() -> str:
    return ", ".join(f"{major}.{minor}" for major, minor in SUPPORTED)


def check_interpreter(python: str) -> str:
    """The wheel tag prefix (``cp312``) for ``python``; BuildError if it is not one we support."""
    try:
        out = subprocess.run([python, "-c", _PROBE], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"cannot run {python} as a Python interpreter") from exc
    impl, version, has_pip = json.loads(out)
    major, minor, micro = version
    if impl != "cpython" or (major, minor) not in SUPPORTED:
        name = {"cpython": "CPython", "pypy": "PyPy"}.get(impl, impl)
        raise BuildError(
            f"{python} is {name} {major}.{minor}.{micro}; the pyuv {VERSION} patches here are "
            f"written and tested for CPython {supported_text()} only")
    if not has_pip:
        raise BuildError(f"{python} has no pip; use a virtual environment ({python} -m venv) "
                         "or install pip for it")
    return f"cp{major}{minor}"


def apply_patches(root: Path) -> None:
    for rel, old, new in PATCHES:
        path = root / rel
        text = path.read_text(encoding="utf-8")
        count = text.count(old)
        if count != 1:
            raise BuildError(
                f"{rel}: expected exactly one occurrence of {old!r}, found {count}; "
                "is this really pyuv 1.4.0?"
            )
        path.write_text(text.replace(old, new), encoding="utf-8")


def extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
            return
        # Pythons before 3.11.4 have no extraction filters: allow only plain
        # files and directories that stay inside dest.
        root = dest.resolve()
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
                raise BuildError(f"{archive.name}: refusing to extract {member.name!r}")
        tar.extractall(dest)


def cached_wheel(wheelhouse: Path, tag: str) -> Path | None:
    for whl in sorted(wheelhouse.glob(f"pyuv-{WHEEL_VERSION}-{tag}-{tag}-*.whl")):
        return whl
    return None


def build(wheelhouse: Path, python: str) -> Path:
    tag = check_interpreter(python)
    wheelhouse.mkdir(parents=True, exist_ok=True)
    found = cached_wheel(wheelhouse, tag)
    if found is not None:
        print(f"pyuv: using cached {found}")
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
            raise BuildError(f"pip did not download pyuv-{VERSION}.tar.gz into {tmpdir}")
        extract(sdists[0], tmpdir)
        src = tmpdir / f"pyuv-{VERSION}"
        apply_patches(src)
        subprocess.run(
            [python, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "-w", str(wheelhouse), str(src)],
            check=True,
        )
    found = cached_wheel(wheelhouse, tag)
    if found is None:
        raise BuildError("the pyuv build finished but left no wheel for this interpreter")
    print(f"pyuv: built {found}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog=f"Supported interpreters: CPython {supported_text()}.")
    parser.add_argument("wheelhouse", type=Path, nargs="?",
                        help="directory for the wheel (created if missing)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter the wheel is built for (default: the one running this)")
    parser.add_argument("--list-supported", action="store_true",
                        help="print the supported Python versions (3.11 3.12 ...) and exit")
    args = parser.parse_args(argv)
    if args.list_supported:
        print(" ".join(f"{major}.{minor}" for major, minor in SUPPORTED))
        return 0
    if args.wheelhouse is None:
        parser.error("the wheelhouse directory is required")
    try:
        wheel = build(args.wheelhouse, args.python)
    except BuildError as exc:
        print(f"build_pyuv: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"build_pyuv: command failed ({exc.returncode}): {' '.join(exc.cmd)}",
              file=sys.stderr)
        return 1
    print(f"pyuv: install it with: {args.python} -m pip install {wheel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
