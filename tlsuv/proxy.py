"""The PROXY protocol (HAProxy's ``doc/proxy-protocol.txt``), versions 1 and 2, without I/O.

Why this module exists
======================

Behind an L4 load balancer every TCP connection comes from the balancer, so
the server would log, limit and authorise the balancer's address instead of
the client's.  The PROXY protocol fixes that without touching TLS: the
balancer prepends one small header to the byte stream, naming the original
source and destination, and the TLS stream follows it unchanged.

:class:`ProxyParser` is fed the first bytes of a connection (in whatever
pieces TCP delivers them) and answers ``None`` until the header is complete,
then a :class:`ProxyResult`: the :class:`ProxyHeader` and the *leftover*
bytes, which are the start of the TLS stream and must go to TLS.  Like
:mod:`tlsuv.tls` it never imports pyuv, so every rule below is tested byte by
byte without a socket.  :class:`ProxyOptions` is what a server is configured
with (who may send a header, how long it may take).

The traps, and how each is handled
==================================

* **Trusting the header is trusting the sender.**  Anyone who can connect
  and send a header can claim any address.  A server must only expect the
  header (never guess whether it is there: a client would just leave it out)
  and only from known balancers: :attr:`ProxyOptions.allow_from`, which
  defaults to loopback, not to everyone.

* **TCP may cut the header anywhere.**  The spec asks senders to send it in
  one segment but tells receivers that nothing guarantees it; the parser
  keeps what it has and carries on at the next byte.  Conversely a segment
  can hold the header *and* the ClientHello: the leftover must not be lost.

* **Fail early and bounded.**  Input is checked against the two signatures
  as it arrives, so a client that speaks TLS straight away is refused at its
  first byte rather than after a timeout; a version 1 line must end within
  107 bytes; a version 2 header declares its length, which is refused above
  :data:`MAX_V2_HEADER` before any of it is buffered.

* **Version 1 is text with exact rules.**  One space between fields, CRLF
  (not a lone CR or LF), no leading zeros (``010`` would be octal to some),
  ports 0-65535, the addresses in the family the line names.  Python's
  :mod:`ipaddress` accepts IPv6 scope ids (``fe80::1%eth0``), which the
  protocol does not, so the characters are checked first.

* **Not every header carries an address.**  ``UNKNOWN`` (v1), the v2
  ``LOCAL`` command (the balancer's own health checks) and the v2 ``UNSPEC``,
  ``AF_UNIX`` and datagram families all mean "use the real endpoints"; the
  header is then valid but :attr:`ProxyHeader.source` is ``None``.

* **Version 2 has TLVs after the addresses.**  They are skipped, but their
  framing is checked: a TLV running past the declared length is corruption.

* **An IPv4 balancer may arrive as IPv6.**  On a dual-stack listener its
  address is ``::ffff:10.0.0.5``; :meth:`ProxyOptions.allows` matches that
  against IPv4 networks too.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple, TypeAlias

from .errors import ProtocolError

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# The spec's longest legal v1 line, CRLF included:
# "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n".
MAX_V1_HEADER: Final = 107

# A v2 header is 16 fixed bytes plus a 16-bit length, so up to 64 KiB that
# we would have to hold for every connection before TLS starts.  Real headers
# are far smaller: 16 + 36 bytes of IPv6 addresses, plus TLVs that are short
# strings (SNI up to 255 bytes, a unique id up to 128, the SSL sub-TLVs, a
# cloud endpoint id).  4 KiB is eight times the 536 bytes the spec says a
# header is meant to fit in: room for every TLV a balancer sends today, and
# a length beyond it means a corrupt or hostile header.
MAX_V2_HEADER: Final = 4096

V1_SIGNATURE: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED: Final = 16  # signature, version/command, family/protocol, length
_V2_LOCAL: Final = 0x0
_V2_PROXY: Final = 0x1

# v2 family/protocol byte -> bytes of address block, and whether we read it.
_V2_ADDRESS_SIZES: Final[dict[int, int]] = {
    0x00: 0,  # UNSPEC
    0x11: 12, 0x12: 12,  # TCP and UDP over IPv4: two 4-byte addresses, two ports
    0x21: 36, 0x22: 36,  # TCP and UDP over IPv6: two 16-byte addresses, two ports
    0x31: 216, 0x32: 216,  # AF_UNIX stream and datagram: two 108-byte paths
}

_V1_ADDRESS_CHARS: Final = frozenset(b"0123456789abcdefABCDEF:.")

# The spec asks receivers to wait at least 3 s (one TCP retransmit) for the
# header; a balancer sends it with its first segment, so 5 s is margin, and a
# connection that never sends one costs seconds, not the handshake timeout.
DEFAULT_TIMEOUT: Final = 5.0

# Only a balancer on the same machine may send headers unless told otherwise:
# trusting everyone would let any client choose the address we log.
LOOPBACK: Final[tuple[IPNetwork, ...]] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)

Address: TypeAlias = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header.

    ``source`` and ``destination`` are the original client's and the address
    it connected to (``(host, port)``), or ``None`` when the header says to
    use the real connection's endpoints (v1 ``UNKNOWN``, v2 ``LOCAL``, v2
    families other than TCP over IPv4/IPv6).
    """

    version: Literal[1, 2]
    source: Address | None
    destination: Address | None
    local: bool = False  # v2 LOCAL: the balancer's own connection (a health check)
    length: int = 0  # bytes the header took on the wire


class ProxyResult(NamedTuple):
    header: ProxyHeader
    leftover: bytes  # the bytes after the header: the start of the TLS stream


class ProxyParser:
    """Incremental parser for one connection's PROXY header (v1 or v2).

    Call :meth:`feed` with each chunk read from the socket.  It returns
    ``None`` while the header is incomplete, the :class:`ProxyResult` once it
    is, and raises :class:`~tlsuv.errors.ProtocolError` as soon as the bytes
    cannot be a valid header.  A parser is used once: after a result or an
    error, :meth:`feed` raises again (the same error, or ``RuntimeError``).
    """

    __slots__ = ("_buf", "_error", "_result")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        self._result: ProxyResult | None = None

    @property
    def done(self) -> bool:
        return self._result is not None

    def feed(self, data: bytes) -> ProxyResult | None:
        if self._error is not None:
            raise self._error
        if self._result is not None:
            raise RuntimeError("the PROXY header was already parsed; send the rest to TLS")
        scanned = len(self._buf)
        self._buf += data
        try:
            result = self._parse(scanned)
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        if result is not None:
            self._result = result
            self._buf = bytearray()
        return result

    def _parse(self, scanned: int) -> ProxyResult | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] == V1_SIGNATURE[0]:
            return self._parse_v1(scanned)
        if buf[0] == V2_SIGNATURE[0]:
            return self._parse_v2()
        raise ProtocolError(f"no PROXY header: the connection starts with {_show(buf[:8])}")

    # -- version 1 -----------------------------------------------------------

    def _parse_v1(self, scanned: int) -> ProxyResult | None:
        buf = self._buf
        prefix = min(len(buf), len(V1_SIGNATURE))
        if buf[:prefix] != V1_SIGNATURE[:prefix]:
            raise ProtocolError(f"no PROXY header: the connection starts with {_show(buf[:8])}")
        # A lone LF anywhere, or a CR followed by anything but LF, ends the
        # line wrongly: refuse it now instead of waiting for 107 bytes.
        start = max(scanned - 1, 0)
        # The CR must leave room for its LF inside the 107 bytes.
        limit = min(len(buf), MAX_V1_HEADER - 1)
        end = -1
        for i in range(start, limit):
            byte = buf[i]
            if byte == 0x0A:  # LF without CR before it (a CRLF is caught at the CR)
                raise ProtocolError("PROXY v1 line ends with a bare LF (CRLF required)")
            if byte == 0x0D:
                if i + 1 >= len(buf):
                    break  # the LF may be in the next chunk
                if buf[i + 1] != 0x0A:
                    raise ProtocolError("PROXY v1 line contains a bare CR (CRLF required)")
                end = i
                break
            if byte < 0x20 or byte > 0x7E:
                raise ProtocolError(f"PROXY v1 line contains a non-ASCII byte 0x{byte:02x}")
        if end < 0:
            if len(buf) >= MAX_V1_HEADER:
                raise ProtocolError(f"PROXY v1 line has no CRLF within {MAX_V1_HEADER} bytes")
            return None
        line = bytes(buf[:end])
        header = _parse_v1_line(line, end + 2)
        return ProxyResult(header, bytes(buf[end + 2:]))

    # -- version 2 -----------------------------------------------------------

    def _parse_v2(self) -> ProxyResult | None:
        buf = self._buf
        prefix = min(len(buf), len(V2_SIGNATURE))
        if buf[:prefix] != V2_SIGNATURE[:prefix]:
            raise ProtocolError(f"no PROXY header: the connection starts with {_show(buf[:8])}")
        if len(buf) < _V2_FIXED:
            if len(buf) > len(V2_SIGNATURE):
                _check_v2_version_command(buf[12])
            return None
        ver_cmd, fam, length = struct.unpack_from("!BBH", buf, 12)
        command = _check_v2_version_command(ver_cmd)
        total = _V2_FIXED + length
        if total > MAX_V2_HEADER:
            raise ProtocolError(
                f"PROXY v2 header of {total} bytes is over the limit of {MAX_V2_HEADER}")
        needed = 0
        if command == _V2_PROXY:
            # For LOCAL the spec says the whole block, family included, is
            # ignored; for PROXY the family must be one the spec defines.
            if fam not in _V2_ADDRESS_SIZES:
                raise ProtocolError(
                    f"PROXY v2 header has an invalid address family/protocol 0x{fam:02x}")
            needed = _V2_ADDRESS_SIZES[fam]
            if length < needed:
                raise ProtocolError(
                    f"PROXY v2 address block of {length} bytes is too short for family"
                    f" 0x{fam:02x} ({needed} needed)")
        if len(buf) < total:
            return None
        block = bytes(buf[_V2_FIXED:total])
        source = destination = None
        if command == _V2_PROXY and fam != 0x00:
            # TLVs follow the addresses; where those end is only known for a
            # defined family (as HAProxy's own receiver does, UNSPEC and LOCAL
            # blocks are skipped whole).
            _check_tlvs(block[needed:])
        if command == _V2_PROXY and fam == 0x11:
            src, dst, sport, dport = struct.unpack_from("!4s4sHH", block)
            source = (str(ipaddress.IPv4Address(src)), sport)
            destination = (str(ipaddress.IPv4Address(dst)), dport)
        elif command == _V2_PROXY and fam == 0x21:
            src, dst, sport, dport = struct.unpack_from("!16s16sHH", block)
            source = (str(ipaddress.IPv6Address(src)), sport)
            destination = (str(ipaddress.IPv6Address(dst)), dport)
        # Otherwise LOCAL, UNSPEC, AF_UNIX or datagram: the spec's fallback is
        # to use the real endpoints, so the addresses are skipped.
        header = ProxyHeader(2, source, destination, local=command == _V2_LOCAL, length=total)
        return ProxyResult(header, bytes(buf[total:]))


def _check_v2_version_command(ver_cmd: int) -> int:
    if ver_cmd >> 4 != 2:
        raise ProtocolError(f"PROXY v2 header has version {ver_cmd >> 4} (only 2 exists)")
    command = ver_cmd & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProtocolError(f"PROXY v2 header has an unknown command 0x{command:x}")
    return command


def _check_tlvs(data: bytes) -> None:
    """Walk the TLVs (type, 16-bit length, value) after the addresses: each must fit."""
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProtocolError("PROXY v2 header ends inside a TLV's type and length")
        (size,) = struct.unpack_from("!H", data, i + 1)
        i += 3 + size
        if i > len(data):
            raise ProtocolError("PROXY v2 TLV runs past the end of the header")


def _parse_v1_line(line: bytes, length: int) -> ProxyHeader:
    """``PROXY <TCP4|TCP6|UNKNOWN> <src> <dst> <sport> <dport>`` (without the CRLF)."""
    text = line.decode("ascii")  # the scan above allowed only printable ASCII
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # The sender may put anything (or nothing) after UNKNOWN; the spec
        # says to ignore it and use the real endpoints.
        return ProxyHeader(1, None, None, length=length)
    if len(parts) != 6:
        raise ProtocolError(f"PROXY v1 line needs 6 fields separated by single spaces: {text!r}")
    _, family, src, dst, sport, dport = parts
    if family not in ("TCP4", "TCP6"):
        raise ProtocolError(f"PROXY v1 line has an unknown protocol {family!r}")
    version = 4 if family == "TCP4" else 6
    return ProxyHeader(
        1,
        (_v1_address(src, version), _v1_port(sport)),
        (_v1_address(dst, version), _v1_port(dport)),
        length=length,
    )


def _v1_address(text: str, version: int) -> str:
    if not text or not set(text.encode()) <= _V1_ADDRESS_CHARS:
        raise ProtocolError(f"PROXY v1 line has an invalid address {text!r}")
    try:
        addr = ipaddress.ip_address(text)  # refuses leading zeros in IPv4 since 3.9.5
    except ValueError:
        raise ProtocolError(f"PROXY v1 line has an invalid address {text!r}") from None
    if addr.version != version:
        raise ProtocolError(f"PROXY v1 line says TCP{version} but has the address {text!r}")
    return str(addr)


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProtocolError(f"PROXY v1 line has an invalid port {text!r}")
    port = int(text)
    if port > 65535:
        raise ProtocolError(f"PROXY v1 line has an invalid port {text!r}")
    return port


def _show(data: bytes | bytearray) -> str:
    return repr(bytes(data))


# -- configuration -------------------------------------------------------------


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``"10.0.0.0/8,::1"`` -> networks.  Raises ``ValueError`` with a readable message."""
    networks: list[IPNetwork] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty network in {text!r}")
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(f"not a network (CIDR): {item!r}: {exc}") from None
    return tuple(networks)


@dataclass(frozen=True)
class ProxyOptions:
    """A server that expects a PROXY header at the start of every connection.

    ``allow_from`` lists the networks of the balancers allowed to send one;
    any other source is refused at accept.  ``timeout`` bounds the wait for
    the header (``None``: only the handshake timeout applies).
    """

    allow_from: tuple[IPNetwork, ...] = LOOPBACK
    timeout: float | None = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        # Frozen, so normalising needs object.__setattr__: a string or a list
        # is accepted for convenience and stored as a tuple of networks.
        if isinstance(self.allow_from, str):
            object.__setattr__(self, "allow_from", parse_networks(self.allow_from))
        else:
            object.__setattr__(self, "allow_from", tuple(self.allow_from))
        for net in self.allow_from:
            if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise TypeError(f"allow_from holds {net!r}: use ipaddress networks "
                                "or tlsuv.proxy.parse_networks()")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError("timeout must be positive or None")

    def allows(self, peer: Address | None) -> bool:
        """Whether a connection from ``peer`` may send a PROXY header."""
        if peer is None:
            return False
        try:
            addr = ipaddress.ip_address(peer[0].split("%", 1)[0])
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            candidates.append(addr.ipv4_mapped)
        return any(a in net for a in candidates for net in self.allow_from)
