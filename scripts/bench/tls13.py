"""A minimal TLS 1.3 client handshake, I/O-free, for the handshake scenario's load generator.

Why not Python's ``ssl``: on this machine OpenSSL 3.0's client side of one
TLS 1.3 handshake costs about 600 µs of CPU (``openssl s_time`` agrees, so it
is not Python's overhead) -- more than the fastest server spends on its side.
With one core for the load generator, ``ssl`` clients would measure
themselves, not the servers.

This client does only what a server can tell apart: a standard ClientHello
(X25519, TLS_AES_128_GCM_SHA256, the extensions OpenSSL's own client sends
that matter in TLS 1.3, middlebox-compatibility session id), the client
Finished, and the application-data keys to read the greeting.  It skips
the client work a server cannot see: its X25519 key is made once and reused
(the server still makes a fresh key and does the full exchange), and the
certificate is compared byte for byte with the expected one instead of
parsed and chain-verified.  Every record it reads is authenticated (AES-GCM),
and the server's Finished MAC is checked, so a server that did not do the
whole handshake cannot produce a greeting this client accepts.  The
server's CertificateVerify signature is not checked: the benchmark trusts its
own loopback.

Nothing here is fit for talking to anything but the benchmark's servers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

CIPHER_NAME: Final = "TLS_AES_128_GCM_SHA256"
_SUITE: Final = 0x1301
_GROUP_X25519: Final = 0x001D
_TLS13: Final = 0x0304

_HANDSHAKE, _CCS, _ALERT, _APPDATA = 22, 20, 21, 23
_SERVER_HELLO, _NEW_SESSION_TICKET, _ENCRYPTED_EXTENSIONS = 2, 4, 8
_CERTIFICATE, _CERTIFICATE_VERIFY, _FINISHED = 11, 15, 20
_KEY_UPDATE = 24

# RFC 8446 4.1.3: a ServerHello with this random is a HelloRetryRequest.
_HRR_RANDOM: Final = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
_EMPTY_HASH: Final = hashlib.sha256(b"").digest()
_ZEROS: Final = bytes(32)
_CCS_RECORD: Final = b"\x14\x03\x03\x00\x01\x01"


class TLS13Error(Exception):
    """The server's handshake was not what a TLS 1.3 server must send."""


def _expand_label(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1); every length used here fits one HMAC block."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + bytes([len(context)]) + context
    return hmac.digest(secret, info + b"\x01", "sha256")[:length]


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt, ikm, "sha256")


_EARLY_SECRET: Final = _extract(_ZEROS, _ZEROS)
_DERIVED_EARLY: Final = _expand_label(_EARLY_SECRET, b"derived", _EMPTY_HASH, 32)


class _Keys:
    """One direction's AEAD key, IV and record sequence number."""

    __slots__ = ("aead", "iv", "seq")

    def __init__(self, secret: bytes) -> None:
        self.aead = AESGCM(_expand_label(secret, b"key", b"", 16))
        self.iv = int.from_bytes(_expand_label(secret, b"iv", b"", 12), "big")
        self.seq = 0

    def nonce(self) -> bytes:
        n = (self.iv ^ self.seq).to_bytes(12, "big")
        self.seq += 1
        return n


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


class ClientConfig:
    """What every handshake to one server shares: the key share and most of the ClientHello."""

    def __init__(self, server_name: str, expected_cert_der: bytes | None) -> None:
        self.expected_cert_der = expected_cert_der
        self._key = X25519PrivateKey.generate()
        pub = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        name = server_name.encode("ascii")
        sni = struct.pack("!HBH", len(name) + 3, 0, len(name)) + name
        sigalgs = struct.pack("!6H", 10, 0x0403, 0x0804, 0x0805, 0x0806, 0x0401)
        extensions = b"".join((
            _ext(0, sni),  # server_name
            _ext(10, struct.pack("!HH", 2, _GROUP_X25519)),  # supported_groups
            _ext(13, sigalgs),  # signature_algorithms
            _ext(43, struct.pack("!BH", 2, _TLS13)),  # supported_versions
            _ext(45, b"\x01\x01"),  # psk_key_exchange_modes: psk_dhe_ke, so tickets are issued as usual
            _ext(51, struct.pack("!HHH", 36, _GROUP_X25519, 32) + pub),  # key_share
        ))
        suites_and_compression = struct.pack("!HHBB", 2, _SUITE, 1, 0)
        self._tail = suites_and_compression + struct.pack("!H", len(extensions)) + extensions

    def client_hello(self) -> bytes:
        """The handshake message (not the record): fresh random and session id each time."""
        body = b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32) + self._tail
        return b"\x01" + len(body).to_bytes(3, "big") + body

    def shared_secret(self, server_share: bytes) -> bytes:
        return self._key.exchange(X25519PublicKey.from_public_bytes(server_share))


class ClientHandshake:
    """One connection: feed it the server's bytes, send what it returns, until :attr:`plaintext` has data.

    ``start()`` gives the ClientHello record; each ``receive(data)`` returns
    the bytes to send back (the client Finished, once).  Application data
    after the handshake accumulates in :attr:`plaintext`.
    """

    __slots__ = ("_buf", "_c_hs", "_config", "_hs_buf", "_master", "_read", "_s_hs", "_state",
                 "_transcript", "_write", "plaintext", "session_ticket")

    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._buf = bytearray()
        self._hs_buf = bytearray()
        self._transcript = hashlib.sha256()
        self._read: _Keys | None = None
        self._write: _Keys | None = None
        self._s_hs = b""
        self._c_hs = b""
        self._master = b""
        self._state = "server_hello"
        self.plaintext = bytearray()
        self.session_ticket = False

    @property
    def done(self) -> bool:
        return self._state == "connected"

    @property
    def state(self) -> str:
        """What the handshake waits for next (``connected`` once it is over)."""
        return self._state

    def start(self) -> bytes:
        hello = self._config.client_hello()
        self._transcript.update(hello)
        return b"\x16\x03\x01" + struct.pack("!H", len(hello)) + hello

    def receive(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        buf = self._buf
        while len(buf) >= 5:
            kind = buf[0]
            length = (buf[3] << 8) | buf[4]
            if len(buf) < 5 + length:
                break
            header = bytes(buf[:5])
            body = bytes(buf[5:5 + length])
            del buf[:5 + length]
            if kind == _CCS:
                continue  # middlebox compatibility: meaningless in TLS 1.3
            if kind == _ALERT and self._read is None:
                raise TLS13Error(f"alert {body.hex()} from the server")
            if kind == _HANDSHAKE and self._read is None:
                self._handshake_bytes(body, out)
            elif kind == _APPDATA and self._read is not None:
                inner = self._read.aead.decrypt(self._read.nonce(), body, header)
                inner = inner.rstrip(b"\x00")
                if not inner:
                    raise TLS13Error("record with no content type")
                content, inner_type = inner[:-1], inner[-1]
                if inner_type == _HANDSHAKE:
                    self._handshake_bytes(content, out)
                elif inner_type == _APPDATA:
                    if self._state != "connected":
                        raise TLS13Error("application data before the handshake finished")
                    self.plaintext += content
                elif inner_type == _ALERT:
                    raise TLS13Error(f"alert {content.hex()} from the server")
                else:
                    raise TLS13Error(f"unexpected inner content type {inner_type}")
            else:
                raise TLS13Error(f"unexpected record type {kind} in state {self._state}")
        return bytes(out)

    def _handshake_bytes(self, data: bytes, out: bytearray) -> None:
        self._hs_buf += data
        hs = self._hs_buf
        while len(hs) >= 4:
            length = int.from_bytes(hs[1:4], "big")
            if len(hs) < 4 + length:
                return
            msg = bytes(hs[:4 + length])
            del hs[:4 + length]
            self._message(msg[0], msg, out)

    def _message(self, kind: int, msg: bytes, out: bytearray) -> None:
        body = msg[4:]
        state = self._state
        if state == "server_hello" and kind == _SERVER_HELLO:
            self._transcript.update(msg)
            self._server_hello(body)
            self._state = "encrypted_extensions"
        elif state == "encrypted_extensions" and kind == _ENCRYPTED_EXTENSIONS:
            self._transcript.update(msg)
            self._state = "certificate"
        elif state == "certificate" and kind == _CERTIFICATE:
            self._transcript.update(msg)
            self._certificate(body)
            self._state = "certificate_verify"
        elif state == "certificate_verify" and kind == _CERTIFICATE_VERIFY:
            self._transcript.update(msg)
            self._state = "finished"
        elif state == "finished" and kind == _FINISHED:
            finished_key = _expand_label(self._s_hs, b"finished", b"", 32)
            expected = hmac.digest(finished_key, self._transcript.digest(), "sha256")
            if not hmac.compare_digest(expected, body):
                raise TLS13Error("the server's Finished does not verify")
            self._transcript.update(msg)
            self._client_finished(out)
            self._state = "connected"
        elif state == "connected" and kind == _NEW_SESSION_TICKET:
            self.session_ticket = True
        elif state == "connected" and kind == _KEY_UPDATE:
            raise TLS13Error("KeyUpdate is not expected from an echo server during a handshake test")
        else:
            raise TLS13Error(f"unexpected handshake message {kind} in state {state}")

    def _server_hello(self, body: bytes) -> None:
        if body[2:34] == _HRR_RANDOM:
            raise TLS13Error("HelloRetryRequest: the server does not take an X25519 key share")
        sid_len = body[34]
        pos = 35 + sid_len
        suite = int.from_bytes(body[pos:pos + 2], "big")
        if suite != _SUITE:
            raise TLS13Error(f"server chose cipher suite {suite:#06x}")
        pos += 3  # suite, legacy compression
        end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
        pos += 2
        version = share = None
        while pos < end:
            kind, length = struct.unpack_from("!HH", body, pos)
            value = body[pos + 4:pos + 4 + length]
            pos += 4 + length
            if kind == 43:
                version = int.from_bytes(value, "big")
            elif kind == 51:
                group, klen = struct.unpack_from("!HH", value)
                if group != _GROUP_X25519:
                    raise TLS13Error(f"server key share for group {group:#06x}")
                share = value[4:4 + klen]
        if version != _TLS13 or share is None:
            raise TLS13Error("ServerHello is not TLS 1.3 with a key share")
        shared = self._config.shared_secret(share)
        hs_secret = _extract(_DERIVED_EARLY, shared)
        hello_hash = self._transcript.digest()
        self._s_hs = _expand_label(hs_secret, b"s hs traffic", hello_hash, 32)
        c_hs = _expand_label(hs_secret, b"c hs traffic", hello_hash, 32)
        self._read = _Keys(self._s_hs)
        self._write = _Keys(c_hs)
        self._c_hs = c_hs
        # For the application keys, derived once the server's Finished is in.
        self._master = _extract(_expand_label(hs_secret, b"derived", _EMPTY_HASH, 32), _ZEROS)

    def _certificate(self, body: bytes) -> None:
        expected = self._config.expected_cert_der
        if expected is None:
            return
        pos = 1 + body[0] + 3  # request context, certificate_list length
        cert_len = int.from_bytes(body[pos:pos + 3], "big")
        if body[pos + 3:pos + 3 + cert_len] != expected:
            raise TLS13Error("the server sent a certificate other than the benchmark's")

    def _client_finished(self, out: bytearray) -> None:
        assert self._write is not None
        server_done_hash = self._transcript.digest()
        finished_key = _expand_label(self._c_hs, b"finished", b"", 32)
        verify = hmac.digest(finished_key, server_done_hash, "sha256")
        msg = bytes([_FINISHED]) + len(verify).to_bytes(3, "big") + verify
        inner = msg + bytes([_HANDSHAKE])
        header = b"\x17\x03\x03" + struct.pack("!H", len(inner) + 16)
        out += _CCS_RECORD
        out += header + self._write.aead.encrypt(self._write.nonce(), inner, header)
        self._read = _Keys(_expand_label(self._master, b"s ap traffic", server_done_hash, 32))
