"""SIGUSR2 with ``--workers``: a new process tree from what is on disk, on the same sockets, dropping nothing.

Every test runs real servers (``python -m tlsuv.echo`` or a library script)
in their own session, a :class:`~hammer.Hammer` of client threads that keep
opening full TLS echo sessions through the upgrade, and connections opened
before it that must be served until the old tree's grace period ends and
then closed with close_notify.  The certificate on disk is replaced before
the upgrade, so each session can tell which tree served it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from conftest import Certs, ServerThread
from hammer import Hammer, LongLived, NotifySocket, ServedBy, ServerProcess, recv_exactly

ECHO = [sys.executable, "-m", "tlsuv.echo"]
HOST = "127.0.0.1"


@dataclass
class CertFiles:
    """The server's certificate and key as files we may replace, and the next pair to put there."""

    cert: Path
    key: Path
    ca: trustme.CA

    def replace(self) -> str:
        """Install a fresh certificate for the same names (atomically, as deploy tools do); its digest."""
        leaf = self.ca.issue_cert("localhost", "127.0.0.1", "::1")
        pems = ((self.cert, leaf.cert_chain_pems[0].bytes()), (self.key, leaf.private_key_pem.bytes()))
        for path, pem in pems:
            tmp = path.with_suffix(".new")
            tmp.write_bytes(pem)
            tmp.replace(path)
        return digest_of_pem(self.cert)

    def digest(self) -> str:
        return digest_of_pem(self.cert)


def digest_of_pem(path: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


@pytest.fixture
def cert_files(certs: Certs, tmp_path: Path) -> CertFiles:
    files = CertFiles(tmp_path / "server.pem", tmp_path / "server.key", certs.ca)
    files.cert.write_bytes(certs.cert_file.read_bytes())
    files.key.write_bytes(certs.key_file.read_bytes())
    return files


def start(argv: list[str], **kwargs: object) -> tuple[ServerProcess, int]:
    # ServerProcess's keyword arguments, forwarded; ** hides their types.
    srv = ServerProcess(argv, **kwargs)  # type: ignore[arg-type]
    try:
        return srv, srv.port()
    except BaseException:
        srv.stop()
        raise


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Every server a test starts is killed (its whole process group) at the end."""
    started: list[ServerProcess] = []
    yield started
    for srv in started:
        srv.stop()


def echo_cmd(files: CertFiles, *args: str) -> list[str]:
    return [*ECHO, "--port", "0", "--cert", str(files.cert), "--key", str(files.key), *args]


def new_parent(srv: ServerProcess, mark: int) -> int:
    return int(srv.wait_for(r"upgrade: the new tree \(pid (\d+)\) serves", start=mark).group(1))


@pytest.mark.parametrize("sockets", ["bound by tlsuv", "--listen-fd"])
def test_upgrade_drops_nothing(certs: Certs, cert_files: CertFiles, tmp_path: Path,
                               servers: list[ServerProcess], sockets: str) -> None:
    pid_file = tmp_path / "tlsuv.pid"
    notify = NotifySocket(tmp_path)
    args = ["--workers", "2", "--grace", "3", "--pid-file", str(pid_file)]
    held_sock = None
    if sockets == "--listen-fd":  # a socket some other supervisor made and keeps
        held_sock = socket.create_server((HOST, 0))
        args += ["--listen-fd", str(held_sock.fileno())]
    try:
        srv, port = start(echo_cmd(cert_files, *args), env=notify.env(),
                          pass_fds=[held_sock.fileno()] if held_sock else [])
        servers.append(srv)
        old = srv.proc.pid
        assert notify.receive() == (old, "READY=1")
        assert int(pid_file.read_text()) == old
        old_cert = cert_files.digest()
        ctx = certs.client_ssl_context()
        held = LongLived(HOST, port, ctx, 4)
        served_by = ServedBy()
        hammer = Hammer(HOST, port, ctx, clients=4, check=served_by)
        hammer.start()
        try:
            hammer.wait_ok(20)
            new_cert = cert_files.replace()  # the new tree must load what is on disk now
            mark = srv.mark()
            signalled = time.monotonic()
            srv.signal(signal.SIGUSR2)
            new = new_parent(srv, mark)
            # The manager hears of the new main process from the old one (NotifyAccess=main).
            assert notify.receive() == (old, f"MAINPID={new}")
            held.echo("after the hand-over")  # the old workers serve them through the grace period
            hammer.wait_ok(20)
            held.expect_close_notify()  # ... and end them cleanly when it is over
            assert srv.wait() == 0  # the old parent, once its workers drained
            old_gone = time.monotonic()
            hammer.wait_ok(40)
        finally:
            result = hammer.stop()
        print(f"\nupgrade ({sockets}): hammer {result.summary()}; served by old/new certificate: "
              f"{served_by.counts[old_cert]}/{served_by.counts[new_cert]}")
        result.assert_clean()
        assert result.ok_between(signalled, old_gone) > 0
        # Both trees served, the new one last: nothing was left to the old one at the end.
        assert served_by.counts[old_cert] > 0 and served_by.counts[new_cert] > 0
        assert served_by.order[-1] == new_cert
        assert int(pid_file.read_text()) == new
        srv.wait_for(r"worker [12] \(pid \d+\) drained and exited", start=mark)
        # The new tree stops like any other.
        os.kill(new, signal.SIGTERM)
        srv.wait_group_gone()
        assert not pid_file.exists()
        assert not srv.tracebacks(), "\n".join(srv.err)
    finally:
        notify.close()
        if held_sock is not None:
            held_sock.close()


def test_failed_upgrade_keeps_the_old_tree_serving(certs: Certs, cert_files: CertFiles,
                                                   servers: list[ServerProcess]) -> None:
    srv, port = start(echo_cmd(cert_files, "--workers", "2", "--grace", "2"))
    servers.append(srv)
    ctx = certs.client_ssl_context()
    good = cert_files.digest()
    with Hammer(HOST, port, ctx, clients=3) as hammer:
        hammer.wait_ok(10)
        cert_files.cert.write_text("-----BEGIN CERTIFICATE-----\nhalf-written\n")
        mark = srv.mark()
        srv.signal(signal.SIGUSR2)
        m = srv.wait_for(r"upgrade failed: the new process \(pid (\d+)\) exited with status 2 before all "
                         r"its workers served; still serving with this tree \(pid (\d+)\)", start=mark)
        assert int(m.group(2)) == srv.proc.pid
        # The new process said why, in the same log.
        srv.wait_for(r"python -m tlsuv\.echo: error: .*certificate", start=mark)
        hammer.wait_ok(10)
        # Fixed on disk, the next SIGUSR2 works.
        new_cert = cert_files.replace()
        mark = srv.mark()
        srv.signal(signal.SIGUSR2)
        new = new_parent(srv, mark)
        assert srv.wait() == 0
        hammer.wait_ok(20)
        result = hammer.stop()
    print(f"\nfailed, then good upgrade: hammer {result.summary()}")
    result.assert_clean()
    with socket.create_connection((HOST, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None and hashlib.sha256(der).hexdigest() == new_cert != good
        assert recv_exactly(s, 4) == b"OK\r\n"
    os.kill(new, signal.SIGTERM)
    srv.wait_group_gone()


def test_stop_during_an_upgrade_stops_both_trees(cert_files: CertFiles,
                                                 servers: list[ServerProcess]) -> None:
    srv, port = start(echo_cmd(cert_files, "--workers", "2", "--grace", "2"))
    servers.append(srv)
    mark = srv.mark()
    srv.signal(signal.SIGUSR2)
    new = int(srv.wait_for(r"upgrade: new parent is pid (\d+)", start=mark).group(1))
    srv.signal(signal.SIGTERM)  # before the new tree serves
    srv.wait_for(rf"SIGTERM during the upgrade: the new process {new} stops too", start=mark)
    assert srv.wait() == 0
    srv.wait_group_gone()
    # Nothing serves: the new tree did not take over on its own.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=5).close()
    assert not srv.tracebacks(), "\n".join(srv.err)


def test_sigusr2_without_workers_is_ignored(certs: Certs, cert_files: CertFiles,
                                           servers: list[ServerProcess]) -> None:
    srv, port = start(echo_cmd(cert_files))
    servers.append(srv)
    srv.signal(signal.SIGUSR2)
    srv.wait_for(r"SIGUSR2: upgrades need a supervising parent \(--workers 2 or more\); ignored")
    with socket.create_connection((HOST, port), timeout=10) as raw, \
            certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
        assert recv_exactly(s, 4) == b"OK\r\n"
    srv.signal(signal.SIGTERM)
    assert srv.wait() == 0


# -- the library: a configuration read at every start ---------------------------------

SCRIPT = """
import json, logging, sys
from pathlib import Path
import tlsuv
from tlsuv import workers
from tlsuv.echo import echo_factory

conf = json.loads(Path(sys.argv[1]).read_text())  # read at every start, as a real service would


def setup(loop):
    if conf.get("crash"):
        raise RuntimeError("this build is broken")
    bundle = tlsuv.load_bundle(conf["cert"], conf["key"])
    return tlsuv.Server(loop, tlsuv.server_context(bundle), echo_factory)


logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
sys.exit(workers.run(setup, workers=conf["workers"], grace=2.0, upgrade_timeout=conf["timeout"],
                     on_listening=lambda h, p: print(f"listening on {h}:{p}", flush=True)))
"""


def test_library_upgrades_change_the_number_of_workers_and_survive_a_broken_build(
        certs: Certs, cert_files: CertFiles, tmp_path: Path, servers: list[ServerProcess]) -> None:
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(SCRIPT))
    conf_file = tmp_path / "conf.json"

    def configure(**conf: object) -> None:
        conf_file.write_text(json.dumps({"cert": str(cert_files.cert), "key": str(cert_files.key),
                                         "timeout": 60.0, **conf}))

    configure(workers=2)
    srv, port = start([sys.executable, str(script), str(conf_file)])
    servers.append(srv)
    ctx = certs.client_ssl_context()
    parent = srv.proc.pid
    with Hammer(HOST, port, ctx, clients=3) as hammer:
        hammer.wait_ok(10)
        # Two sockets dealt out to three workers (one made), then to one worker (which serves all
        # three).  The last tree waits 8 s for its own successor (the old parent's setting counts).
        for workers, listens, timeout in ((3, 3, 60), (1, 3, 8)):
            configure(workers=workers, timeout=timeout)
            mark = srv.mark()
            os.kill(parent, signal.SIGUSR2)
            parent = new_parent(srv, mark)
            srv.wait_for(rf"starting {workers} workers on 127\.0\.0\.1:{port}$", start=mark)
            lines = [line for line in srv.err[mark:] if "(adopted socket)" in line]
            assert len(lines) == listens, lines
            hammer.wait_ok(10)
        # A build whose workers crash: the new tree never serves, the old one carries on.
        configure(workers=2, crash=True)
        mark = srv.mark()
        os.kill(parent, signal.SIGUSR2)
        m = srv.wait_for(r"upgrade failed: the new process \(pid (\d+)\) did not serve within 8s; "
                         r"still serving with this tree", start=mark)
        broken = int(m.group(1))
        srv.wait_for(r"worker 1 crashed", start=mark)
        hammer.wait_ok(10)
        # The broken tree drains and goes (it was told to stop), without its crashed workers' help.
        deadline = time.monotonic() + 30
        while Path(f"/proc/{broken}").exists() and _state(broken) not in ("Z", "X"):
            assert time.monotonic() < deadline, "the failed new tree is still running"
            time.sleep(0.05)
        hammer.wait_ok(10)
        result = hammer.stop()
    print(f"\nlibrary upgrades 2 -> 3 -> 1 workers, then a broken build: hammer {result.summary()}")
    result.assert_clean()
    os.kill(parent, signal.SIGTERM)
    srv.wait_group_gone()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "X"


def test_upgrade_into_a_single_process_tree(certs: Certs, cert_files: CertFiles,
                                            servers: list[ServerProcess]) -> None:
    """``--workers auto`` on a machine that now has one CPU for us: the new server is one process.

    It has no supervisor, but still reports ready over the pipe, so the old tree hands over.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to take one away")
    srv, port = start(echo_cmd(cert_files, "--workers", "auto", "--grace", "2"))
    servers.append(srv)
    os.sched_setaffinity(srv.proc.pid, {cpus[0]})  # the successor inherits it: auto = 1
    with Hammer(HOST, port, certs.client_ssl_context(), clients=3) as hammer:
        hammer.wait_ok(10)
        mark = srv.mark()
        srv.signal(signal.SIGUSR2)
        new = new_parent(srv, mark)
        srv.wait_for(rf"listening on 127\.0\.0\.1:{port} \(adopted socket\)", start=mark)
        assert srv.wait() == 0
        hammer.wait_ok(20)
        result = hammer.stop()
    print(f"\nupgrade into one process: hammer {result.summary()}")
    result.assert_clean()
    assert not [line for line in srv.err[mark:] if "starting" in line and "workers on" in line]
    os.kill(new, signal.SIGTERM)
    srv.wait_group_gone()


# -- the sockets the parent holds ---------------------------------------------------------


def test_a_dead_workers_queue_waits_for_its_replacement(certs: Certs, cert_files: CertFiles,
                                                        servers: list[ServerProcess]) -> None:
    """Connections queued for a worker that dies are served by the next one, not reset."""
    srv, port = start(echo_cmd(cert_files, "--workers", "2", "--log-level", "debug"))
    servers.append(srv)
    pids = {n: int(srv.wait_for(rf"worker {n} listening \(pid (\d+)\)").group(1)) for n in (1, 2)}
    os.kill(pids[2], signal.SIGSTOP)  # worker 2 accepts nothing: what hashes to it waits
    ctx = certs.client_ssl_context()
    done: list[str] = []
    locals_: list[int] = []

    def session() -> None:
        raw = socket.create_connection((HOST, port), timeout=30)
        locals_.append(raw.getsockname()[1])
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert recv_exactly(s, 4) == b"OK\r\n"
            s.sendall(b"queued")
            assert recv_exactly(s, 6) == b"queued"
            s.unwrap()
        done.append("ok")

    # The kernel hashes each connection to one socket: 24 all missing worker 2 is 2**-24.
    threads = [threading.Thread(target=session, daemon=True) for _ in range(24)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(locals_) < 24 or len(done) == 24:
        assert time.monotonic() < deadline and len(done) < 24, "worker 2 served while stopped?"
        time.sleep(0.02)
    mark = srv.mark()
    os.kill(pids[2], signal.SIGKILL)
    srv.wait_for(r"worker 2 listening \(pid \d+\)", start=mark)
    for t in threads:
        t.join(30)
    assert done == ["ok"] * 24
    # Some of them were served by the new worker 2, from the queue the dead one left.
    served_by_new = [p for p in locals_ if any(f"worker 2: 127.0.0.1:{p}: accepted" in line
                                               for line in srv.err[mark:])]
    assert served_by_new, "no queued connection reached the new worker 2"
    srv.signal(signal.SIGTERM)
    assert srv.wait() == 0


CRASHING = """
import logging, sys
from pathlib import Path
import tlsuv
from tlsuv import workers
from tlsuv.echo import echo_factory

marker, cert, key = sys.argv[1:4]


def setup(loop):
    if workers.worker_number() == 2 and Path(marker).exists():
        raise RuntimeError("worker 2 cannot start")
    return tlsuv.Server(loop, tlsuv.server_context(tlsuv.load_bundle(cert, key)), echo_factory)


logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
sys.exit(workers.run(setup, workers=2, grace=2.0,
                     on_listening=lambda h, p: print(f"listening on {h}:{p}", flush=True)))
"""


def test_a_crash_looping_worker_gives_its_connections_to_the_others(
        certs: Certs, cert_files: CertFiles, tmp_path: Path, servers: list[ServerProcess]) -> None:
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(CRASHING))
    marker = tmp_path / "broken"
    srv, port = start([sys.executable, str(script), str(marker), str(cert_files.cert), str(cert_files.key)])
    servers.append(srv)
    pid = int(srv.wait_for(r"worker 2 listening \(pid (\d+)\)").group(1))
    marker.touch()
    mark = srv.mark()
    os.kill(pid, signal.SIGKILL)
    # 0.1, 0.2, 0.4, 0.8 s: kept; the next wait is longer than a second: its socket goes.
    srv.wait_for(r"worker 2: closed its listening socket until it is back", start=mark)
    with Hammer(HOST, port, certs.client_ssl_context(), clients=3) as hammer:
        hammer.wait_ok(30)  # all on worker 1, none stuck in worker 2's queue
        marker.unlink()
        mark = srv.mark()
        srv.wait_for(r"worker 2 listening \(pid \d+\)", start=mark)  # a fresh socket, in the group again
        hammer.wait_ok(30)
        result = hammer.stop()
    print(f"\ncrash-looping worker: hammer {result.summary()}")
    result.assert_clean()
    srv.signal(signal.SIGTERM)
    assert srv.wait() == 0


# -- the drain, in the library -----------------------------------------------------------


def test_server_drain_serves_until_grace_then_close_notify(certs: Certs) -> None:
    """``Server.drain``: refuse new connections, keep serving, close_notify when grace ends; two listeners."""
    with ServerThread(certs.server_context(), grace=30.0) as st:
        second = st.call(lambda: st.server.listen("::1", 0))
        assert st.call(lambda: st.server.addresses) == [st.address, second]
        ctx = certs.client_ssl_context()
        held = LongLived(HOST, st.port, ctx, 2).socks + LongLived("::1", second[1], ctx, 1).socks
        closed = threading.Event()

        def drained() -> None:
            st._async.close()  # the last handle: the loop thread ends (and stop() only joins it)
            closed.set()

        st.call(lambda: st.server.drain(1.0, drained))
        for address in ((HOST, st.port), ("::1", second[1])):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(address, timeout=5).close()
        for i, s in enumerate(held):
            s.sendall(b"drain %d" % i)
            assert recv_exactly(s, 7) == b"drain %d" % i
        for s in held:
            with s:
                assert s.recv(10) == b""  # close_notify once the grace period is over
                s.unwrap()
        assert closed.wait(10)
