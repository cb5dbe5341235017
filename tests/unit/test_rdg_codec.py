"""gateway.protocols.rdg_codec: RDG packets, HTTP heads, WebSocket frames and chunked coding.

The byte vectors here are written by hand from shared/recipes/rd-gateway.md §3.2 (and RFC 6455 §5.7 for
WebSocket), never produced with the encoders: the gateway and the test client share the codec, so a
mistake they share has to be caught against bytes nobody computed with it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocols import rdg_codec as c
from gateway.protocols.rdg_codec import RdgError


def h(text: str) -> bytes:
    """Hex with spaces and `|` separators, so each vector reads like the recipe's table."""
    return bytes.fromhex(text.replace("|", " "))


def u16le(text: str) -> bytes:
    return text.encode("utf-16-le")


# ----------------------------------------------------------------------------------------------------
# Hand-written vectors (type u16 | reserved u16 | packetLength u32 | body)

HANDSHAKE_REQUEST_PAA = h("01 00 00 00 0e 00 00 00 | 01 | 00 | 00 00 | 02 00")
HANDSHAKE_RESPONSE_OK = h("02 00 00 00 12 00 00 00 | 00 00 00 00 | 01 | 00 | 00 00 | 02 00")
# caps 0x0D, fieldsPresent 1 (PAA cookie), reserved, cookie "tok" + NUL = 8 bytes.
TUNNEL_CREATE_TOK = h("04 00 00 00 1a 00 00 00 | 0d 00 00 00 | 01 00 | 00 00 | 08 00 | 74 00 6f 00 6b 00 00 00")
TUNNEL_RESPONSE_OK = h("05 00 00 00 1a 00 00 00 | 00 00 | 00 00 00 00 | 03 00 | 00 00 | 0a 00 00 00 | 0a 00 00 00")
TUNNEL_AUTH_VM = h("06 00 00 00 12 00 00 00 | 00 00 | 06 00 | 76 00 6d 00 00 00")
TUNNEL_AUTH_RESPONSE_OK = h("07 00 00 00 18 00 00 00 | 00 00 00 00 | 03 00 | 00 00 | 00 00 00 80 | 05 00 00 00")
# numResources 1, numAltResources 0, port 3389 (0x0d3d), protocol 3, "winvm1" + NUL = 14 bytes.
CHANNEL_CREATE_WINVM1 = h("08 00 00 00 1e 00 00 00 | 01 | 00 | 3d 0d | 03 00 | 0e 00 | 77 00 69 00 6e 00 76 00 6d 00 31 00 00 00")
CHANNEL_RESPONSE_OK = h("09 00 00 00 14 00 00 00 | 00 00 00 00 | 01 00 | 00 00 | 01 00 00 00")
DATA_HELLO = h("0a 00 00 00 0f 00 00 00 | 05 00 | 68 65 6c 6c 6f")
SERVICE_MESSAGE_HI = h("0b 00 00 00 10 00 00 00 | 06 00 | 48 00 69 00 00 00")
REAUTH_7 = h("0c 00 00 00 10 00 00 00 | 07 00 00 00 00 00 00 00")
KEEPALIVE = h("0d 00 00 00 08 00 00 00")
CLOSE_CHANNEL_TIMEOUT = h("10 00 00 00 0c 00 00 00 | f6 59 07 80")
CLOSE_CHANNEL_RESPONSE_OK = h("11 00 00 00 0c 00 00 00 | 00 00 00 00")

CLIENT_STREAM = HANDSHAKE_REQUEST_PAA + TUNNEL_CREATE_TOK + TUNNEL_AUTH_VM + CHANNEL_CREATE_WINVM1 + DATA_HELLO + KEEPALIVE
CLIENT_VALUES = [
    c.HandshakeRequest(major=1, minor=0, client_version=0, ext_auth=2),
    c.TunnelCreate(caps=0x0D, fields=1, paa_cookie="tok"),
    c.TunnelAuth(client_name="vm"),
    c.ChannelCreate(resources=("winvm1",), alt_resources=(), port=3389, protocol=3),
    c.Data(b"hello"),
    c.Keepalive(),
]


def read_client(raw: bytes, max_packet: int = 70_000) -> list[c.Packet]:
    return c.PacketReader(max_packet).feed(raw)


def read_server(raw: bytes) -> list[c.ServerPacket]:
    return c.ServerPacketReader().feed(raw)


def reason_of(exc: pytest.ExceptionInfo[RdgError]) -> str:
    return exc.value.reason


# ----------------------------------------------------------------------------------------------------
# Constants


def test_hresults_match_ms_tsgu() -> None:
    """The HRESULTs are the MS-TSGU 2.2.6 values FreeRDP prints by name; packet types are the spec's."""
    assert c.E_PROXY_COOKIE_AUTHENTICATION_ACCESS_DENIED == 0x800759F8
    assert c.E_PROXY_RAP_ACCESSDENIED == 0x800759DA
    assert c.E_PROXY_SESSIONTIMEOUT == 0x800759F6
    assert c.E_PROXY_INTERNALERROR == 0x800759D8
    assert c.E_PROXY_NOTSUPPORTED == 0x000059E8
    assert (c.DATA, c.KEEPALIVE, c.CLOSE_CHANNEL, c.CLOSE_CHANNEL_RESPONSE) == (0x0A, 0x0D, 0x10, 0x11)
    assert c.MAX_DATA == 65525


def test_failed_is_the_hresult_severity_bit() -> None:
    """FreeRDP refuses only when FAILED(status): a bare 0x59E8 would pass as success."""
    assert c.failed(c.E_PROXY_RAP_ACCESSDENIED)
    assert not c.failed(0) and not c.failed(c.E_PROXY_NOTSUPPORTED)


def test_rdg_error_is_a_value_error_with_a_slug() -> None:
    """RdgError is a ValueError and a GatewayError carrying a stable reason."""
    with pytest.raises(ValueError, match="packetLength") as exc:
        read_client(h("0d 00 00 00 04 00 00 00"))
    assert isinstance(exc.value, RdgError) and exc.value.reason == "bad_packet"


# ----------------------------------------------------------------------------------------------------
# Client -> server packets: decoding the hand-written bytes


def test_client_stream_decodes_to_the_recipe_values() -> None:
    """What FreeRDP 2.11 sends with /gat, in order, decodes to the recipe's fields."""
    assert read_client(CLIENT_STREAM) == CLIENT_VALUES


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (CLOSE_CHANNEL_RESPONSE_OK, c.CloseChannelResponse(0)),
        (CLOSE_CHANNEL_TIMEOUT, c.CloseChannel(0x800759F6)),
        (h("04 00 00 00 10 00 00 00 | 0d 00 00 00 | 00 00 | 00 00"), c.TunnelCreate(caps=0x0D, fields=0, paa_cookie=None)),
        (h("0a 00 00 00 0a 00 00 00 | 00 00"), c.Data(b"")),
    ],
)
def test_other_client_packets_decode(raw: bytes, value: c.Packet) -> None:
    """Close packets, a TUNNEL_CREATE without a cookie (NTLM mode) and an empty DATA decode."""
    assert read_client(raw) == [value]


def test_cookie_without_terminating_nul_is_accepted() -> None:
    """Only one trailing NUL is stripped, and a string without one is fine too."""
    raw = h("04 00 00 00 18 00 00 00 | 0d 00 00 00 | 01 00 | 00 00 | 06 00 | 74 00 6f 00 6b 00")
    assert read_client(raw) == [c.TunnelCreate(caps=0x0D, fields=1, paa_cookie="tok")]


def test_channel_create_with_alt_resources() -> None:
    """Two resources and one alternative are read in order."""
    body = h("02 | 01 | 3d 0d | 03 00") + h("04 00 61 00 00 00") + h("04 00 62 00 00 00") + h("04 00 63 00 00 00")
    raw = struct.pack("<HHI", 8, 0, 8 + len(body)) + body
    assert read_client(raw) == [c.ChannelCreate(resources=("a", "b"), alt_resources=("c",), port=3389, protocol=3)]


def test_non_ascii_strings_decode() -> None:
    """UTF-16LE with a surrogate pair (an emoji) decodes to one character."""
    name = u16le("pc-\u00e9\U0001f600\x00")
    raw = struct.pack("<HHIHH", 6, 0, 12 + len(name), 0, len(name)) + name
    assert read_client(raw) == [c.TunnelAuth("pc-\u00e9\U0001f600")]


# ----------------------------------------------------------------------------------------------------
# Server -> client packets


def test_server_stream_decodes() -> None:
    """Every server packet type, from hand-written bytes, decodes in one feed."""
    raw = (
        HANDSHAKE_RESPONSE_OK
        + TUNNEL_RESPONSE_OK
        + TUNNEL_AUTH_RESPONSE_OK
        + CHANNEL_RESPONSE_OK
        + DATA_HELLO
        + SERVICE_MESSAGE_HI
        + REAUTH_7
        + KEEPALIVE
        + CLOSE_CHANNEL_TIMEOUT
    )
    assert read_server(raw) == [
        c.HandshakeResponse(error=0, major=1, minor=0, server_version=0, ext_auth=2),
        c.TunnelResponse(server_version=0, status=0, fields=3, tunnel_id=10, caps=0x0A, consent=None),
        c.TunnelAuthResponse(status=0, fields=3, redir_flags=0x80000000, idle_minutes=5),
        c.ChannelResponse(status=0, fields=1, channel_id=1),
        c.Data(b"hello"),
        c.ServiceMessage("Hi"),
        c.ReauthMessage(7),
        c.Keepalive(),
        c.CloseChannel(0x800759F6),
    ]


def test_tunnel_response_failure_without_fields() -> None:
    """A refusal with no optional fields (18 bytes) decodes with the HRESULT."""
    raw = h("05 00 00 00 12 00 00 00 | 00 00 | f8 59 07 80 | 00 00 | 00 00")
    assert read_server(raw) == [c.TunnelResponse(0, 0x800759F8, 0, None, None, None)]


# ----------------------------------------------------------------------------------------------------
# Encoders against the hand-written bytes


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (c.handshake_response(), HANDSHAKE_RESPONSE_OK),
        (c.tunnel_response(0), TUNNEL_RESPONSE_OK),
        (c.tunnel_auth_response(0, idle_minutes=5), TUNNEL_AUTH_RESPONSE_OK),
        (c.channel_response(0), CHANNEL_RESPONSE_OK),
        (c.service_message("Hi"), SERVICE_MESSAGE_HI),
        (c.close_channel(c.E_PROXY_SESSIONTIMEOUT), CLOSE_CHANNEL_TIMEOUT),
        (c.keepalive(), KEEPALIVE),
        (c.reauth_message(7), REAUTH_7),
        (c.handshake_request(), HANDSHAKE_REQUEST_PAA),
        (c.tunnel_create("tok"), TUNNEL_CREATE_TOK),
        (c.tunnel_auth("vm"), TUNNEL_AUTH_VM),
        (c.channel_create("winvm1", 3389), CHANNEL_CREATE_WINVM1),
        (c.data_packet(b"hello"), DATA_HELLO),
        (c.close_channel_response(0), CLOSE_CHANNEL_RESPONSE_OK),
    ],
)
def test_encoders_write_the_recipe_bytes(encoded: bytes, expected: bytes) -> None:
    """Each encoder produces exactly the hand-written packet."""
    assert encoded == expected


def test_handshake_response_is_18_bytes_and_carries_the_error() -> None:
    """HANDSHAKE_RESPONSE is 18 bytes; the error code is the first body field."""
    raw = c.handshake_response(c.E_PROXY_INTERNALERROR)
    assert len(raw) == 18 and raw[8:12] == h("d8 59 07 80")


def test_data_splits_at_max_data() -> None:
    """Server DATA is cut into packets of at most 65525 bytes each, with a matching cbDataLen."""
    payload = bytes(range(256)) * 600  # 153600 bytes
    packets = c.data(payload)
    assert [len(p) - 10 for p in packets] == [65525, 65525, 153600 - 2 * 65525]
    assert packets[0][:10] == h("0a 00 00 00 ff ff 00 00 f5 ff")
    assert b"".join(p[10:] for p in packets) == payload
    assert c.data(b"") == []


def test_data_packet_refuses_more_than_a_u16() -> None:
    """One client DATA packet carries at most 65535 bytes."""
    assert len(c.data_packet(b"x" * 65535)) == 65545
    with pytest.raises(RdgError) as exc:
        c.data_packet(b"x" * 65536)
    assert reason_of(exc) == "too_large"


def test_service_message_is_truncated_and_cleaned() -> None:
    """A long notice is cut to a few hundred characters; ESC and other controls never reach the terminal."""
    (msg,) = read_server(c.service_message("x" * 5000))
    assert isinstance(msg, c.ServiceMessage) and len(msg.text) == c.MAX_SERVICE_MESSAGE_CHARS and msg.text.endswith("...")
    (msg,) = read_server(c.service_message("You have been disconnected.\x1b[2J\x07 bye\ud800\nline 2"))
    assert msg == c.ServiceMessage("You have been disconnected.[2J bye?\nline 2")


def test_tunnel_create_without_cookie() -> None:
    """Without a cookie, fieldsPresent is 0 and the packet is 16 bytes."""
    assert c.tunnel_create(None) == h("04 00 00 00 10 00 00 00 | 0d 00 00 00 | 00 00 | 00 00")


# ----------------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize("raw", [CLIENT_STREAM, TUNNEL_CREATE_TOK + DATA_HELLO])
def test_client_reader_survives_a_split_at_every_offset(raw: bytes) -> None:
    """Feeding the stream in two pieces, cut at every offset, gives the same packets."""
    expected = read_client(raw)
    for i in range(len(raw) + 1):
        reader = c.PacketReader()
        assert reader.feed(raw[:i]) + reader.feed(raw[i:]) == expected, i
        assert reader.buffered == 0


def test_client_reader_byte_by_byte() -> None:
    """One byte per feed works and nothing is decoded early."""
    reader = c.PacketReader()
    out: list[c.Packet] = []
    for i in range(len(CLIENT_STREAM)):
        out += reader.feed(CLIENT_STREAM[i : i + 1])
    assert out == CLIENT_VALUES


def test_server_reader_survives_a_split_at_every_offset() -> None:
    """The server-side reader has the same incremental behaviour."""
    raw = TUNNEL_RESPONSE_OK + SERVICE_MESSAGE_HI + CLOSE_CHANNEL_TIMEOUT
    expected = read_server(raw)
    for i in range(len(raw) + 1):
        reader = c.ServerPacketReader()
        assert reader.feed(raw[:i]) + reader.feed(raw[i:]) == expected, i


# ----------------------------------------------------------------------------------------------------
# Malformed packets


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (h("0d 00 00 00 07 00 00 00"), "bad_packet"),  # packetLength < 8
        (h("0d 00 00 00 00 00 00 00"), "bad_packet"),  # packetLength 0
        (h("0a 00 00 00 71 11 01 00"), "too_large"),  # 70001 > 70000: refused on the header alone
        (h("0a 00 00 00 ff ff ff ff"), "too_large"),
        (h("03 00 00 00 08 00 00 00"), "bad_packet"),  # unknown type
        (h("02 00 00 00 12 00 00 00"), "bad_packet"),  # a server packet from a client
        (h("0c 00 00 00 10 00 00 00"), "bad_packet"),  # REAUTH_MESSAGE is server -> client only
        (h("0d 00 00 00 09 00 00 00 00"), "bad_packet"),  # keepalive with a trailing byte
        (h("11 00 00 00 0d 00 00 00 00 00 00 00 00"), "bad_packet"),  # 13-byte close response
        (h("01 00 00 00 0d 00 00 00 01 00 00 00 02"), "bad_packet"),  # short handshake
        (h("0a 00 00 00 0f 00 00 00 | 06 00 | 68 65 6c 6c 6f"), "bad_packet"),  # cbDataLen 6 != 5
        (h("0a 00 00 00 0f 00 00 00 | 04 00 | 68 65 6c 6c 6f"), "bad_packet"),  # cbDataLen 4 != 5
        (h("06 00 00 00 11 00 00 00 | 00 00 | 05 00 | 76 00 6d 00 00"), "bad_packet"),  # odd string length
        (h("06 00 00 00 10 00 00 00 | 00 00 | 04 00 | 00 d8 41 00"), "bad_packet"),  # lone high surrogate
        (h("06 00 00 00 0e 00 00 00 | 00 00 | 02 00 | 00 dc"), "bad_packet"),  # lone low surrogate
        (h("06 00 00 00 10 00 00 00 | 00 00 | 08 00 | 76 00 6d 00"), "bad_packet"),  # string past the end
        (h("06 00 00 00 14 00 00 00 | 00 00 | 06 00 | 76 00 6d 00 00 00 | 41 00"), "bad_packet"),  # trailing bytes
        (h("06 00 00 00 12 00 00 00 | 00 00 | 06 00 | 76 00 00 00 6d 00"), "bad_packet"),  # embedded NUL
        (h("08 00 00 00 0e 00 00 00 | 00 | 00 | 3d 0d | 03 00"), "bad_packet"),  # no resource
        (h("08 00 00 00 12 00 00 00 | 02 | 00 | 3d 0d | 03 00 | 02 00 61 00"), "bad_packet"),  # 2nd resource missing
        (h("04 00 00 00 12 00 00 00 | 0d 00 00 00 | 01 00 | 00 00 | 08 00"), "bad_packet"),  # cookie missing
        (h("04 00 00 00 0c 00 00 00 | 0d 00 00 00"), "bad_packet"),  # TUNNEL_CREATE too short
    ],
)
def test_malformed_client_packets_are_refused(raw: bytes, reason: str) -> None:
    """Each malformed packet raises RdgError with the expected reason, and nothing else."""
    with pytest.raises(RdgError) as exc:
        read_client(raw)
    assert reason_of(exc) == reason


def test_short_header_waits_for_more() -> None:
    """Fewer than 8 bytes is not an error yet: the reader waits."""
    reader = c.PacketReader()
    assert reader.feed(h("0d 00 00")) == []
    assert reader.buffered == 3


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    """The header alone is enough to refuse; nothing of the announced body is buffered."""
    reader = c.PacketReader()
    reader.set_max_packet(c.PRE_AUTH_MAX_PACKET)
    with pytest.raises(RdgError) as exc:
        reader.feed(struct.pack("<HHI", c.TUNNEL_CREATE, 0, c.PRE_AUTH_MAX_PACKET + 1))
    assert reason_of(exc) == "too_large"


def test_a_failed_reader_stays_failed() -> None:
    """After an error the reader refuses everything, even good packets."""
    reader = c.PacketReader()
    with pytest.raises(RdgError):
        reader.feed(h("03 00 00 00 08 00 00 00"))
    with pytest.raises(RdgError):
        reader.feed(KEEPALIVE)


def test_oversized_cookie_is_refused() -> None:
    """A PAA cookie over MAX_COOKIE_BYTES is too large even when the packet limit allows it."""
    cookie = u16le("a" * (c.MAX_COOKIE_BYTES // 2) + "\x00")  # 16 KiB + 2
    body = h("0d 00 00 00 | 01 00 | 00 00") + struct.pack("<H", len(cookie)) + cookie
    with pytest.raises(RdgError) as exc:
        read_client(struct.pack("<HHI", 4, 0, 8 + len(body)) + body)
    assert reason_of(exc) == "too_large"


def test_largest_allowed_cookie_fits_the_pre_auth_limit() -> None:
    """A cookie of exactly MAX_COOKIE_BYTES passes with max_packet = PRE_AUTH_MAX_PACKET."""
    cookie = u16le("b" * (c.MAX_COOKIE_BYTES // 2 - 1) + "\x00")
    body = h("0d 00 00 00 | 01 00 | 00 00") + struct.pack("<H", len(cookie)) + cookie
    raw = struct.pack("<HHI", 4, 0, 8 + len(body)) + body
    assert len(raw) == c.PRE_AUTH_MAX_PACKET
    (value,) = read_client(raw, max_packet=c.PRE_AUTH_MAX_PACKET)
    assert isinstance(value, c.TunnelCreate) and value.paa_cookie == "b" * (c.MAX_COOKIE_BYTES // 2 - 1)


def test_data_phase_limit_allows_the_largest_data_packet() -> None:
    """With DATA_MAX_PACKET, a 65535-byte DATA packet passes and one byte more in packetLength does not."""
    reader = c.PacketReader(c.DATA_MAX_PACKET)
    big = h("0a 00 00 00 09 00 01 00 ff ff") + b"z" * 65535
    assert reader.feed(big) == [c.Data(b"z" * 65535)]
    with pytest.raises(RdgError) as exc:
        reader.feed(h("0a 00 00 00 0a 00 01 00"))
    assert reason_of(exc) == "too_large"


def test_partial_packet_buffer_stays_below_max_packet() -> None:
    """A packet in progress holds at most its announced length."""
    reader = c.PacketReader(c.DATA_MAX_PACKET)
    assert reader.feed(h("0a 00 00 00 09 00 01 00 ff ff") + b"z" * 60000) == []
    assert reader.buffered < reader.max_packet


def test_set_max_packet_rejects_nonsense() -> None:
    """The limit is between a header and 1 MiB (programming errors, not input)."""
    with pytest.raises(ValueError, match="max_packet"):
        c.PacketReader(7)
    with pytest.raises(ValueError, match="max_packet"):
        c.PacketReader().set_max_packet(1 << 21)


def test_string_limits_apply_to_names() -> None:
    """A client name over MAX_NAME_BYTES is refused."""
    name = u16le("n" * 600)
    raw = struct.pack("<HHIHH", 6, 0, 12 + len(name), 0, len(name)) + name
    with pytest.raises(RdgError) as exc:
        read_client(raw)
    assert reason_of(exc) == "too_large"


@pytest.mark.parametrize(
    "raw",
    [
        h("02 00 00 00 13 00 00 00 | 00 00 00 00 | 01 | 00 | 00 00 | 02 00 | 00"),  # 19-byte handshake response
        h("09 00 00 00 10 00 00 00 | 00 00 00 00 | 01 00 | 00 00"),  # channelId announced, missing
        h("0b 00 00 00 0d 00 00 00 | 03 00 | 48 00 00"),  # odd message length
        h("01 00 00 00 0e 00 00 00 | 01 | 00 | 00 00 | 02 00"),  # a client packet from the server
    ],
)
def test_malformed_server_packets_are_refused(raw: bytes) -> None:
    """The client-side reader is as strict as the server side."""
    with pytest.raises(RdgError):
        read_server(raw)


# ----------------------------------------------------------------------------------------------------
# HTTP


FREERDP_WS_REQUEST = (
    b"RDG_OUT_DATA /remoteDesktopGateway/ HTTP/1.1\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Pragma: no-cache\r\n"
    b"Accept: */*\r\n"
    b"User-Agent: MS-RDGateway/1.0\r\n"
    b"Host: 127.0.0.1\r\n"
    b"Connection: Upgrade\r\n"
    b"Upgrade: websocket\r\n"
    b"Sec-Websocket-Version: 13\r\n"
    b"Sec-Websocket-Key: PARH_N\\XLEDGPBZ\r\n"
    b"RDG-Connection-Id: {7B3C9F2A-1D4E-4F6A-9B8C-0D1E2F3A4B5C}\r\n"
    b"RDG-Auth-Scheme: PAA\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def test_freerdp_request_head_parses() -> None:
    """FreeRDP's WebSocket request: RDG method, lower-case header names, values kept as sent."""
    assert c.head_complete(FREERDP_WS_REQUEST + b"\x82") == len(FREERDP_WS_REQUEST)
    head = c.parse_head(FREERDP_WS_REQUEST + b"extra")
    assert (head.method, head.target, head.version) == ("RDG_OUT_DATA", "/remoteDesktopGateway/", "HTTP/1.1")
    assert head.headers["sec-websocket-key"] == "PARH_N\\XLEDGPBZ"
    assert head.headers["rdg-auth-scheme"] == "PAA" and head.headers["content-length"] == "0"
    assert len(head.headers) == 12


def test_head_complete_needs_crlfcrlf() -> None:
    """Without the blank line the head is not complete."""
    assert c.head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n") is None
    assert c.head_complete(b"GET / HTTP/1.1\n\n") is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n", "bad_http"),  # no CRLFCRLF
        (b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n", "too_large"),
        (b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000, "too_large"),  # too long and never ends
        (b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(65)) + b"\r\n", "too_large"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", "bad_http"),  # duplicate, case-insensitive
        (b"GET / HTTP/1.1\r\nX-Name: caf\xc3\xa9\r\n\r\n", "bad_http"),  # non-ASCII value
        (b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", "bad_http"),  # non-ASCII target
        (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", "bad_http"),  # bare CR
        (b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n", "bad_http"),  # bare LF
        (b"GET / HTTP/1.1\r\nX: a\r\n continued\r\n\r\n", "bad_http"),  # obs-fold
        (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", "bad_http"),
        (b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n", "bad_http"),
        (b"GET / HTTP/1.1\r\n: v\r\n\r\n", "bad_http"),
        (b"GET  / HTTP/1.1\r\n\r\n", "bad_http"),  # double space
        (b"GET / HTTP/x\r\n\r\n", "bad_http"),
        (b"GET /\r\n\r\n", "bad_http"),
        (b"\r\n\r\n", "bad_http"),
    ],
)
def test_bad_heads_are_refused(raw: bytes, reason: str) -> None:
    """Limits and malformed lines raise RdgError with the right slug."""
    with pytest.raises(RdgError) as exc:
        c.parse_head(raw)
    assert reason_of(exc) == reason


def test_head_limits_are_configurable() -> None:
    """max_bytes and max_headers are the caller's: exactly at the limit passes, one over fails."""
    raw = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n"
    assert len(c.parse_head(raw, max_bytes=len(raw), max_headers=2).headers) == 2
    with pytest.raises(RdgError):
        c.parse_head(raw, max_bytes=len(raw) - 1)
    with pytest.raises(RdgError):
        c.parse_head(raw, max_headers=1)


def test_response_head_parses() -> None:
    """The test client reads 101 and 200 answers."""
    head = c.parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert (head.status, head.reason, head.headers["upgrade"]) == (101, "Switching Protocols", "websocket")
    with pytest.raises(RdgError):
        c.parse_response_head(b"HTTP/1.1 2x0 OK\r\n\r\n")


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (b"RDG_OUT_DATA /remoteDesktopGateway/ HTTP/1.1\r\n", True),
        (b"RDG_IN_DATA ", True),
        (b"RDG_OUT_DATA ", True),
        (b"", None),
        (b"R", None),
        (b"RDG_", None),
        (b"RDG_OUT_DATA", None),
        (b"RDG_IN", None),
        (b"GET / HTTP/1.1\r\n", False),
        (b"RDG_OUT_DATAX", False),
        (b"RDG_INX", False),
        (b"rdg_out_data ", False),
        (b"\x16\x03\x01", False),
    ],
)
def test_is_rdg_request_line(first: bytes, expected: bool | None) -> None:
    """RDG methods route to our handler, anything else to aiohttp, prefixes wait for more."""
    assert c.is_rdg_request_line(first) is expected


def test_response_head_bytes() -> None:
    """A 200 for the legacy IN channel is exactly the bytes FreeRDP expects, no body."""
    assert c.response_head(200, "OK", [("Content-Length", "0")]) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert c.response_head(404, "Not Found") == b"HTTP/1.1 404 Not Found\r\n\r\n"


@pytest.mark.parametrize(("name", "value"), [("X", "a\r\nInjected: 1"), ("X\r\n", "v"), ("", "v"), ("X", "caf\u00e9")])
def test_response_head_refuses_injection(name: str, value: str) -> None:
    """CR/LF or non-ASCII in a response header is refused."""
    with pytest.raises(RdgError):
        c.response_head(200, "OK", [(name, value)])


def test_websocket_accept_rfc_example() -> None:
    """RFC 6455 §1.3's sample key gives its sample accept value."""
    assert c.websocket_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_websocket_accept_freerdp_key() -> None:
    """FreeRDP's 15-character, non-base64 key is accepted and hashed as is."""
    key = "PARH_N\\XLEDGPBZ"
    expected = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    assert c.websocket_accept(key) == expected == "95VXiLUy49I4mvbBM0lXz52wt1w="


@pytest.mark.parametrize("key", ["", "a" * 65, "has space", "caf\u00e9", "tab\t"])
def test_websocket_accept_refuses_bad_keys(key: str) -> None:
    """Empty, over 64 characters, spaces, controls or non-ASCII: bad_websocket."""
    with pytest.raises(RdgError) as exc:
        c.websocket_accept(key)
    assert reason_of(exc) == "bad_websocket"


# ----------------------------------------------------------------------------------------------------
# WebSocket (vectors from RFC 6455 §5.7)

MASK = h("37 fa 21 3d")
MASKED_HELLO = h("81 85 37 fa 21 3d 7f 9f 4d 51 58")


def test_masked_text_frame_rfc_example() -> None:
    """RFC 6455's masked "Hello" decodes on the server side."""
    assert c.WsReader().feed(MASKED_HELLO) == [(c.WS_TEXT, b"Hello")]


def test_masked_binary_frame_by_hand() -> None:
    """A masked binary frame: each byte XOR the mask byte at its position mod 4."""
    frame = h("82 83 01 02 03 04 60 60 60")
    assert c.WsReader().feed(frame) == [(c.WS_BINARY, b"abc")]


def test_unmasked_client_frame_is_refused() -> None:
    """The server refuses a client frame without a mask."""
    with pytest.raises(RdgError) as exc:
        c.WsReader().feed(h("81 05 48 65 6c 6c 6f"))
    assert reason_of(exc) == "bad_websocket"


def test_client_reader_takes_unmasked_and_refuses_masked() -> None:
    """The test client's reader wants unmasked server frames."""
    assert c.WsClientReader().feed(h("81 05 48 65 6c 6c 6f")) == [(c.WS_TEXT, b"Hello")]
    with pytest.raises(RdgError):
        c.WsClientReader().feed(MASKED_HELLO)


def test_fragmented_message_with_ping_in_between() -> None:
    """RFC 6455's fragmented "Hello" is reassembled; a control frame may arrive between fragments."""
    frames = h("01 03 48 65 6c") + h("89 05 48 65 6c 6c 6f") + h("80 02 6c 6f")
    assert c.WsClientReader().feed(frames) == [(c.WS_PING, b"Hello"), (c.WS_TEXT, b"Hello")]


def test_16_and_64_bit_lengths() -> None:
    """256 bytes use the 16-bit length, 64 KiB the 64-bit one (RFC 6455 §5.7 headers)."""
    payload_256 = bytes(range(256))
    payload_64k = bytes(65536)
    reader = c.WsClientReader(max_frame=70_000)
    out = reader.feed(h("82 7e 01 00") + payload_256 + h("82 7f 00 00 00 00 00 01 00 00") + payload_64k)
    assert out == [(c.WS_BINARY, payload_256), (c.WS_BINARY, payload_64k)]


def test_masked_16_bit_frame() -> None:
    """A masked 200-byte frame: 126, 16-bit length, then the mask."""
    payload = bytes(range(200))
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    assert c.WsReader().feed(h("82 fe 00 c8") + MASK + masked) == [(c.WS_BINARY, payload)]


def test_masked_pong_rfc_example() -> None:
    """The RFC's masked Pong with "Hello" (what a client answers to a Ping)."""
    assert c.WsReader().feed(h("8a 85 37 fa 21 3d 7f 9f 4d 51 58")) == [(c.WS_PONG, b"Hello")]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (h("c2 80 00 00 00 00"), "bad_websocket"),  # RSV1
        (h("a2 80 00 00 00 00"), "bad_websocket"),  # RSV2
        (h("92 80 00 00 00 00"), "bad_websocket"),  # RSV3
        (h("83 80 00 00 00 00"), "bad_websocket"),  # reserved opcode 3
        (h("8b 80 00 00 00 00"), "bad_websocket"),  # reserved opcode 0xB
        (h("09 80 00 00 00 00"), "bad_websocket"),  # fragmented ping
        (h("89 fe 00 7e"), "bad_websocket"),  # 126-byte ping
        (h("88 81 00 00 00 00 01"), "bad_websocket"),  # 1-byte close payload
        (h("80 81 00 00 00 00 41"), "bad_websocket"),  # continuation without a message
        (h("02 81 00 00 00 00 41 82 81 00 00 00 00 41"), "bad_websocket"),  # new message inside a fragmented one
        (h("82 ff 80 00 00 00 00 00 00 00"), "bad_websocket"),  # 64-bit length, top bit set
        (h("82 ff 00 00 00 00 00 01 11 71"), "too_large"),  # 70001 > max_frame, refused on the header
        (h("81 82 00 00 00 00 c3 28"), "bad_websocket"),  # text that is not UTF-8
    ],
)
def test_bad_client_frames_are_refused(raw: bytes, reason: str) -> None:
    """RFC 6455 §5 rules the server enforces."""
    with pytest.raises(RdgError) as exc:
        c.WsReader().feed(raw)
    assert reason_of(exc) == reason


def test_reassembly_is_bounded() -> None:
    """Fragments adding up to more than max_frame are refused."""
    reader = c.WsReader(max_frame=200)
    first = h("02 fe 00 c8") + b"\x00" * 4 + b"a" * 200
    assert reader.feed(first) == []
    with pytest.raises(RdgError) as exc:
        reader.feed(h("80 81 00 00 00 00 61"))
    assert reason_of(exc) == "too_large"


def test_ws_frames_split_at_every_offset() -> None:
    """Masked frames cut anywhere decode the same."""
    raw = (
        h("82 83 01 02 03 04 60 60 60") + MASKED_HELLO + h("82 fe 00 c8") + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(range(200)))
    )
    expected = c.WsReader().feed(raw)
    assert len(expected) == 3
    for i in range(len(raw) + 1):
        reader = c.WsReader()
        assert reader.feed(raw[:i]) + reader.feed(raw[i:]) == expected, i


def test_ws_frame_encoders_by_hand() -> None:
    """Server frames are unmasked with the shortest length; client frames carry the mask."""
    assert c.ws_frame(c.WS_TEXT, b"Hello") == h("81 05 48 65 6c 6c 6f")
    assert c.ws_frame(c.WS_BINARY, bytes(256))[:4] == h("82 7e 01 00")
    assert c.ws_frame(c.WS_BINARY, bytes(65536))[:10] == h("82 7f 00 00 00 00 00 01 00 00")
    assert c.ws_client_frame(c.WS_TEXT, b"Hello", MASK) == MASKED_HELLO
    with pytest.raises(RdgError):
        c.ws_frame(c.WS_PING, bytes(126))


def test_unmask_of_large_payloads_matches_bytewise_xor() -> None:
    """The big-int unmasking agrees with the obvious byte loop across slice boundaries."""
    payload = bytes((i * 7 + 3) % 256 for i in range(40_003))
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    header = h("82 ff") + struct.pack("!Q", len(payload)) + MASK
    assert c.WsReader().feed(header + masked) == [(c.WS_BINARY, payload)]


def test_close_payload_helpers() -> None:
    """Close code and reason round trip; the reason is cut to fit a control frame."""
    assert c.parse_close_payload(c.ws_close_payload(4001, "terminated")) == (4001, "terminated")
    assert len(c.ws_close_payload(1000, "\u00e9" * 200)) <= 125
    assert c.parse_close_payload(b"") == (None, "")


# ----------------------------------------------------------------------------------------------------
# Chunked


CHUNKED = b"5\r\nhello\r\n" + b"3;name=value\r\nabc\r\n" + b"A\r\n0123456789\r\n" + b"0\r\n\r\n"


def test_chunked_decodes_and_ends() -> None:
    """Chunks come out one per bytes object; the 0-size chunk sets done."""
    reader = c.ChunkedReader()
    assert reader.feed(CHUNKED) == [b"hello", b"abc", b"0123456789"]
    assert reader.done


def test_chunked_split_at_every_offset() -> None:
    """Cut anywhere, the chunks are the same."""
    for i in range(len(CHUNKED) + 1):
        reader = c.ChunkedReader()
        assert reader.feed(CHUNKED[:i]) + reader.feed(CHUNKED[i:]) == [b"hello", b"abc", b"0123456789"], i
        assert reader.done


def test_chunked_carries_rdg_packets() -> None:
    """The IN channel as FreeRDP sends it: one packet per chunk, lower-case hex."""
    stream = b"e\r\n" + HANDSHAKE_REQUEST_PAA + b"\r\n" + b"1a\r\n" + TUNNEL_CREATE_TOK + b"\r\n"
    packets = c.PacketReader()
    out = [p for chunk in c.ChunkedReader().feed(stream) for p in packets.feed(chunk)]
    assert out == CLIENT_VALUES[:2]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"5\r\nhelloXX", "bad_chunked"),  # no CRLF after the data
        (b"g\r\n", "bad_chunked"),
        (b"\r\n", "bad_chunked"),  # empty size
        (b"-1\r\n", "bad_chunked"),
        (b"123456789\r\n", "too_large"),  # 9 hex digits
        (b"11171\r\n", "too_large"),  # 70001 > max_chunk
        (b"5" + b" " * 2000, "too_large"),  # size line never ends
        (b"5\nhello\r\n", "bad_chunked"),  # bare LF
        (b"5;\x01\r\nhello\r\n", "bad_chunked"),  # control byte in the extension
    ],
)
def test_bad_chunked_is_refused(raw: bytes, reason: str) -> None:
    """Framing errors and oversized chunks raise RdgError."""
    with pytest.raises(RdgError) as exc:
        c.ChunkedReader().feed(raw)
    assert reason_of(exc) == reason


# ----------------------------------------------------------------------------------------------------
# Properties

FUZZ = settings(max_examples=150, deadline=None)


def _feed_all(feed: Callable[[bytes], object], chunks: list[bytes]) -> None:
    with contextlib.suppress(RdgError):
        for chunk in chunks:
            feed(chunk)


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_readers_raise_only_rdg_error_on_arbitrary_bytes(chunks: list[bytes]) -> None:
    """Arbitrary bytes into every reader: values or RdgError, never anything else."""
    for reader in (c.PacketReader(), c.ServerPacketReader(), c.WsReader(), c.WsClientReader(), c.ChunkedReader()):
        _feed_all(reader.feed, chunks)
    for parse in (c.parse_head, c.parse_response_head):
        with contextlib.suppress(RdgError):
            parse(b"".join(chunks))
    c.is_rdg_request_line(b"".join(chunks))


_TYPES = st.sampled_from(sorted({*c._CLIENT_SIZES, *c._SERVER_SIZES}))


@FUZZ
@given(_TYPES, st.binary(max_size=120), st.integers(0, 2))
def test_well_framed_garbage_bodies_raise_only_rdg_error(ptype: int, body: bytes, reserved: int) -> None:
    """Correct headers with random bodies reach every body parser: still only RdgError."""
    raw = struct.pack("<HHI", ptype, reserved, 8 + len(body)) + body
    for reader in (c.PacketReader(), c.ServerPacketReader()):
        _feed_all(reader.feed, [raw])


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA]), st.booleans(), st.integers(0, 0x7F))
def test_ws_headers_with_random_payloads_raise_only_rdg_error(payload: bytes, op: int, fin: bool, len7: int) -> None:
    """Frames with plausible headers and random rest: values or RdgError."""
    raw = bytes([(0x80 if fin else 0) | op, 0x80 | len7]) + payload
    _feed_all(c.WsReader(max_frame=1000).feed, [raw])


_NAME = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=100)


@FUZZ
@given(cookie=_NAME, name=_NAME, resource=_NAME, port=st.integers(0, 0xFFFF), payload=st.binary(max_size=3000), split=st.integers(1, 50))
def test_client_packets_round_trip(cookie: str, name: str, resource: str, port: int, payload: bytes, split: int) -> None:
    """encode -> decode is the identity for what the test client sends, however the stream is cut."""
    raw = c.handshake_request() + c.tunnel_create(cookie) + c.tunnel_auth(name) + c.channel_create(resource, port)
    raw += c.data_packet(payload) + c.keepalive() + c.close_channel_response(7)
    reader = c.PacketReader()
    out = [p for i in range(0, len(raw), split) for p in reader.feed(raw[i : i + split])]
    assert out == [
        c.HandshakeRequest(1, 0, 0, 2),
        c.TunnelCreate(caps=0x0D, fields=1, paa_cookie=cookie),
        c.TunnelAuth(name),
        c.ChannelCreate(resources=(resource,), alt_resources=(), port=port, protocol=3),
        c.Data(payload),
        c.Keepalive(),
        c.CloseChannelResponse(7),
    ]


@FUZZ
@given(
    status=st.integers(0, 0xFFFFFFFF),
    text=st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=300),
    payload=st.binary(max_size=140_000),
)
def test_server_packets_round_trip(status: int, text: str, payload: bytes) -> None:
    """encode -> decode is the identity for what the gateway sends (printable text, any payload)."""
    raw = c.handshake_response(status) + c.tunnel_response(status, 3, 5) + c.tunnel_auth_response(status, 9)
    raw += c.channel_response(status, 4) + c.service_message(text) + b"".join(c.data(payload)) + c.close_channel(status)
    out = c.ServerPacketReader().feed(raw)
    assert out[:5] == [
        c.HandshakeResponse(status, 1, 0, 0, 2),
        c.TunnelResponse(0, status, 3, 3, 5, None),
        c.TunnelAuthResponse(status, 3, c.HTTP_TUNNEL_REDIR_ENABLE_ALL, 9),
        c.ChannelResponse(status, 1, 4),
        c.ServiceMessage(text),
    ]
    data = out[5:-1]
    assert all(isinstance(d, c.Data) for d in data)
    assert b"".join(d.payload for d in data if isinstance(d, c.Data)) == payload
    assert out[-1] == c.CloseChannel(status)


@FUZZ
@given(
    st.lists(st.tuples(st.sampled_from([c.WS_BINARY, c.WS_TEXT, c.WS_PING]), st.binary(max_size=2000)), max_size=5),
    st.binary(min_size=4, max_size=4),
)
def test_ws_round_trip(frames: list[tuple[int, bytes]], mask: bytes) -> None:
    """Client frames through WsReader and server frames through WsClientReader come back unchanged."""
    frames = [(op, p[:125] if op == c.WS_PING else p.decode("latin-1").encode("utf-8") if op == c.WS_TEXT else p) for op, p in frames]
    assert c.WsReader().feed(b"".join(c.ws_client_frame(op, p, mask) for op, p in frames)) == frames
    assert c.WsClientReader().feed(b"".join(c.ws_frame(op, p) for op, p in frames)) == frames


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=500), max_size=8), st.integers(1, 40))
def test_chunked_round_trip(chunks: list[bytes], split: int) -> None:
    """Chunks written the way FreeRDP writes them decode to the same pieces, however the stream is cut."""
    raw = b"".join(b"%x\r\n%s\r\n" % (len(ch), ch) for ch in chunks) + b"0\r\n\r\n"
    reader = c.ChunkedReader()
    out = [piece for i in range(0, len(raw), split) for piece in reader.feed(raw[i : i + split])]
    assert out == chunks and reader.done


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=40_000), mask=st.binary(min_size=4, max_size=4))
def test_the_fast_unmask_equals_the_python_one(payload: bytes, mask: bytes) -> None:
    """aiohttp's compiled mask (used when present) and the pure-Python fallback agree on every input."""
    assert c._unmask(payload, mask) == c._unmask_python(payload, mask)
