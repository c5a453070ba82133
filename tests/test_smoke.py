from __future__ import annotations

from conftest import Certs, recv_exactly, server_thread


def test_greeting_then_echo(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st, st.connect(certs) as s:
        assert recv_exactly(s, 4) == b"OK\r\n"
        s.sendall(b"hello")
        assert recv_exactly(s, 5) == b"hello"
