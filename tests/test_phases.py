"""Connection's lifecycle as phases (tlsuv.connection.Phase): the table, the guard, and real connections.

The table at the top of tlsuv/connection.py says which phases exist, what
moves a connection between them and which handler callbacks run in each.
These tests hold the code to that table: the transition table itself, the
guard that refuses any other move, and the phases that real connections
(Python's ssl against a tlsuv server, a tlsuv client against Python's ssl)
are seen in from inside each callback.
"""

from __future__ import annotations

import socket
import ssl

from conftest import Certs, CheckedLoop, Recorder, recv_exactly, server_thread
from helpers import GREETING
from peers import PySSLServer, run_loop

import tlsuv
from tlsuv.client import connect
from tlsuv.connection import _NEXT, DEADLINES, InvalidPhaseTransition, Phase


def test_the_table_only_moves_forward_and_every_phase_can_end() -> None:
    assert set(_NEXT) == set(Phase)
    for phase, successors in _NEXT.items():
        assert all(new > phase for new in successors), f"{phase.name} may move backwards"
        if phase is not Phase.FINISHED:
            assert Phase.FINISHED in successors, f"{phase.name} cannot end"
    assert not _NEXT[Phase.FINISHED]
    # Every phase but the last has a deadline name for TimeoutError.phase.
    assert set(DEADLINES) == set(Phase) - {Phase.FINISHED}


class PhaseRecorder(Recorder):
    """Records ``(callback, conn.phase)`` for every callback."""

    def __init__(self, echo: bool = False, greeting: bytes | None = None) -> None:
        super().__init__(echo=echo, greeting=greeting)
        self.phases: list[tuple[str, Phase]] = []

    def established(self, conn: tlsuv.Connection) -> None:
        self.phases.append(("established", conn.phase))
        super().established(conn)

    def handshake_complete(self, conn: tlsuv.Connection) -> None:
        self.phases.append(("handshake_complete", conn.phase))
        super().handshake_complete(conn)

    def read(self, conn: tlsuv.Connection, data: bytes) -> None:
        self.phases.append(("read", conn.phase))
        super().read(conn, data)
        if data.endswith(b"bye"):
            conn.close()
            self.phases.append(("after close()", conn.phase))

    def closed(self, conn: tlsuv.Connection, reason: BaseException | None) -> None:
        self.phases.append(("closed", conn.phase))
        super().closed(conn, reason)


def test_server_connection_phases_seen_from_each_callback(certs: Certs) -> None:
    handlers: list[PhaseRecorder] = []

    def factory(conn: tlsuv.Connection) -> tlsuv.Handler:
        h = PhaseRecorder(echo=True, greeting=GREETING)
        handlers.append(h)
        return h

    with server_thread(certs.server_context(), factory=factory) as st:
        with st.connect(certs) as s:
            assert recv_exactly(s, len(GREETING)) == GREETING
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"
            s.sendall(b"bye")
            assert recv_exactly(s, 3) == b"bye"  # written before close(): delivered
            s.unwrap()  # the server's close_notify arrives, ours goes back
        st.wait_for(lambda: handlers[0].closed_count == 1)
        conn = st.connections[0]
        assert st.call(lambda: conn.phase) is Phase.FINISHED
        assert handlers[0].reason is None, handlers[0].reason
    assert handlers[0].phases == [
        ("established", Phase.HANDSHAKING),
        ("handshake_complete", Phase.OPEN),
        ("read", Phase.OPEN),
        ("read", Phase.OPEN),
        ("after close()", Phase.CLOSING),
        ("closed", Phase.FINISHED),
    ]


def test_the_guard_refuses_a_move_the_table_does_not_have(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st:
        with st.connect(certs) as s:
            assert recv_exactly(s, len(GREETING)) == GREETING
            conn = st.connections[0]

            def reopen_after_close() -> str:
                conn.close()
                try:
                    conn._set_phase(Phase.OPEN)
                except InvalidPhaseTransition as exc:
                    return str(exc)
                return "no error"

            assert st.call(reopen_after_close) == "connection cannot go from CLOSING to OPEN"
            assert st.call(lambda: conn.phase) >= Phase.CLOSING  # the refused move changed nothing
            s.unwrap()
        st.wait_for(lambda: conn.closed)


class ClientPhases(tlsuv.Handler):
    def __init__(self) -> None:
        self.phases: list[tuple[str, Phase]] = []
        self.data = bytearray()
        self.reason: BaseException | None = None

    def established(self, conn: tlsuv.Connection) -> None:
        self.phases.append(("established", conn.phase))

    def handshake_complete(self, conn: tlsuv.Connection) -> None:
        self.phases.append(("handshake_complete", conn.phase))

    def read(self, conn: tlsuv.Connection, data: bytes) -> None:
        self.data += data

    def closed(self, conn: tlsuv.Connection, reason: BaseException | None) -> None:
        self.phases.append(("closed", conn.phase))
        self.reason = reason


def test_client_close_while_connecting_delivers_what_was_written(loop: CheckedLoop, certs: Certs) -> None:
    """close() in CONNECTING with writes queued is kept until the handshake can start, then honoured."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs.cert_file, certs.key_file)
    with PySSLServer(ctx) as srv:
        h = ClientPhases()
        conn = connect(loop, "127.0.0.1", srv.port, lambda c: h, cafile=certs.ca_file)
        assert conn.phase is Phase.CONNECTING
        conn.write(b"written while connecting")
        conn.close()
        assert conn.phase is Phase.CONNECTING, "the close waits for the connection"
        assert not conn.closing
        run_loop(loop, [conn])
    # (The server's threads are joined: what it received is final.)
    assert h.reason is None, h.reason
    assert h.phases == [
        ("established", Phase.HANDSHAKING),
        ("handshake_complete", Phase.CLOSING),
        ("closed", Phase.FINISHED),
    ]
    assert bytes(srv.accepted[0].received) == b"written while connecting"
    assert srv.accepted[0].close_notify


def test_client_close_while_connecting_with_nothing_written_ends_at_once(loop: CheckedLoop) -> None:
    # A listener that never accepts: the connect itself succeeds (the kernel's backlog).
    with socket.create_server(("127.0.0.1", 0)) as silent:
        h = ClientPhases()
        conn = connect(loop, "127.0.0.1", silent.getsockname()[1], lambda c: h)
        conn.close()
        assert conn.phase is Phase.FINISHED
        run_loop(loop, [conn])
        assert h.phases == [("closed", Phase.FINISHED)]
        assert h.reason is None
