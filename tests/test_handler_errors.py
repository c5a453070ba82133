"""A handler that raises from ``read``: the same ending on both delivery paths.

Plaintext reaches ``Handler.read`` two ways: inline, as each libuv read is
decrypted (``Connection._process``, which inlines ``_deliver`` for speed), and
later, for chunks held while the handler had paused reading
(``Connection._deliver``, at resume or at the end of the stream).  Both must
turn an exception into a HandlerError ending for that connection alone.
"""

from __future__ import annotations

import pytest
from clients import RawTLSClient
from conftest import Certs, Recorder, server_thread
from OpenSSL import SSL

import tlsuv


class RaisesOnBoom(Recorder):
    def __init__(self, pause: bool) -> None:
        super().__init__()
        self.pause = pause

    def handshake_complete(self, conn: tlsuv.Connection) -> None:
        super().handshake_complete(conn)
        if self.pause:
            conn.pause_reading()  # the data that came with the client's Finished is held

    def read(self, conn: tlsuv.Connection, data: bytes) -> None:
        super().read(conn, data)
        if b"boom" in data:
            raise RuntimeError("handler bug")


@pytest.mark.parametrize("path", ["inline", "held"])
def test_read_raising_aborts_that_connection_with_handler_error(certs: Certs, path: str) -> None:
    handlers: list[RaisesOnBoom] = []

    def factory(conn: tlsuv.Connection) -> tlsuv.Handler:
        handlers.append(RaisesOnBoom(pause=path == "held"))
        return handlers[-1]

    with server_thread(certs.server_context(), factory=factory) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        while True:  # the handshake, but the client's last flight stays unsent...
            try:
                client.ssl.do_handshake()
                break
            except SSL.WantReadError:
                client.pump()
        client.ssl.send(b"first boom")  # ...so the data goes in the same TCP segment
        client.send_raw(client.ssl.bio_read(65536))
        st.wait_for(lambda: len(st.connections) == 1 and st.connections[0].handshake_completed)
        conn = st.connections[0]
        (h,) = handlers
        if path == "held":
            assert st.call(lambda: bytes(h.data)) == b"", "paused: the chunk must be held"
            st.call(conn.resume_reading)  # delivered now, through Connection._deliver
        st.wait_for(lambda: h.closed_count == 1)
        client.sock.close()
    assert bytes(h.data) == b"first boom"
    assert isinstance(h.reason, tlsuv.HandlerError), h.reason
    assert "handler bug" in str(h.reason)
    assert isinstance(h.reason.__cause__, RuntimeError)
