"""The PROXY protocol parser (tlsuv.proxy), with no sockets: every rule, every split point."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tlsuv.errors import ProtocolError
from tlsuv.proxy import (
    LOOPBACK,
    MAX_V1_HEADER,
    MAX_V2_HEADER,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyOptions,
    ProxyParser,
    ProxyResult,
    parse_networks,
)

# The first bytes of a real TLS ClientHello: what a client sends when it
# bypasses the balancer.
CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def v2(command: int = 1, fam: int = 0x11, block: bytes = b"", version: int = 2,
       length: int | None = None) -> bytes:
    """A version 2 header built from its parts (so tests can break any one of them)."""
    n = len(block) if length is None else length
    return V2_SIGNATURE + bytes([(version << 4) | command, fam]) + struct.pack("!H", n) + block


def v2_tcp4(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    block = (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
             + struct.pack("!HH", sport, dport) + tlvs)
    return v2(1, 0x11, block)


def v2_tcp6(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    block = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
             + struct.pack("!HH", sport, dport) + tlvs)
    return v2(1, 0x21, block)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def parse(data: bytes) -> ProxyResult:
    result = ProxyParser().feed(data)
    assert result is not None, "header should be complete"
    return result


def refuse(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        ProxyParser().feed(data)


# -- version 1: the specification's examples and limits --------------------------


def test_v1_spec_example_before_http() -> None:
    request = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    header, leftover = parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n" + request)
    assert header == ProxyHeader(1, ("192.168.0.1", 56324), ("192.168.0.11", 443), length=47)
    assert leftover == request


def test_v1_longest_tcp4_line() -> None:
    line = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(line) == 56  # the spec's count
    header, leftover = parse(line)
    assert header.source == ("255.255.255.255", 65535)
    assert header.destination == ("255.255.255.255", 65535)
    assert leftover == b""


def test_v1_longest_tcp6_line() -> None:
    full = ":".join(["ffff"] * 8)
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104  # the spec's count
    header, _ = parse(line)
    assert header.source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)


def test_v1_tcp6_compressed_and_upper_case() -> None:
    header, _ = parse(b"PROXY TCP6 2001:DB8::1 ::1 1 0\r\n")
    assert header.source == ("2001:db8::1", 1)
    assert header.destination == ("::1", 0)


def test_v1_unknown_short_form() -> None:
    line = b"PROXY UNKNOWN\r\n"
    assert len(line) == 15
    header, leftover = parse(line + CLIENT_HELLO_START)
    assert header == ProxyHeader(1, None, None, length=15)
    assert leftover == CLIENT_HELLO_START


def test_v1_unknown_worst_case_is_exactly_the_limit() -> None:
    full = ":".join(["ffff"] * 8)
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == MAX_V1_HEADER == 107
    header, _ = parse(line)
    assert header.source is None  # UNKNOWN: whatever follows is ignored


def test_v1_one_byte_over_the_limit_is_refused() -> None:
    full = ":".join(["ffff"] * 8)
    line = f"PROXY UNKNOWN {full} {full} 65535 655350\r\n".encode()
    assert len(line) == 108
    refuse(line, "no CRLF within 107 bytes")


def test_v1_endless_line_is_refused_at_the_limit_not_later() -> None:
    parser = ProxyParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"x" * (MAX_V1_HEADER - 15)) is None  # 106 bytes
    with pytest.raises(ProtocolError, match="no CRLF"):
        parser.feed(b"x")


@pytest.mark.parametrize(("line", "match"), [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\n", "bare CR"),
    (b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n", "bare LF"),
    (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "6 fields"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "6 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "6 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "6 fields"),
    (b"PROXY TCP4\r\n", "6 fields"),
    (b"PROXY\r\n", "no PROXY header"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol 'TCP5'"),
    (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    (b"PROXY UNKNOWNX\r\n", "6 fields"),
    (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "invalid address '1.2.3.04'"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "invalid address"),
    (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "invalid address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "says TCP4 but has the address '::1'"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "says TCP6"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "invalid address 'fe80::1%eth0'"),
    (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "invalid address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "invalid port '01'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "invalid port '65536'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "invalid port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "invalid port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", "invalid port ''"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n", "non-ASCII byte 0x00"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n", "non-ASCII byte 0xd9"),
    (b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY header"),
    (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY header"),
])
def test_v1_malformed(line: bytes, match: str) -> None:
    refuse(line, match)


def test_v1_port_zero_is_allowed() -> None:
    assert parse(b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n").header.source == ("0.0.0.0", 0)


def test_v1_crlf_split_across_chunks() -> None:
    parser = ProxyParser()
    assert parser.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is None
    result = parser.feed(b"\nrest")
    assert result is not None
    assert result.header.source == ("1.2.3.4", 1)
    assert result.leftover == b"rest"


def test_v1_bare_cr_split_across_chunks() -> None:
    parser = ProxyParser()
    assert parser.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is None
    with pytest.raises(ProtocolError, match="bare CR"):
        parser.feed(b"x")


# -- version 2 -------------------------------------------------------------------


def test_v2_tcp4() -> None:
    data = v2_tcp4("192.168.0.1", "192.168.0.11", 56324, 443)
    assert len(data) == 16 + 12
    header, leftover = parse(data + CLIENT_HELLO_START)
    assert header == ProxyHeader(2, ("192.168.0.1", 56324), ("192.168.0.11", 443), length=28)
    assert leftover == CLIENT_HELLO_START


def test_v2_tcp6() -> None:
    header, leftover = parse(v2_tcp6("2001:db8::1", "2001:db8::2", 65535, 0))
    assert header == ProxyHeader(2, ("2001:db8::1", 65535), ("2001:db8::2", 0), length=52)
    assert leftover == b""


def test_v2_tlvs_are_skipped() -> None:
    tlvs = (tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x04, b"")
            + tlv(0x05, b"u" * 128) + tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3")))
    header, leftover = parse(v2_tcp4("10.0.0.1", "10.0.0.2", 1000, 443, tlvs) + b"TLS")
    assert header.source == ("10.0.0.1", 1000)
    assert header.length == 16 + 12 + len(tlvs)
    assert leftover == b"TLS"


def test_v2_local_health_check() -> None:
    header, leftover = parse(v2(command=0, fam=0x00) + b"after")
    assert header == ProxyHeader(2, None, None, local=True, length=16)
    assert leftover == b"after"


def test_v2_local_ignores_family_and_block() -> None:
    # "discard the protocol block including the family which is ignored"
    header, _ = parse(v2(command=0, fam=0x11, block=b"\xff" * 5))
    assert header.local and header.source is None and header.length == 21


def test_v2_proxy_unspec_means_real_endpoints() -> None:
    header, _ = parse(v2(command=1, fam=0x00, block=b"anything"))
    assert header.source is None and not header.local


@pytest.mark.parametrize(("fam", "size"), [(0x12, 12), (0x22, 36), (0x31, 216), (0x32, 216)])
def test_v2_families_we_do_not_read_fall_back_to_real_endpoints(fam: int, size: int) -> None:
    header, leftover = parse(v2(command=1, fam=fam, block=b"\x00" * size) + b"x")
    assert header.source is None and header.destination is None
    assert leftover == b"x"


@pytest.mark.parametrize(("data", "match"), [
    (v2(version=1), "version 1"),
    (v2(version=3), "version 3"),
    (v2(command=2), "unknown command 0x2"),
    (v2(command=0xF), "unknown command 0xf"),
    (v2(fam=0x13, block=b"\x00" * 12), "invalid address family/protocol 0x13"),
    (v2(fam=0x41, block=b"\x00" * 12), "invalid address family/protocol 0x41"),
    (v2(fam=0x10, block=b"\x00" * 12), "invalid address family/protocol 0x10"),
    (v2(fam=0x11, block=b"\x00" * 11), "too short for family 0x11"),
    (v2(fam=0x21, block=b"\x00" * 12), "too short for family 0x21"),
    (v2(fam=0x31, block=b"\x00" * 36), "too short for family 0x31"),
    (v2_tcp4("1.2.3.4", "5.6.7.8", 1, 2, b"\x01\x00"), "ends inside a TLV"),
    (v2_tcp4("1.2.3.4", "5.6.7.8", 1, 2, b"\x01\x00\x05abcd"), "runs past the end"),
    (v2_tcp4("1.2.3.4", "5.6.7.8", 1, 2, tlv(1, b"ok") + b"\x02"), "ends inside a TLV"),
])
def test_v2_malformed(data: bytes, match: str) -> None:
    refuse(data + b"\x00" * 300, match)


def test_v2_version_is_checked_at_byte_13_without_waiting_for_16() -> None:
    parser = ProxyParser()
    with pytest.raises(ProtocolError, match="version 1"):
        parser.feed(V2_SIGNATURE + b"\x11")


def test_v2_oversized_is_refused_from_the_fixed_part_alone() -> None:
    parser = ProxyParser()
    with pytest.raises(ProtocolError, match=f"over the limit of {MAX_V2_HEADER}"):
        parser.feed(v2(length=MAX_V2_HEADER - 16 + 1))  # 16 bytes: nothing buffered


def test_v2_at_the_size_limit_is_accepted() -> None:
    padding = tlv(0x04, b"\x00" * (MAX_V2_HEADER - 16 - 12 - 3))
    data = v2_tcp4("1.2.3.4", "5.6.7.8", 1, 2, padding)
    assert len(data) == MAX_V2_HEADER
    assert parse(data).header.length == MAX_V2_HEADER


def test_v2_largest_declared_length_is_refused() -> None:
    refuse(v2(length=0xFFFF), "65551 bytes is over the limit")


# -- no header, wrong signature: refused at the first impossible byte ------------


@pytest.mark.parametrize("start", [
    CLIENT_HELLO_START[:1],  # a client that skipped the balancer: refused at byte 1
    b"GET / HTTP/1.1\r\n",
    b"\x00",
    b"PROXZ",
    b"PROXY\r\n",
    b"\r\n\r\n\x00\r\nQUIX",
    b"\r\n\r\n\x01",
    b"\r\r",
])
def test_wrong_signature_is_refused_as_soon_as_it_is_seen(start: bytes) -> None:
    with pytest.raises(ProtocolError, match="no PROXY header"):
        ProxyParser().feed(start)


def test_wrong_signature_message_shows_the_bytes() -> None:
    refuse(CLIENT_HELLO_START, r"starts with b'\\x16\\x03\\x01")


def test_prefixes_of_both_signatures_wait_for_more() -> None:
    for sig in (b"PROXY ", V2_SIGNATURE + b"\x21\x11\x00"):
        parser = ProxyParser()
        for i in range(len(sig)):
            assert parser.feed(sig[i:i + 1]) is None


def test_empty_feed_is_harmless() -> None:
    parser = ProxyParser()
    assert parser.feed(b"") is None
    assert parser.feed(b"PROXY UNKNOWN\r") is None
    assert parser.feed(b"") is None
    result = parser.feed(b"\n")
    assert result is not None and result.leftover == b""


# -- a parser is used once --------------------------------------------------------


def test_feed_after_the_result_is_a_caller_bug() -> None:
    parser = ProxyParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
    assert parser.done
    with pytest.raises(RuntimeError, match="already parsed"):
        parser.feed(b"more")


def test_feed_after_an_error_raises_the_same_error() -> None:
    parser = ProxyParser()
    with pytest.raises(ProtocolError) as first:
        parser.feed(b"\x16")
    with pytest.raises(ProtocolError) as second:
        parser.feed(b"PROXY UNKNOWN\r\n")
    assert second.value is first.value
    assert not parser.done


# -- every split point, and random headers ------------------------------------------


SPEC_HEADERS = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n",
    b"PROXY UNKNOWN\r\n",
    v2_tcp4("192.168.0.1", "192.168.0.11", 56324, 443),
    v2_tcp6("::1", "2001:db8::2", 1, 2, tlv(0x05, b"id")),
    v2(command=0, fam=0),
]


@pytest.mark.parametrize("header", SPEC_HEADERS)
def test_byte_at_a_time_completes_exactly_at_the_last_header_byte(header: bytes) -> None:
    whole = parse(header + b"tail").header
    parser = ProxyParser()
    for i, byte in enumerate(header):
        result = parser.feed(bytes([byte]))
        if i < len(header) - 1:
            assert result is None, f"complete too early, at byte {i}"
    assert result is not None
    assert result.header == whole
    assert result.leftover == b""


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A random valid header and what it must parse to."""
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]))
    ports = draw(st.tuples(st.integers(0, 65535), st.integers(0, 65535)))
    ip4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
    ip6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
    tlvs = b"".join(draw(st.lists(
        st.builds(tlv, st.integers(0, 255), st.binary(max_size=40)), max_size=4)))
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    if kind in ("v1-4", "v2-4"):
        src, dst = draw(ip4), draw(ip4)
    else:
        src, dst = draw(ip6), draw(ip6)
    source, destination = (str(src), ports[0]), (str(dst), ports[1])
    if kind.startswith("v1-") and kind != "v1-unknown":
        fam = "TCP4" if kind == "v1-4" else "TCP6"
        # IPv6 in its long, uncompressed form sometimes: both are legal.
        s = src.exploded if draw(st.booleans()) else str(src)
        d = dst.exploded if draw(st.booleans()) else str(dst)
        data = f"PROXY {fam} {s} {d} {ports[0]} {ports[1]}\r\n".encode()
        return data, ProxyHeader(1, source, destination, length=len(data))
    if kind == "v1-unknown":
        junk = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80))
        data = b"PROXY UNKNOWN" + (b" " + junk.encode() if junk else b"") + b"\r\n"
        return data, ProxyHeader(1, None, None, length=len(data))
    if kind == "v2-local":
        data = v2(command=0, fam=draw(st.sampled_from([0x00, 0x11, 0x21])), block=tlvs)
        return data, ProxyHeader(2, None, None, local=True, length=len(data))
    build = v2_tcp4 if kind == "v2-4" else v2_tcp6
    data = build(str(src), str(dst), ports[0], ports[1], tlvs)
    return data, ProxyHeader(2, source, destination, length=len(data))


@settings(max_examples=300, deadline=None)
@given(valid_headers(), st.binary(max_size=64), st.lists(st.integers(1, 40), min_size=1, max_size=200))
@example((b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None, length=15)), b"\x16\x03", [1])
def test_any_chunking_gives_the_same_header_and_leftover(
    case: tuple[bytes, ProxyHeader], tail: bytes, sizes: list[int],
) -> None:
    data, expected = case
    stream = data + tail
    parser = ProxyParser()
    pos = 0
    result = None
    for size in sizes * (len(stream) // len(sizes) + 1):
        chunk = stream[pos:pos + size]
        pos += len(chunk)
        result = parser.feed(chunk)
        if result is not None:
            break
        assert pos < len(data), "the whole header was fed but no result"
    assert result is not None
    assert result.header == expected
    # Nothing lost, nothing duplicated: what follows the header is handed back.
    assert result.leftover + stream[pos:] == tail


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_arbitrary_bytes_only_ever_raise_protocol_error(data: bytes, step: int) -> None:
    parser = ProxyParser()
    try:
        for i in range(0, len(data), step):
            if parser.feed(data[i:i + step]) is not None:
                break
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(valid_headers(), st.data())
def test_one_corrupted_byte_never_crashes_and_never_loses_bytes(
    case: tuple[bytes, ProxyHeader], data: st.DataObject,
) -> None:
    header, _ = case
    i = data.draw(st.integers(0, len(header) - 1))
    flipped = header[:i] + bytes([header[i] ^ data.draw(st.integers(1, 255))]) + header[i + 1:]
    try:
        result = ProxyParser().feed(flipped + CLIENT_HELLO_START)
    except ProtocolError:
        return
    # Some corruptions are still valid headers (a different address digit, a
    # TLV byte, a v2 length one larger: then the stream's first byte is taken
    # as header, as the protocol says).  Either way every byte is header or
    # leftover, in order, and none is lost.
    if result is not None:
        stream = flipped + CLIENT_HELLO_START
        assert result.header.length + len(result.leftover) == len(stream)
        assert result.leftover == stream[result.header.length:]


# -- who may send a header ---------------------------------------------------------


def test_default_trusts_loopback_only() -> None:
    opts = ProxyOptions()
    assert opts.allow_from == LOOPBACK
    assert opts.allows(("127.0.0.1", 5000))
    assert opts.allows(("127.10.20.30", 5000))
    assert opts.allows(("::1", 5000))
    assert not opts.allows(("10.0.0.1", 5000))
    assert not opts.allows(("2001:db8::1", 5000))
    assert not opts.allows(None)  # the peer reset before we could ask its address


def test_ipv4_mapped_peer_matches_ipv4_network() -> None:
    opts = ProxyOptions(allow_from=parse_networks("10.0.0.0/8"))
    assert opts.allows(("::ffff:10.1.2.3", 1))
    assert not opts.allows(("::ffff:11.1.2.3", 1))


def test_scoped_ipv6_peer_matches() -> None:
    opts = ProxyOptions(allow_from=parse_networks("fe80::/10"))
    assert opts.allows(("fe80::1%eth0", 1))


def test_parse_networks() -> None:
    assert parse_networks("10.0.0.0/8, ::1,192.168.1.7") == (
        ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv6Network("::1/128"),
        ipaddress.IPv4Network("192.168.1.7/32"))


@pytest.mark.parametrize(("text", "match"), [
    ("", "empty network"),
    ("10.0.0.0/8,", "empty network"),
    ("10.0.0.1/8", "has host bits set"),
    ("10.0.0.0/33", "not a network"),
    ("example.com", "not a network"),
])
def test_parse_networks_refuses(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_networks(text)


def test_options_accept_a_string_or_a_list() -> None:
    # The annotation says networks; callers pass strings and lists anyway, and
    # ProxyOptions converts them at run time: that conversion is what is tested.
    assert ProxyOptions(allow_from="10.0.0.0/8").allow_from == parse_networks("10.0.0.0/8")  # type: ignore[arg-type]
    as_list = ProxyOptions(allow_from=list(parse_networks("::1")))  # type: ignore[arg-type]
    assert as_list.allow_from == parse_networks("::1")
    assert hash(as_list) == hash(ProxyOptions(allow_from=parse_networks("::1")))


def test_options_refuse_strings_inside_the_sequence() -> None:
    with pytest.raises(TypeError, match="parse_networks"):
        # A wrongly typed argument on purpose: the run-time refusal is under test.
        ProxyOptions(allow_from=("10.0.0.0/8",))  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan")])
def test_options_refuse_bad_timeouts(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        ProxyOptions(timeout=timeout)
