"""Socket activation: LISTEN_FDS (systemd's protocol) and --listen-fd, with real sockets and processes.

The protocol itself is checked without I/O; the descriptor checks on real
sockets of every wrong kind; the echo server under systemd's own
``systemd-socket-activate``; the units in docs/deployment.md with
``systemd-analyze verify`` (no systemd PID 1 is needed for either); and a
restart under a supervisor played by the test -- it holds the socket,
stops tlsuv and starts the next one while a hammer of clients keeps
connecting -- with zero connections refused, reset or cut.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Certs
from hammer import Hammer, LongLived, NotifySocket, ServerProcess, activated, recv_exactly
from helpers import unavailable

from tlsuv import activation
from tlsuv.activation import ActivationError, Inherited, parse_environment
from tlsuv.workers import available_cpus

ECHO = [sys.executable, "-m", "tlsuv.echo"]
HOST = "127.0.0.1"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"



def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not installed (apt-get install systemd)", "TLSUV_REQUIRE_SYSTEMD")
    return path


# -- the protocol, without I/O ---------------------------------------------------------


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"LISTEN_FDS": "2"}, None),  # no LISTEN_PID: not for anybody
    ({"LISTEN_FDS": "2", "LISTEN_PID": "999"}, None),  # for another process
    ({"LISTEN_FDS": "0", "LISTEN_PID": "100"}, None),
    ({"LISTEN_FDS": "2", "LISTEN_PID": "100"}, Inherited((3, 4), ("unknown", "unknown"))),
    ({"LISTEN_FDS": "1", "LISTEN_PID": "100", "LISTEN_FDNAMES": "tls"}, Inherited((3,), ("tls",))),
    ({"LISTEN_FDS": "2", "LISTEN_PID": "100", "LISTEN_FDNAMES": "v4:v6"}, Inherited((3, 4), ("v4", "v6"))),
])
def test_parse_environment(env: dict[str, str], expected: Inherited | None) -> None:
    assert parse_environment(env, pid=100) == expected


@pytest.mark.parametrize(("env", "message"), [
    ({"LISTEN_FDS": "two", "LISTEN_PID": "100"}, "LISTEN_FDS is not a number"),
    ({"LISTEN_FDS": "-1", "LISTEN_PID": "100"}, "LISTEN_FDS out of range"),
    ({"LISTEN_FDS": "99999999", "LISTEN_PID": "100"}, "LISTEN_FDS out of range"),
    ({"LISTEN_FDS": "1", "LISTEN_PID": "me"}, "LISTEN_PID is not a process id"),
    ({"LISTEN_FDS": "2", "LISTEN_PID": "100", "LISTEN_FDNAMES": "one"},
     "LISTEN_FDNAMES has 1 name(s) but LISTEN_FDS passes 2 socket(s)"),
    ({"LISTEN_FDS": "1", "LISTEN_PID": "100", "LISTEN_FDNAMES": "bad\nname"}, "invalid name"),
])
def test_parse_environment_rejects_garbage(env: dict[str, str], message: str) -> None:
    with pytest.raises(ActivationError, match=re.escape(message)):
        parse_environment(env, pid=100)


def test_take_environment_always_clears_and_warns_about_another_pid(caplog: pytest.LogCaptureFixture) -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    with caplog.at_level(logging.WARNING, logger="tlsuv.activation"):
        assert activation.take_environment(env, pid=4242) is None
    assert env == {"OTHER": "kept"}
    assert "LISTEN_FDS is set for pid 1, not for this process (pid 4242)" in caplog.text
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "4242"}
    assert activation.take_environment(env, pid=4242) == Inherited((3,), ("unknown",))
    assert env == {}


# -- descriptor checks, on real descriptors ------------------------------------------------


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Descriptors a test opens; closed at the end whatever happened."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


def _descriptor(kind: str, fds: list[int], tmp_path: Path) -> int:
    if kind == "listening TCP":
        s = socket.create_server((HOST, 0))
    elif kind == "listening TCP over IPv6":
        s = socket.create_server(("::1", 0), family=socket.AF_INET6)
    elif kind == "UDP":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((HOST, 0))
    elif kind == "bound TCP, not listening":
        s = socket.socket()
        s.bind((HOST, 0))
    elif kind == "listening UNIX":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / "sock"))
        s.listen()
    elif kind == "pipe":
        r, w = os.pipe()
        fds.extend([r, w])
        return r
    elif kind == "closed":
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        return r
    else:  # pragma: no cover
        raise AssertionError(kind)
    fd = s.detach()
    fds.append(fd)
    return fd


@pytest.mark.parametrize("kind", ["listening TCP", "listening TCP over IPv6"])
def test_a_listening_tcp_socket_is_accepted_and_made_close_on_exec(kind: str, fds: list[int],
                                                                  tmp_path: Path) -> None:
    fd = _descriptor(kind, fds, tmp_path)
    os.set_inheritable(fd, True)
    sock = activation.listening_socket(fd)
    assert sock.fileno() == fd and not os.get_inheritable(fd)
    sock.detach()


BAD_DESCRIPTORS = [
    ("UDP", "{label} is not a stream (TCP) socket"),
    ("bound TCP, not listening", "{label} is a TCP socket that is not listening"),
    ("listening UNIX", "{label} is an AF_UNIX socket; tlsuv serves TCP over IPv4 or IPv6"),
    ("pipe", "{label} is not a socket"),
    ("closed", "{label}: not open"),
]


@pytest.mark.parametrize(("kind", "message"), BAD_DESCRIPTORS)
def test_anything_else_is_refused_and_left_open(kind: str, message: str, fds: list[int],
                                               tmp_path: Path) -> None:
    fd = _descriptor(kind, fds, tmp_path)
    with pytest.raises(ActivationError) as info:
        activation.listening_socket(fd)
    assert str(info.value) == message.format(label=f"descriptor {fd}")
    if kind != "closed":
        os.fstat(fd)  # still open: it was lent to us, not given


# -- the command line ----------------------------------------------------------------------


def _one_line_error(argv: list[str], fragment: str, pass_fds: tuple[int, ...] = ()) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, pass_fds=pass_fds)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0], lines[0]
    assert lines[0].startswith("python -m tlsuv.echo: error: "), lines[0]


# A closed descriptor cannot be placed at 3 by the exec step, so LISTEN_FDS skips that one.
@pytest.mark.parametrize(("how", "kind", "message"),
                         [("--listen-fd", k, m) for k, m in BAD_DESCRIPTORS]
                         + [("LISTEN_FDS", k, m) for k, m in BAD_DESCRIPTORS if k != "closed"])
def test_bad_inherited_descriptor_is_one_line_and_exit_2(certs: Certs, how: str, kind: str, message: str,
                                                         *, fds: list[int], tmp_path: Path) -> None:
    fd = _descriptor(kind, fds, tmp_path)
    passed = () if kind == "closed" else (fd,)
    args = ["--cert", str(certs.cert_file), "--key", str(certs.key_file), "--workers", "2"]
    if how == "--listen-fd":
        _one_line_error([*ECHO, *args, "--listen-fd", str(fd)], message.format(label=f"--listen-fd {fd}"),
                        passed)
    else:
        _one_line_error(activated([*ECHO, *args], [fd]), message.format(label="descriptor 3 (LISTEN_FDS)"),
                        passed)


def test_bad_listen_fd_arguments(certs: Certs) -> None:
    _one_line_error([*ECHO, "--listen-fd", "three"], "not a file descriptor number")
    _one_line_error([*ECHO, "--listen-fd", "-1"], "must be 0 or more")
    with socket.create_server((HOST, 0)) as s:
        fd = s.fileno()
        _one_line_error([*ECHO, "--cert", str(certs.cert_file), "--key", str(certs.key_file),
                         "--listen-fd", str(fd), "--listen-fd", str(fd)],
                        f"--listen-fd {fd} given twice", (fd,))
        _one_line_error(activated([*ECHO], [fd], ["a", "b"]),
                        "LISTEN_FDNAMES has 2 name(s) but LISTEN_FDS passes 1 socket(s)", (fd,))


def _session(certs: Certs, port: int, host: str = HOST, payload: bytes = b"ping") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    raw = socket.socket(family)
    raw.settimeout(30)
    raw.connect((host, port))
    with certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
        assert recv_exactly(s, 4) == b"OK\r\n"
        s.sendall(payload)
        assert recv_exactly(s, len(payload)) == payload
        s.unwrap()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_listen_fd_serves_on_the_given_socket_and_leaves_it_to_its_owner(certs: Certs, workers: str) -> None:
    held = socket.create_server((HOST, 0))
    port = held.getsockname()[1]
    srv = ServerProcess([*ECHO, "--cert", str(certs.cert_file), "--key", str(certs.key_file),
                         "--listen-fd", str(held.fileno()), "--workers", workers, "--host", "192.0.2.1",
                         "--port", "1"], pass_fds=[held.fileno()])
    try:
        assert srv.port() == port  # --host/--port are not used
        srv.wait_for(rf"serving on inherited socket 127\.0\.0\.1:{port} \(descriptor {held.fileno()}, "
                     r"IPv4, name listen-fd\)")
        for _ in range(6):
            _session(certs, port)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        # tlsuv closed its copies; ours still listens: the next connection waits in the queue.
        with socket.create_connection((HOST, port), timeout=5):
            pass
        assert not srv.tracebacks(), "\n".join(srv.err)
    finally:
        srv.stop()
        held.close()


def test_sd_notify_ready_and_pid_file(certs: Certs, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path)
    pid_file = tmp_path / "echo.pid"
    srv = ServerProcess([*ECHO, "--port", "0", "--cert", str(certs.cert_file), "--key", str(certs.key_file),
                         "--pid-file", str(pid_file)], env=notify.env())
    try:
        srv.port()
        assert notify.receive() == (srv.proc.pid, "READY=1")
        assert pid_file.read_text() == f"{srv.proc.pid}\n"
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        assert not pid_file.exists()
    finally:
        srv.stop()
        notify.close()


# -- a supervisor that holds the socket: restarts that drop nothing -------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_socket_activated_restart_drops_nothing(certs: Certs, workers: str) -> None:
    """SIGTERM the server and start the next at once: connections queue, none is refused or cut."""
    held = socket.create_server((HOST, 0), backlog=128)
    port = held.getsockname()[1]
    argv = [*ECHO, "--cert", str(certs.cert_file), "--key", str(certs.key_file), "--workers", workers,
            "--grace", "2"]
    servers = []

    def start() -> ServerProcess:
        srv = ServerProcess(activated(argv, [held.fileno()], ["tls"]), pass_fds=[held.fileno()])
        servers.append(srv)
        return srv

    try:
        first = start()
        first.port()
        first.wait_for(rf"serving on inherited socket 127\.0\.0\.1:{port} \(descriptor 3, IPv4, name tls\)")
        ctx = certs.client_ssl_context()
        long_lived = LongLived(HOST, port, ctx, 3)
        with Hammer(HOST, port, ctx, clients=4) as hammer:
            hammer.wait_ok(20)
            first.signal(signal.SIGTERM)
            second = start()  # while the first drains: both hold the socket for a while
            long_lived.echo("during the drain")  # served to the end of the grace period...
            long_lived.expect_close_notify()  # ... then closed cleanly
            assert first.wait() == 0
            second.port()
            hammer.wait_ok(20)  # the second one alone
            result = hammer.stop()
        print(f"\nsocket-activated restart (--workers {workers}): hammer {result.summary()}")
        result.assert_clean()
        second.signal(signal.SIGTERM)
        assert second.wait() == 0
        for srv in servers:
            assert not srv.tracebacks(), "\n".join(srv.err)
    finally:
        for srv in servers:
            srv.stop()
        held.close()


# -- systemd's own tools ---------------------------------------------------------------------


def _free_port(family: socket.AddressFamily, host: str) -> int:
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def socket_activate(argv: list[str], listen: list[str], fdnames: str | None = None,
                    setenv: dict[str, str] | None = None) -> tuple[ServerProcess, list[int]]:
    """``systemd-socket-activate`` listening on ``listen`` hosts (ports picked free), running ``argv``.

    The tool gives the program a small environment of its own; ``setenv``
    adds to it (``-E``), as a unit's ``Environment=`` would.

    The tool needs a port number; one picked free a moment before may be
    taken in between, so a failed start is retried with other ports.
    """
    tool = _tool("systemd-socket-activate")
    for _ in range(5):
        ports, flags = [], []
        for host in listen:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            ports.append(_free_port(family, host))
            shown = f"[{host}]" if ":" in host else host
            flags += ["-l", f"{shown}:{ports[-1]}"]
        if fdnames is not None:
            flags.append(f"--fdname={fdnames}")
        for name, value in (setenv or {}).items():
            flags += ["-E", f"{name}={value}"]
        srv = ServerProcess([tool, *flags, *argv])
        try:
            srv.wait_for(rf"Listening on .*:{ports[-1]} as {2 + len(listen)}\.", timeout=10)
            return srv, ports
        except AssertionError:  # a port taken between our probe and its bind: try others
            srv.stop()
            if not any("Address already in use" in line for line in srv.err):
                raise
    raise AssertionError("systemd-socket-activate found no free port in 5 tries")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_under_systemd_socket_activate(certs: Certs, workers: str) -> None:
    argv = [*ECHO, "--cert", str(certs.cert_file), "--key", str(certs.key_file), "--workers", workers]
    srv, (port4, port6) = socket_activate(argv, [HOST, "::1"], fdnames="v4:v6")
    try:
        # The tool starts tlsuv on the first connection, which waits in the queue meanwhile.
        _session(certs, port4)
        srv.wait_for(rf"serving on inherited socket 127\.0\.0\.1:{port4} \(descriptor 3, IPv4, name v4\)")
        srv.wait_for(rf"serving on inherited socket \[::1\]:{port6} \(descriptor 4, IPv6, name v6\)")
        for _ in range(4):
            _session(certs, port4)
            _session(certs, port6, host="::1")
        assert srv.out[-2:] == [f"tlsuv echo server listening on 127.0.0.1:{port4}",
                                f"tlsuv echo server listening on [::1]:{port6}"]
        srv.signal(signal.SIGTERM)  # the tool exec'ed tlsuv: same pid
        assert srv.wait() == 0
        assert not srv.tracebacks(), "\n".join(srv.err)
    finally:
        srv.stop()


def test_systemd_socket_activate_with_mismatched_names(certs: Certs) -> None:
    argv = [*ECHO, "--cert", str(certs.cert_file), "--key", str(certs.key_file)]
    srv, (port,) = socket_activate(argv, [HOST], fdnames="one:two")
    try:
        with socket.create_connection((HOST, port), timeout=10) as s:
            s.settimeout(30)
            # Never accepted: an end of file or a reset when the socket closes with tlsuv.
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(10) == b""
        assert srv.wait() == 2
        srv.wait_for(r"^python -m tlsuv\.echo: error: LISTEN_FDNAMES has 2 name\(s\) but LISTEN_FDS passes "
                     r"1 socket\(s\)$")
    finally:
        srv.stop()


# -- the units in docs/deployment.md -----------------------------------------------------------


def _ini_blocks() -> list[str]:
    return re.findall(r"```ini\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)


def _documented_units() -> dict[str, str]:
    """The blocks that start with ``# /etc/systemd/system/NAME``, by NAME."""
    units = {}
    for block in _ini_blocks():
        m = re.match(r"# /etc/systemd/system/(\S+)\n", block)
        if m:
            units[m.group(1)] = block
    return units


def _runnable(unit: str) -> str:
    """The unit with its interpreter replaced by ours: verify checks that it exists."""
    return unit.replace("/opt/tlsuv/.venv/bin/python", sys.executable)


def _verify(directory: Path, names: list[str]) -> None:
    tool = _tool("systemd-analyze")
    proc = subprocess.run([tool, "verify", *(str(directory / n) for n in names)], capture_output=True,
                          text=True, timeout=60, check=False)
    # Unknown keys and bad values are warnings with exit status 0: any output fails too.
    assert proc.returncode == 0 and not proc.stderr.strip() and not proc.stdout.strip(), proc


def test_documented_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = _documented_units()
    assert set(units) == {"tlsuv.socket", "tlsuv.service"}, set(units)
    for name, text in units.items():
        (tmp_path / name).write_text(_runnable(text))
    _verify(tmp_path, ["tlsuv.socket", "tlsuv.service"])
    # The unit for a server that binds its own port, on its own.
    standalone = [b for b in _ini_blocks() if "[Service]" in b and not b.startswith("# /etc/")]
    assert len(standalone) == 1
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "tlsuv.service").write_text(_runnable(standalone[0]))
    _verify(tmp_path / "alone", ["tlsuv.service"])
    # And verify really complains about what is wrong: this test can fail.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tlsuv.service").write_text(_runnable(standalone[0]).replace("Type=notify",
                                                                                     "Type=notifyy"))
    with pytest.raises(AssertionError):
        _verify(tmp_path / "bad", ["tlsuv.service"])


def _service_line(key: str) -> list[str]:
    text = _documented_units()["tlsuv.service"].replace("\\\n", " ")
    m = re.search(rf"^{key}=(.*)$", text, flags=re.MULTILINE)
    assert m, key
    return shlex.split(m.group(1))


def test_documented_service_runs_and_reloads(certs: Certs, tmp_path: Path) -> None:
    """The documented ExecStart under systemd-socket-activate; ExecReload is an upgrade; MAINPID follows."""
    argv = _service_line("ExecStart")
    assert argv[0] == "/opt/tlsuv/.venv/bin/python"
    argv[0] = sys.executable
    files = {"/etc/tlsuv/server.pem": str(certs.cert_file), "/etc/tlsuv/server.key": str(certs.key_file)}
    argv = [files.get(a, a) for a in argv]
    assert argv[argv.index("--workers") + 1] == "auto"
    if available_cpus() < 2:  # auto would mean one process, which has no upgrades
        argv[argv.index("--workers") + 1] = "2"
    notify = NotifySocket(tmp_path)
    srv, (port,) = socket_activate(argv, [HOST], fdnames="tls", setenv={"NOTIFY_SOCKET": notify.path})
    try:
        _session(certs, port)
        main = srv.proc.pid  # the tool exec'ed tlsuv
        assert notify.receive() == (main, "READY=1")
        reload = _service_line("ExecReload")
        assert reload == ["/bin/kill", "-USR2", "$MAINPID"]
        assert stat.S_ISREG(os.stat(reload[0]).st_mode)
        mark = srv.mark()
        subprocess.run([reload[0], reload[1], str(main)], check=True, timeout=10)
        new = int(srv.wait_for(r"upgrade: the new tree \(pid (\d+)\) serves", start=mark).group(1))
        assert notify.receive() == (main, f"MAINPID={new}")
        srv.wait_for(r"serving on inherited socket 127\.0\.0\.1:\d+ \(descriptor 3, IPv4, name tls\)",
                     start=mark)
        assert srv.wait() == 0  # the old main process, drained
        _session(certs, port)
        os.kill(new, signal.SIGTERM)
        srv.wait_group_gone()
        assert not srv.tracebacks(), "\n".join(srv.err)
    finally:
        srv.stop()
        notify.close()
