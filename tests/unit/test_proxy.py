"""The PROXY protocol parser (haproxy's spec, v1 and v2): hand-written headers, every malformed case, every split."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.net.proxy import (
    MAX_HEADER,
    MAX_TLV_BYTES,
    V1_MAX,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    ProxyReader,
    crc32c,
    header_length,
    looks_like_proxy,
    parse,
)

FFFF6 = ":".join(["ffff"] * 8)


def v2(ver_cmd: int, fam: int, body: bytes, *, length: int | None = None) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(body) if length is None else length) + body


def inet(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    return src + dst + struct.pack("!HH", sport, dport)


V4_BODY = inet(bytes([203, 0, 113, 7]), bytes([192, 0, 2, 1]), 5555, 443)
V6_BODY = inet(bytes.fromhex("20010db8000000000000000000000007"), bytes.fromhex("20010db8000000000000000000000001"), 5555, 443)

GOOD = [
    # The spec's v1 examples, shortest to the 107-byte worst case.
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    (f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode(), ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), None),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 0 443\r\n", ("2001:db8::7", 0), ("2001:db8::1", 443)),
    (b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:192.0.2.1 5555 443\r\n", ("203.0.113.7", 5555), ("192.0.2.1", 443)),
    (b"PROXY UNKNOWN\r\n", None, None),
    (f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode(), None, None),
    # v2: PROXY over TCP/IPv4 and TCP/IPv6, with TLVs; LOCAL (a health check) with any family; AF_UNSPEC.
    (v2(0x21, 0x11, V4_BODY), ("203.0.113.7", 5555), ("192.0.2.1", 443)),
    (v2(0x21, 0x21, V6_BODY), ("2001:db8::7", 5555), ("2001:db8::1", 443)),
    (v2(0x21, 0x11, V4_BODY + b"\x01\x00\x02h2" + b"\x04\x00\x03\x00\x00\x00"), ("203.0.113.7", 5555), ("192.0.2.1", 443)),
    (v2(0x20, 0x00, b""), None, None),
    (v2(0x20, 0x11, V4_BODY), None, None),
    (v2(0x20, 0x31, b"\x00" * 216), None, None),
    (v2(0x20, 0x12, b""), None, None),
    (v2(0x21, 0x00, b""), None, None),
]


@pytest.mark.parametrize(("raw", "source", "destination"), GOOD)
def test_valid_headers_parse_to_the_client_address(raw: bytes, source: tuple[str, int] | None, destination: tuple[str, int] | None) -> None:
    """Each of the spec's shapes gives its source (None for LOCAL/UNKNOWN, where the socket's peer stands)."""
    assert header_length(raw) == len(raw)
    h = parse(raw)
    assert h.source == source and h.length == len(raw)
    if destination is not None:
        assert h.destination == destination
    peer = ("10.0.0.9", 40000)
    assert h.client(peer) == (source or peer)


def test_v1_worst_case_is_exactly_107_bytes() -> None:
    worst = f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode()
    assert len(worst) == V1_MAX == 107
    assert parse(worst).source is None


def test_commands_versions_and_tlvs_are_reported() -> None:
    h = parse(v2(0x21, 0x11, V4_BODY + b"\x01\x00\x02h2"))
    assert (h.version, h.command, h.tlvs) == (2, "proxy", ((1, b"h2"),))
    assert parse(v2(0x20, 0x00, b"")).command == "local"
    assert parse(b"PROXY UNKNOWN\r\n").version == 1


def test_a_correct_crc32c_tlv_is_accepted_and_a_wrong_one_refused() -> None:
    """PP2_TYPE_CRC32C covers the whole header with the checksum field zeroed (spec 2.2.5)."""
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    zeroed = v2(0x21, 0x11, V4_BODY + b"\x03\x00\x04\x00\x00\x00\x00")
    good = zeroed[:-4] + struct.pack("!I", crc32c(zeroed))
    assert parse(good).source == ("203.0.113.7", 5555)
    bad = zeroed[:-4] + struct.pack("!I", crc32c(zeroed) ^ 1)
    with pytest.raises(ProxyError) as exc:
        parse(bad)
    assert exc.value.reason == "proxy_v2_checksum"


BAD = [
    # Not a header at all.
    (b"SSH-2.0-OpenSSH_9.2\r\n", "proxy_signature"),
    (b"\x16\x03\x01\x00\xa5", "proxy_signature"),
    (b"GET / HTTP/1.1\r\n", "proxy_signature"),
    (b"PROXY\r\n", "proxy_signature"),
    (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "proxy_signature"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + V4_BODY, "proxy_signature"),
    # v1 syntax.
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "proxy_v1_syntax"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "proxy_v1_syntax"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "proxy_v1_syntax"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "proxy_v1_syntax"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "proxy_v1_syntax"),
    (b"PROXY \r\n", "proxy_v1_syntax"),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "proxy_v1_protocol"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "proxy_v1_protocol"),
    (b"PROXY UNKNOWNX\r\n", "proxy_v1_syntax"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "proxy_v1_address"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "proxy_v1_address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "proxy_v1_address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "proxy_v1_address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "proxy_v1_address"),
    (b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n", "proxy_v1_address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "proxy_v1_port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "proxy_v1_port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "proxy_v1_port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "proxy_v1_port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 999999\r\n", "proxy_v1_port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa3\r\n", "proxy_v1_port"),
    (b"PROXY UNKNOWN " + b"x" * 100, "proxy_v1_too_long"),
    (b"PROXY " + b"A" * 101 + b"\r\n", "proxy_v1_too_long"),
    # v2 fixed part.
    (v2(0x11, 0x11, V4_BODY), "proxy_v2_version"),
    (v2(0x31, 0x11, V4_BODY), "proxy_v2_version"),
    (v2(0x22, 0x11, V4_BODY), "proxy_v2_command"),
    (v2(0x2F, 0x11, V4_BODY), "proxy_v2_command"),
    (v2(0x21, 0x13, V4_BODY), "proxy_v2_family"),
    (v2(0x21, 0x41, V4_BODY), "proxy_v2_family"),
    (v2(0x21, 0x01, V4_BODY), "proxy_v2_family"),
    # v2 lengths and transports.
    (v2(0x21, 0x11, V4_BODY[:11]), "proxy_v2_length"),
    (v2(0x21, 0x21, V6_BODY[:35]), "proxy_v2_length"),
    (v2(0x21, 0x11, b"", length=12 + MAX_TLV_BYTES + 1), "proxy_v2_too_long"),
    (v2(0x20, 0x00, b"", length=0xFFFF), "proxy_v2_too_long"),
    (v2(0x21, 0x12, V4_BODY), "proxy_unsupported"),
    (v2(0x21, 0x22, V6_BODY), "proxy_unsupported"),
    (v2(0x21, 0x31, b"\x00" * 216), "proxy_unsupported"),
    (v2(0x21, 0x32, b"\x00" * 216), "proxy_unsupported"),
    # v2 TLVs.
    (v2(0x21, 0x11, V4_BODY + b"\x01"), "proxy_v2_tlv"),
    (v2(0x21, 0x11, V4_BODY + b"\x01\x00"), "proxy_v2_tlv"),
    (v2(0x21, 0x11, V4_BODY + b"\x01\x00\x05h2"), "proxy_v2_tlv"),
    (v2(0x21, 0x11, V4_BODY + b"\x03\x00\x02ab"), "proxy_v2_tlv"),
]


@pytest.mark.parametrize(("raw", "reason"), BAD)
def test_malformed_headers_raise_proxy_error_with_a_reason(raw: bytes, reason: str) -> None:
    """Whole, split or fed at once, each malformed header raises ProxyError with its slug, and nothing else."""
    with pytest.raises(ProxyError) as exc:
        n = header_length(raw[:MAX_HEADER])
        if n is None:
            raise ProxyError("incomplete", reason="incomplete")
        parse(raw[:n])
    assert exc.value.reason == reason
    assert isinstance(exc.value, GatewayError)
    with pytest.raises(ProxyError) as fed:
        ProxyReader().feed(raw)
    assert fed.value.reason == reason


def test_truncated_and_trailing_bytes_are_refused_by_parse() -> None:
    whole = v2(0x21, 0x11, V4_BODY)
    for cut in range(len(whole)):
        with pytest.raises(ProxyError):
            parse(whole[:cut])
    with pytest.raises(ProxyError) as exc:
        parse(whole + b"S")
    assert exc.value.reason == "proxy_trailing"
    with pytest.raises(ProxyError) as exc:
        parse(b"PROXY UNKNOWN\r\nSSH-")
    assert exc.value.reason == "proxy_trailing"


def test_partial_prefixes_need_more_and_never_raise() -> None:
    """Every prefix of a valid header: header_length is None until the length is known, never an error."""
    for raw, _, _ in GOOD:
        for cut in range(len(raw)):
            n = header_length(raw[:cut])
            assert n is None or n == len(raw)


@pytest.mark.parametrize(("raw", "source", "destination"), GOOD)
def test_split_at_every_offset_gives_the_same_header_and_the_rest(
    raw: bytes, source: tuple[str, int] | None, destination: tuple[str, int] | None
) -> None:
    """The header in two pieces at every offset, and byte by byte, with the client's first bytes after it."""
    payload = b"SSH-2.0-x\r\n"
    stream = raw + payload
    whole = parse(raw)
    for cut in range(1, len(stream)):
        r = ProxyReader()
        first = r.feed(stream[:cut])
        assert (first is None) == (cut < len(raw))
        assert r.feed(stream[cut:]) == whole and r.remainder == payload
    r = ProxyReader()
    results = [r.feed(bytes([b])) for b in stream]
    assert results[len(raw) - 1] == whole and all(x is None for x in results[: len(raw) - 1])
    assert r.remainder == payload


def test_looks_like_proxy_names_refusals_only_with_five_bytes_or_more() -> None:
    assert looks_like_proxy(b"PROXY TCP4 1.2.3.4")
    assert looks_like_proxy(V2_SIGNATURE + b"\x21")
    assert looks_like_proxy(b"\r\n\r\n\x00")
    assert not looks_like_proxy(b"PROX")
    assert not looks_like_proxy(b"SSH-2.0-x")
    assert not looks_like_proxy(b"PROXYZ")


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=2 * MAX_HEADER))
def test_arbitrary_bytes_raise_only_proxy_error(data: bytes) -> None:
    """Whatever a client sends, the parser answers with a header, "need more" or ProxyError, nothing else."""
    try:
        n = header_length(data)
        if n is not None and n <= len(data):
            assert isinstance(parse(data[:n]), ProxyHeader)
    except ProxyError as exc:
        assert exc.reason.startswith("proxy_")
    with contextlib.suppress(ProxyError):
        ProxyReader().feed(data)


SIG_PREFIXED = st.one_of(
    st.binary(max_size=MAX_HEADER).map(lambda b: b"PROXY " + b),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0x600), st.binary(max_size=1600)).map(
        lambda t: V2_SIGNATURE + bytes([t[0], t[1]]) + struct.pack("!H", t[2]) + t[3]
    ),
)


@settings(max_examples=3000, deadline=None)
@given(SIG_PREFIXED, st.integers(1, 64))
def test_bytes_after_a_valid_signature_raise_only_proxy_error(data: bytes, chunk: int) -> None:
    """Past the signature (where the interesting branches are), in any chunking: a header or ProxyError only."""
    r = ProxyReader()
    try:
        for i in range(0, len(data), chunk):
            r.feed(data[i : i + chunk])
    except ProxyError as exc:
        assert exc.reason.startswith("proxy_")
