"""tlsuv as a user installs it: ``make dist``, an offline install, the console scripts, ``-m``.

The round trip builds ``dist/`` with the Makefile's own ``make dist``, installs it
into a fresh venv with pip ignoring every index, config file and environment
variable (so ``dist/`` alone must suffice), and runs a one-connection echo through
the installed ``tlsuv-echo`` with Python's ssl and with the installed
``tlsuv-client`` as the TLS clients.  CI runs this file on every supported
interpreter it finds (``make test-core``).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from conftest import Certs, recv_exactly
from helpers import GREETING
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from peers import Interactive

ROOT = Path(__file__).resolve().parents[1]
BUILD_PYUV = ROOT / "scripts" / "build_pyuv.py"


def load_build_pyuv() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_pyuv", BUILD_PYUV)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean_env() -> dict[str, str]:
    """This environment without what could make a subprocess find tlsuv or wheels elsewhere."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PIP_", "PYTHON")) and k != "VIRTUAL_ENV"}


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


# -- metadata that must agree ----------------------------------------------------------------


def test_metadata_states_exactly_the_tested_pythons() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    supported = set(load_build_pyuv().SUPPORTED)
    spec = SpecifierSet(project["requires-python"])
    candidates = {(3, minor) for minor in range(6, 20)}
    assert {v for v in candidates if spec.contains(f"{v[0]}.{v[1]}.0")} == supported
    classified = {tuple(int(n) for n in c.rsplit(" ", 1)[1].split("."))
                  for c in project["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert classified == supported
    assert (sys.version_info.major, sys.version_info.minor) in supported, "tests run on an untested Python"


def test_pyuv_pin_is_the_wheel_build_pyuv_makes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "pyuv"]
    assert [str(p.specifier) for p in pins] == [f"=={load_build_pyuv().WHEEL_VERSION}"]


def test_console_scripts() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tlsuv-echo": "tlsuv.echo:main", "tlsuv-client": "tlsuv.client_cli:main"}


# -- scripts/build_pyuv.py on its own --------------------------------------------------------


def test_build_pyuv_uses_only_the_standard_library() -> None:
    # A user may copy this one file anywhere: it must not import tlsuv or any other package.
    tree = ast.parse(BUILD_PYUV.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported - sys.stdlib_module_names


def fake_python(tmp_path: Path, name: str, implementation: str, version: tuple[int, int, int]) -> Path:
    """An executable that answers build_pyuv's probe as another interpreter would."""
    path = tmp_path / name
    answer = json.dumps([implementation, list(version), True])
    path.write_text(f"#!/bin/sh\necho '{answer}'\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(("implementation", "version", "shown"), [
    ("cpython", (3, 14, 0), "CPython 3.14.0"),
    ("cpython", (3, 10, 13), "CPython 3.10.13"),
    ("pypy", (3, 11, 9), "PyPy 3.11.9"),
])
def test_build_pyuv_refuses_an_untested_interpreter_in_one_line(
        tmp_path: Path, implementation: str, version: tuple[int, int, int], shown: str) -> None:
    python = fake_python(tmp_path, "python-under-test", implementation, version)
    argv = [sys.executable, str(BUILD_PYUV), str(tmp_path / "wheels"), "--python", str(python)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"build_pyuv: {python} is {shown};"), proc.stderr
    assert "CPython 3.11, 3.12, 3.13 only" in proc.stderr
    assert not (tmp_path / "wheels").exists()


def test_build_pyuv_runs_from_a_copy_outside_the_project(tmp_path: Path) -> None:
    # Offline, so it can only reuse the wheel `make setup` built; the build itself runs in
    # CI, where .ci/run builds each extra interpreter's wheel from such a copy.
    copy = tmp_path / "elsewhere" / "build_pyuv.py"
    copy.parent.mkdir()
    shutil.copy(BUILD_PYUV, copy)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = list((ROOT / ".wheels").glob(f"pyuv-{load_build_pyuv().WHEEL_VERSION}-{tag}-{tag}-*.whl"))
    assert len(wheels) == 1, "make setup builds this wheel first"
    house = tmp_path / "house"
    house.mkdir()
    shutil.copy(wheels[0], house)
    proc = run([sys.executable, "-I", str(copy), str(house)], cwd=copy.parent, timeout=60)
    assert f"using cached {house / wheels[0].name}" in proc.stdout
    assert f"-m pip install {house / wheels[0].name}" in proc.stdout


# -- python -m: nothing runs twice ------------------------------------------------------------

AUDIT_SITECUSTOMIZE = '''
import atexit, collections, json, os, sys
_runs = collections.Counter()
def _hook(event, args):
    if event == "exec" and hasattr(args[0], "co_filename"):
        _runs[args[0].co_filename] += 1
sys.addaudithook(_hook)
def _dump():
    with open(os.environ["TLSUV_EXEC_LOG"], "w") as f:
        json.dump(_runs, f)
atexit.register(_dump)
'''


@pytest.mark.parametrize(("module", "entry"), [
    ("tlsuv.client", "tlsuv/client/__main__.py"),
    ("tlsuv.echo", "tlsuv/echo.py"),
    ("tlsuv", "tlsuv/__main__.py"),
])
def test_python_m_executes_each_module_once(tmp_path: Path, module: str, entry: str) -> None:
    # Every module body run -- an import or runpy's __main__ -- is an "exec" audit event.
    # `python -m tlsuv.client` used to run client.py twice: as __main__, then imported.
    (tmp_path / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    log = tmp_path / "exec.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TLSUV_EXEC_LOG": str(log)}
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m {'tlsuv.echo' if module == 'tlsuv' else module}")
    spec = importlib.util.find_spec("tlsuv")
    assert spec is not None and spec.origin is not None
    package = Path(spec.origin).parent
    runs = {Path(name).relative_to(package.parent).as_posix(): count
            for name, count in json.loads(log.read_text()).items()
            if Path(name).is_relative_to(package)}
    assert runs.get(entry) == 1, runs  # the hook saw the entry point itself
    assert "tlsuv/__init__.py" in runs
    assert {name: count for name, count in runs.items() if count != 1} == {}


# -- the round trip: make dist, a fresh venv, no index ---------------------------------------


def test_dist_installs_offline_and_serves_tls(tmp_path: Path, certs: Certs) -> None:
    dist = tmp_path / "dist"
    # The real `make dist`, with this test's venv; -o: never re-run `make setup` from a test.
    run(["make", "--no-print-directory", "-o", f"{sys.prefix}/.installed", "dist",
         f"VENV={sys.prefix}", f"DIST={dist}"], cwd=ROOT)
    names = sorted(p.name for p in dist.iterdir())
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert "tlsuv-0.1.0.tar.gz" in names
    assert any(re.fullmatch(r"tlsuv-0\.1\.0-.+\.whl", n) for n in names), names
    assert any(re.fullmatch(rf"pyuv-1\.4\.0\+tlsuv1-{tag}-{tag}-.+\.whl", n) for n in names), names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    bin_ = venv / "bin"
    # --isolated: no pip.conf, no PIP_* variables -- dist/ is the only place to look.
    run([str(bin_ / "python"), "-m", "pip", "--isolated", "install", "--quiet", "--no-index",
         "--find-links", str(dist), "tlsuv"], cwd=tmp_path)

    probe = run([str(bin_ / "python"), "-c",
                 "import importlib.metadata as m, tlsuv, pyuv; "
                 "print(tlsuv.__file__); print(m.version('pyuv'))"], cwd=tmp_path).stdout.split()
    assert Path(probe[0]).is_relative_to(venv), f"imported tlsuv from {probe[0]}, not the venv"
    assert probe[1] == "1.4.0+tlsuv1"
    assert run([str(bin_ / "tlsuv-echo"), "--help"], cwd=tmp_path).stdout.startswith("usage: tlsuv-echo ")
    assert run([str(bin_ / "tlsuv-client"), "--help"], cwd=tmp_path).stdout.startswith("usage: tlsuv-client ")
    assert run([str(bin_ / "python"), "-m", "tlsuv.client", "--help"],
               cwd=tmp_path).stdout.startswith("usage: python -m tlsuv.client ")

    echo = [str(bin_ / "tlsuv-echo"), "--port", "0", "--cert", str(certs.cert_file),
            "--key", str(certs.key_file), "--log-level", "warning"]
    with Interactive(echo, cwd=str(tmp_path), env=clean_env()) as server:
        port = int(server.read_match(rb"listening on 127\.0\.0\.1:(\d+)\r?\n", timeout=30).group(1))
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert recv_exactly(tls, len(GREETING)) == GREETING
            tls.sendall(b"through the installed tlsuv-echo")
            assert recv_exactly(tls, 32) == b"through the installed tlsuv-echo"
        client = subprocess.run([str(bin_ / "tlsuv-client"), "--cafile", str(certs.ca_file),
                                 f"localhost:{port}"], input=b"and tlsuv-client", cwd=tmp_path,
                                env=clean_env(), capture_output=True, timeout=30, check=False)
        assert client.returncode == 0, client.stderr
        assert client.stdout == GREETING + b"and tlsuv-client"
        server.proc.terminate()
        assert server.wait(15) == 0, server.err

    shutil.rmtree(venv)
    assert not venv.exists()
