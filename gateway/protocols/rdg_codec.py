"""Sans-IO codec for the RD Gateway protocol (MS-TSGU, HTTP transport) as FreeRDP 2.11 speaks it.

No sockets, no asyncio, no clock: bytes in, values or bytes out. Four layers, each a small incremental
reader plus encoders:

- RDG packets (`PacketReader` for what a client sends, `ServerPacketReader` for what a gateway sends,
  encoders for both directions; see shared/recipes/rd-gateway.md §3.2 for the tables);
- the HTTP request head of `RDG_OUT_DATA` / `RDG_IN_DATA` (`parse_head`, `is_rdg_request_line`, ...), which
  aiohttp's parser refuses, and the 101/200 answers;
- WebSocket framing (`WsReader` for masked client frames, `ws_frame` for unmasked server frames, and the
  client side for the test client);
- chunked transfer coding of the legacy HTTP transport's IN channel (`ChunkedReader`).

Contract for every reader: input is bounded (a reader never buffers more than its configured maximum plus
one header), and bad input raises `RdgError` and nothing else. After an error a reader is poisoned: every
later `feed` raises the same error, so the glue cannot resynchronise on garbage by accident.

Limits (all bytes unless said otherwise):

- `MAX_COOKIE_BYTES` = 16 KiB of UTF-16 for the PAA cookie. FreeRDP accepts tokens up to about 32 K UTF-16
  characters, but our own tokens are a few hundred characters; 16 KiB keeps the pre-auth phase cheap.
- `PRE_AUTH_MAX_PACKET` = the largest legal TUNNEL_CREATE with that cookie (16 + 2 + 16 KiB). The glue calls
  `set_max_packet(PRE_AUTH_MAX_PACKET)` until the tunnel is authorised, then `DATA_MAX_PACKET`.
- `DATA_MAX_PACKET` = 8 + 2 + 65535: the largest DATA packet a u16 `cbDataLen` allows.
- `MAX_NAME_BYTES` = 1 KiB for the client name and each resource name (a DNS name is at most 253 chars).
- `MAX_SERVICE_MESSAGE_CHARS` = 400: service messages are truncated to this many characters.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from gateway.errors import GatewayError

# ---------------------------------------------------------------------------------------------------------
# Errors

RdgReason = Literal["bad_packet", "too_large", "bad_http", "bad_websocket", "bad_chunked"]


class RdgError(GatewayError, ValueError):
    """Bad input at one of the RDG layers. `reason` is one of the `RdgReason` slugs."""

    reason = "bad_packet"

    def __init__(self, reason: RdgReason, message: str) -> None:
        super().__init__(message, reason=reason)


# ---------------------------------------------------------------------------------------------------------
# Constants

HANDSHAKE_REQUEST: Final = 0x01
HANDSHAKE_RESPONSE: Final = 0x02
TUNNEL_CREATE: Final = 0x04
TUNNEL_RESPONSE: Final = 0x05
TUNNEL_AUTH: Final = 0x06
TUNNEL_AUTH_RESPONSE: Final = 0x07
CHANNEL_CREATE: Final = 0x08
CHANNEL_RESPONSE: Final = 0x09
DATA: Final = 0x0A
SERVICE_MESSAGE: Final = 0x0B
REAUTH_MESSAGE: Final = 0x0C
KEEPALIVE: Final = 0x0D
CLOSE_CHANNEL: Final = 0x10
CLOSE_CHANNEL_RESPONSE: Final = 0x11

ERROR_SUCCESS: Final = 0x00000000
# HRESULT forms, so FreeRDP prints the name (recipe §3.2). MS-TSGU 2.2.6 lists E_PROXY_NOTSUPPORTED only as
# HRESULT_CODE(...) = 0x59E8, which FreeRDP's FAILED() does not treat as a failure: see `failed()`.
E_PROXY_INTERNALERROR: Final = 0x800759D8
E_PROXY_RAP_ACCESSDENIED: Final = 0x800759DA
E_PROXY_SESSIONTIMEOUT: Final = 0x800759F6
E_PROXY_COOKIE_AUTHENTICATION_ACCESS_DENIED: Final = 0x800759F8
E_PROXY_NOTSUPPORTED: Final = 0x000059E8

HTTP_EXTENDED_AUTH_NONE: Final = 0x0
HTTP_EXTENDED_AUTH_SC: Final = 0x1
HTTP_EXTENDED_AUTH_PAA: Final = 0x2

# TUNNEL_CREATE capsFlags and TUNNEL_RESPONSE caps.
HTTP_CAPABILITY_TYPE_QUAR_SOH: Final = 0x01
HTTP_CAPABILITY_IDLE_TIMEOUT: Final = 0x02
HTTP_CAPABILITY_MESSAGING_CONSENT_SIGN: Final = 0x04
HTTP_CAPABILITY_MESSAGING_SERVICE_MSG: Final = 0x08
HTTP_CAPABILITY_REAUTH: Final = 0x10
FREERDP_CLIENT_CAPS: Final = 0x0D  # QUAR_SOH | CONSENT_SIGN | SERVICE_MSG, what FreeRDP 2.11 sends
SERVER_CAPS: Final = HTTP_CAPABILITY_IDLE_TIMEOUT | HTTP_CAPABILITY_MESSAGING_SERVICE_MSG  # 0x0A

HTTP_TUNNEL_PACKET_FIELD_PAA_COOKIE: Final = 0x1
HTTP_TUNNEL_RESPONSE_FIELD_TUNNEL_ID: Final = 0x1
HTTP_TUNNEL_RESPONSE_FIELD_CAPS: Final = 0x2
HTTP_TUNNEL_RESPONSE_FIELD_SOH_REQ: Final = 0x4
HTTP_TUNNEL_RESPONSE_FIELD_CONSENT_MSG: Final = 0x10
HTTP_TUNNEL_AUTH_RESPONSE_FIELD_REDIR_FLAGS: Final = 0x1
HTTP_TUNNEL_AUTH_RESPONSE_FIELD_IDLE_TIMEOUT: Final = 0x2
HTTP_TUNNEL_AUTH_RESPONSE_FIELD_SOH_RESPONSE: Final = 0x4
HTTP_CHANNEL_RESPONSE_FIELD_CHANNELID: Final = 0x1
HTTP_TUNNEL_REDIR_ENABLE_ALL: Final = 0x80000000
HTTP_TUNNEL_REDIR_DISABLE_ALL: Final = 0x40000000
RDP_PROTOCOL: Final = 3  # CHANNEL_CREATE protocol: always 3 from FreeRDP

HEADER_LEN: Final = 8
MAX_DATA: Final = 65525  # server -> client DATA payload cap, as in the recipe's prototype
MAX_COOKIE_BYTES: Final = 16 * 1024
MAX_NAME_BYTES: Final = 1024
MAX_SERVICE_MESSAGE_CHARS: Final = 400
PRE_AUTH_MAX_PACKET: Final = 16 + 2 + MAX_COOKIE_BYTES
DATA_MAX_PACKET: Final = HEADER_LEN + 2 + 0xFFFF
_ABSOLUTE_MAX_PACKET: Final = 1 << 20  # set_max_packet refuses more: packetLength is u32, memory is not

_HDR = struct.Struct("<HHI")


def failed(status: int) -> bool:
    """True when FreeRDP treats `status` as a failure: `FAILED(HRESULT)`, i.e. the severity bit is set."""
    return bool(status & 0x80000000)


# ---------------------------------------------------------------------------------------------------------
# Packet values (client -> server)


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    major: int
    minor: int
    client_version: int
    ext_auth: int


@dataclass(frozen=True, slots=True)
class TunnelCreate:
    caps: int
    fields: int
    paa_cookie: str | None


@dataclass(frozen=True, slots=True)
class TunnelAuth:
    client_name: str


@dataclass(frozen=True, slots=True)
class ChannelCreate:
    resources: tuple[str, ...]
    alt_resources: tuple[str, ...]
    port: int
    protocol: int


@dataclass(frozen=True, slots=True)
class Data:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Keepalive:
    pass


@dataclass(frozen=True, slots=True)
class CloseChannelResponse:
    status: int


@dataclass(frozen=True, slots=True)
class CloseChannel:
    status: int


Packet = HandshakeRequest | TunnelCreate | TunnelAuth | ChannelCreate | Data | Keepalive | CloseChannelResponse | CloseChannel


# Packet values (server -> client), for the test client.


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    error: int
    major: int
    minor: int
    server_version: int
    ext_auth: int


@dataclass(frozen=True, slots=True)
class TunnelResponse:
    server_version: int
    status: int
    fields: int
    tunnel_id: int | None
    caps: int | None
    consent: str | None


@dataclass(frozen=True, slots=True)
class TunnelAuthResponse:
    status: int
    fields: int
    redir_flags: int | None
    idle_minutes: int | None


@dataclass(frozen=True, slots=True)
class ChannelResponse:
    status: int
    fields: int
    channel_id: int | None


@dataclass(frozen=True, slots=True)
class ServiceMessage:
    text: str


@dataclass(frozen=True, slots=True)
class ReauthMessage:
    context: int


ServerPacket = (
    HandshakeResponse
    | TunnelResponse
    | TunnelAuthResponse
    | ChannelResponse
    | ServiceMessage
    | ReauthMessage
    | CloseChannel
    | CloseChannelResponse
    | Data
    | Keepalive
)


# ---------------------------------------------------------------------------------------------------------
# Packet body parsing


class _Body:
    """A cursor over one packet body. Every read is bounds-checked and raises RdgError("bad_packet")."""

    __slots__ = ("_buf", "_end", "_pos", "_what")

    def __init__(self, buf: memoryview, what: str) -> None:
        self._buf = buf
        self._pos = 0
        self._end = len(buf)
        self._what = what

    def _take(self, n: int) -> memoryview:
        if self._end - self._pos < n:
            raise RdgError("bad_packet", f"{self._what}: truncated")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        v: int = struct.unpack_from("<H", self._take(2))[0]
        return v

    def u32(self) -> int:
        v: int = struct.unpack_from("<I", self._take(4))[0]
        return v

    def u64(self) -> int:
        v: int = struct.unpack_from("<Q", self._take(8))[0]
        return v

    def raw(self, n: int) -> bytes:
        return bytes(self._take(n))

    def string(self, limit: int, field: str) -> str:
        """A u16 byte count + UTF-16LE string; one trailing NUL is stripped (FreeRDP sends it)."""
        n = self.u16()
        if n > limit:
            raise RdgError("too_large", f"{self._what}: {field} is {n} bytes, limit {limit}")
        return _utf16(self._take(n), f"{self._what}: {field}")

    def end(self) -> None:
        if self._pos != self._end:
            raise RdgError("bad_packet", f"{self._what}: {self._end - self._pos} trailing bytes")


def _utf16(raw: memoryview | bytes, what: str) -> str:
    if len(raw) % 2:
        raise RdgError("bad_packet", f"{what}: odd UTF-16 byte count")
    try:
        text = bytes(raw).decode("utf-16-le")  # strict: lone surrogates raise
    except UnicodeDecodeError:
        raise RdgError("bad_packet", f"{what}: invalid UTF-16") from None
    if text.endswith("\x00"):
        text = text[:-1]
    if "\x00" in text:  # an embedded NUL would cut the name short in C clients and logs
        raise RdgError("bad_packet", f"{what}: embedded NUL")
    return text


def _client_packet(ptype: int, body: memoryview) -> Packet:
    b = _Body(body, _NAMES.get(ptype, hex(ptype)))
    out: Packet
    if ptype == DATA:
        n = b.u16()
        if n != len(body) - 2:
            raise RdgError("bad_packet", f"DATA: cbDataLen {n} does not match the packet ({len(body) - 2})")
        return Data(bytes(body[2:]))
    if ptype == HANDSHAKE_REQUEST:
        out = HandshakeRequest(major=b.u8(), minor=b.u8(), client_version=b.u16(), ext_auth=b.u16())
    elif ptype == TUNNEL_CREATE:
        caps, fields = b.u32(), b.u16()
        b.u16()  # reserved
        cookie = b.string(MAX_COOKIE_BYTES, "PAA cookie") if fields & HTTP_TUNNEL_PACKET_FIELD_PAA_COOKIE else None
        out = TunnelCreate(caps=caps, fields=fields, paa_cookie=cookie)
    elif ptype == TUNNEL_AUTH:
        b.u16()  # fieldsPresent: 0 from FreeRDP; a statement of health (0x1) would show up as trailing bytes
        out = TunnelAuth(client_name=b.string(MAX_NAME_BYTES, "client name"))
    elif ptype == CHANNEL_CREATE:
        nres, nalt, port, proto = b.u8(), b.u8(), b.u16(), b.u16()
        if nres == 0:
            raise RdgError("bad_packet", "CHANNEL_CREATE: no resource")
        res = tuple(b.string(MAX_NAME_BYTES, "resource") for _ in range(nres))
        alt = tuple(b.string(MAX_NAME_BYTES, "alt resource") for _ in range(nalt))
        out = ChannelCreate(resources=res, alt_resources=alt, port=port, protocol=proto)
    elif ptype == KEEPALIVE:
        out = Keepalive()
    elif ptype == CLOSE_CHANNEL_RESPONSE:
        out = CloseChannelResponse(status=b.u32())
    else:
        assert ptype == CLOSE_CHANNEL
        out = CloseChannel(status=b.u32())
    b.end()
    return out


def _server_packet(ptype: int, body: memoryview) -> ServerPacket:
    b = _Body(body, _NAMES.get(ptype, hex(ptype)))
    out: ServerPacket
    if ptype == DATA:
        n = b.u16()
        if n != len(body) - 2:
            raise RdgError("bad_packet", f"DATA: cbDataLen {n} does not match the packet ({len(body) - 2})")
        return Data(bytes(body[2:]))
    if ptype == HANDSHAKE_RESPONSE:
        out = HandshakeResponse(error=b.u32(), major=b.u8(), minor=b.u8(), server_version=b.u16(), ext_auth=b.u16())
    elif ptype == TUNNEL_RESPONSE:
        version, status, fields = b.u16(), b.u32(), b.u16()
        b.u16()  # reserved
        tunnel_id = b.u32() if fields & HTTP_TUNNEL_RESPONSE_FIELD_TUNNEL_ID else None
        caps = b.u32() if fields & HTTP_TUNNEL_RESPONSE_FIELD_CAPS else None
        if fields & HTTP_TUNNEL_RESPONSE_FIELD_SOH_REQ:
            b.raw(20)  # nonce
            b.string(0xFFFF, "server certificate")
        consent = b.string(0xFFFF, "consent message") if fields & HTTP_TUNNEL_RESPONSE_FIELD_CONSENT_MSG else None
        out = TunnelResponse(server_version=version, status=status, fields=fields, tunnel_id=tunnel_id, caps=caps, consent=consent)
    elif ptype == TUNNEL_AUTH_RESPONSE:
        status, fields = b.u32(), b.u16()
        b.u16()  # reserved
        redir = b.u32() if fields & HTTP_TUNNEL_AUTH_RESPONSE_FIELD_REDIR_FLAGS else None
        idle = b.u32() if fields & HTTP_TUNNEL_AUTH_RESPONSE_FIELD_IDLE_TIMEOUT else None
        if fields & HTTP_TUNNEL_AUTH_RESPONSE_FIELD_SOH_RESPONSE:
            b.raw(b.u16())
        out = TunnelAuthResponse(status=status, fields=fields, redir_flags=redir, idle_minutes=idle)
    elif ptype == CHANNEL_RESPONSE:
        status, fields = b.u32(), b.u16()
        b.u16()  # reserved
        chan = b.u32() if fields & HTTP_CHANNEL_RESPONSE_FIELD_CHANNELID else None
        out = ChannelResponse(status=status, fields=fields, channel_id=chan)
    elif ptype == SERVICE_MESSAGE:
        out = ServiceMessage(text=b.string(0xFFFF, "message"))
    elif ptype == REAUTH_MESSAGE:
        out = ReauthMessage(context=b.u64())
    elif ptype == KEEPALIVE:
        out = Keepalive()
    elif ptype == CLOSE_CHANNEL:
        out = CloseChannel(status=b.u32())
    else:
        assert ptype == CLOSE_CHANNEL_RESPONSE
        out = CloseChannelResponse(status=b.u32())
    b.end()
    return out


_NAMES: Final = {
    HANDSHAKE_REQUEST: "HANDSHAKE_REQUEST",
    HANDSHAKE_RESPONSE: "HANDSHAKE_RESPONSE",
    TUNNEL_CREATE: "TUNNEL_CREATE",
    TUNNEL_RESPONSE: "TUNNEL_RESPONSE",
    TUNNEL_AUTH: "TUNNEL_AUTH",
    TUNNEL_AUTH_RESPONSE: "TUNNEL_AUTH_RESPONSE",
    CHANNEL_CREATE: "CHANNEL_CREATE",
    CHANNEL_RESPONSE: "CHANNEL_RESPONSE",
    DATA: "DATA",
    SERVICE_MESSAGE: "SERVICE_MESSAGE",
    REAUTH_MESSAGE: "REAUTH_MESSAGE",
    KEEPALIVE: "KEEPALIVE",
    CLOSE_CHANNEL: "CLOSE_CHANNEL",
    CLOSE_CHANNEL_RESPONSE: "CLOSE_CHANNEL_RESPONSE",
}

# type -> (min length, max length or None) of the whole packet, checked on the header before buffering.
_CLIENT_SIZES: Final[dict[int, tuple[int, int | None]]] = {
    HANDSHAKE_REQUEST: (14, 14),
    TUNNEL_CREATE: (16, None),
    TUNNEL_AUTH: (12, None),
    CHANNEL_CREATE: (14, None),
    DATA: (10, None),
    KEEPALIVE: (8, 8),
    CLOSE_CHANNEL_RESPONSE: (12, 12),
    CLOSE_CHANNEL: (12, 12),
}
_SERVER_SIZES: Final[dict[int, tuple[int, int | None]]] = {
    HANDSHAKE_RESPONSE: (18, 18),
    TUNNEL_RESPONSE: (18, None),
    TUNNEL_AUTH_RESPONSE: (16, None),
    CHANNEL_RESPONSE: (16, None),
    DATA: (10, None),
    SERVICE_MESSAGE: (10, None),
    REAUTH_MESSAGE: (16, 16),
    KEEPALIVE: (8, 8),
    CLOSE_CHANNEL: (12, 12),
    CLOSE_CHANNEL_RESPONSE: (12, 12),
}


class _Reader:
    """The incremental packet framer shared by both directions.

    A partial packet is appended to a bytearray and not looked at again until it is complete (the header is
    validated as soon as its 8 bytes are in), so a client that dribbles bytes costs no more than one that
    sends whole packets.
    """

    def __init__(self, max_packet: int, sizes: Mapping[int, tuple[int, int | None]]) -> None:
        self._buf = bytearray()
        self._need = HEADER_LEN  # bytes `_buf` must hold before it is worth parsing again
        self._max = 0
        self._sizes = sizes
        self._error: RdgError | None = None
        self.set_max_packet(max_packet)

    @property
    def max_packet(self) -> int:
        return self._max

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete packet (always below `max_packet` between calls)."""
        return len(self._buf)

    def set_max_packet(self, n: int) -> None:
        """Change the packetLength limit for packets whose header has not arrived yet."""
        if not HEADER_LEN <= n <= _ABSOLUTE_MAX_PACKET:
            raise ValueError(f"max_packet must be in [{HEADER_LEN}, {_ABSOLUTE_MAX_PACKET}], not {n}")
        self._max = n

    def _header(self, view: memoryview, pos: int) -> tuple[int, int]:
        ptype, _reserved, length = _HDR.unpack_from(view, pos)  # reserved: ignored, FreeRDP sends 0
        sizes = self._sizes.get(ptype)
        if sizes is None:
            raise RdgError("bad_packet", f"unknown packet type {ptype:#x}")
        if length < HEADER_LEN:
            raise RdgError("bad_packet", f"packetLength {length} < {HEADER_LEN}")
        if length > self._max:
            raise RdgError("too_large", f"{_NAMES[ptype]}: packetLength {length} > {self._max}")
        lo, hi = sizes
        if length < lo or (hi is not None and length > hi):
            raise RdgError("bad_packet", f"{_NAMES[ptype]}: packetLength {length} is not a legal size")
        return ptype, length

    def _frames(self, data: bytes) -> list[tuple[int, memoryview]]:
        """Whole packets as (type, body view over an immutable copy); keeps the partial rest."""
        if self._error is not None:
            raise self._error
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return []
            raw = bytes(self._buf)
        else:
            raw = bytes(data)
        view = memoryview(raw)
        out: list[tuple[int, memoryview]] = []
        pos, n = 0, len(raw)
        need = HEADER_LEN
        try:
            while n - pos >= HEADER_LEN:
                ptype, length = self._header(view, pos)
                if n - pos < length:
                    need = length
                    break
                out.append((ptype, view[pos + HEADER_LEN : pos + length]))
                pos += length
        except RdgError as exc:
            self._error = exc
            raise
        self._need = need
        self._buf = bytearray(view[pos:]) if pos < n else bytearray()
        return out

    def _poison(self, exc: RdgError) -> RdgError:
        self._error = exc
        self._buf = bytearray()
        return exc


class PacketReader(_Reader):
    """Decodes client -> server packets from a byte stream split anywhere.

    Rejects (RdgError): packetLength < 8 or > `max_packet`, unknown or server-only types, a size that is
    illegal for the type, trailing bytes inside a packet, a DATA `cbDataLen` that does not match, strings
    with an odd byte count, invalid UTF-16 or an embedded NUL, strings over their limits.
    """

    def __init__(self, max_packet: int = 70_000) -> None:
        super().__init__(max_packet, _CLIENT_SIZES)

    def feed(self, data: bytes) -> list[Packet]:
        try:
            return [_client_packet(t, body) for t, body in self._frames(data)]
        except RdgError as exc:
            raise self._poison(exc) from None


class ServerPacketReader(_Reader):
    """Decodes server -> client packets (the test client's side); same rules as `PacketReader`."""

    def __init__(self, max_packet: int = 70_000) -> None:
        super().__init__(max_packet, _SERVER_SIZES)

    def feed(self, data: bytes) -> list[ServerPacket]:
        try:
            return [_server_packet(t, body) for t, body in self._frames(data)]
        except RdgError as exc:
            raise self._poison(exc) from None


# ---------------------------------------------------------------------------------------------------------
# Packet encoders


def _packet(ptype: int, body: bytes) -> bytes:
    return _HDR.pack(ptype, 0, HEADER_LEN + len(body)) + body


def _string(text: str, limit: int, field: str) -> bytes:
    """u16 byte count + UTF-16LE with the terminating NUL, as FreeRDP writes strings."""
    try:
        raw = (text + "\x00").encode("utf-16-le")
    except UnicodeEncodeError:
        raise RdgError("bad_packet", f"{field}: not encodable as UTF-16") from None
    if len(raw) > limit:
        raise RdgError("too_large", f"{field}: {len(raw)} bytes, limit {limit}")
    return struct.pack("<H", len(raw)) + raw


def handshake_response(error: int = ERROR_SUCCESS, ext_auth: int = HTTP_EXTENDED_AUTH_PAA) -> bytes:
    """HANDSHAKE_RESPONSE, 18 bytes: version 1.0, server version 0."""
    return _packet(HANDSHAKE_RESPONSE, struct.pack("<IBBHH", error, 1, 0, 0, ext_auth))


def tunnel_response(status: int, tunnel_id: int = 10, caps: int = SERVER_CAPS) -> bytes:
    """TUNNEL_RESPONSE with fields 3 (tunnelId + caps), 26 bytes. No consent message (recipe finding 11)."""
    fields = HTTP_TUNNEL_RESPONSE_FIELD_TUNNEL_ID | HTTP_TUNNEL_RESPONSE_FIELD_CAPS
    return _packet(TUNNEL_RESPONSE, struct.pack("<HIHHII", 0, status, fields, 0, tunnel_id, caps))


def tunnel_auth_response(status: int, idle_minutes: int = 0, redir_flags: int = HTTP_TUNNEL_REDIR_ENABLE_ALL) -> bytes:
    """TUNNEL_AUTH_RESPONSE with redirFlags and idleTimeout (minutes), 24 bytes. FreeRDP 2.11 ignores both."""
    fields = HTTP_TUNNEL_AUTH_RESPONSE_FIELD_REDIR_FLAGS | HTTP_TUNNEL_AUTH_RESPONSE_FIELD_IDLE_TIMEOUT
    return _packet(TUNNEL_AUTH_RESPONSE, struct.pack("<IHHII", status, fields, 0, redir_flags, idle_minutes))


def channel_response(status: int, channel_id: int = 1) -> bytes:
    """CHANNEL_RESPONSE with the channelId field (mstsc needs it, per rdpgw), 20 bytes."""
    return _packet(CHANNEL_RESPONSE, struct.pack("<IHHI", status, HTTP_CHANNEL_RESPONSE_FIELD_CHANNELID, 0, channel_id))


def data(payload: bytes) -> list[bytes]:
    """DATA packets for `payload`, each carrying at most MAX_DATA bytes; [] for an empty payload."""
    mv = memoryview(payload)
    return [
        _HDR.pack(DATA, 0, HEADER_LEN + 2 + len(part)) + struct.pack("<H", len(part)) + part
        for part in (bytes(mv[i : i + MAX_DATA]) for i in range(0, len(payload), MAX_DATA))
    ]


def _printable(text: str) -> str:
    # C0/C1 controls (ESC sequences) would reach the user's terminal through xfreerdp's printf; lone
    # surrogates cannot be encoded. Newlines and tabs stay: a notice may have two lines.
    return "".join(
        "?" if "\ud800" <= ch <= "\udfff" else ch
        for ch in text
        if ch in "\n\t" or not (ch < " " or "\x7f" <= ch <= "\x9f" or ch in "\u2028\u2029\u202a\u202b\u202c\u202d\u202e")
    )


def service_message(text: str) -> bytes:
    """SERVICE_MESSAGE with `text` cleaned of control characters and cut to MAX_SERVICE_MESSAGE_CHARS."""
    clean = _printable(text)
    if len(clean) > MAX_SERVICE_MESSAGE_CHARS:
        clean = clean[: MAX_SERVICE_MESSAGE_CHARS - 3] + "..."
    return _packet(SERVICE_MESSAGE, _string(clean, 0xFFFF, "service message"))


def close_channel(status: int) -> bytes:
    """CLOSE_CHANNEL, 12 bytes. Use an HRESULT (e.g. E_PROXY_SESSIONTIMEOUT) so FreeRDP prints a name."""
    return _packet(CLOSE_CHANNEL, struct.pack("<I", status))


def keepalive() -> bytes:
    return _packet(KEEPALIVE, b"")


def reauth_message(context: int) -> bytes:
    return _packet(REAUTH_MESSAGE, struct.pack("<Q", context))


# Client -> server encoders, as FreeRDP 2.11 writes them (for the test client).


def handshake_request(ext_auth: int = HTTP_EXTENDED_AUTH_PAA) -> bytes:
    """HANDSHAKE_REQUEST, 14 bytes: version 1.0, client version 0."""
    return _packet(HANDSHAKE_REQUEST, struct.pack("<BBHH", 1, 0, 0, ext_auth))


def tunnel_create(cookie: str | None, caps: int = FREERDP_CLIENT_CAPS) -> bytes:
    """TUNNEL_CREATE; with a PAA cookie when `cookie` is not None. The cookie may be at most 0xFFFF bytes."""
    if cookie is None:
        return _packet(TUNNEL_CREATE, struct.pack("<IHH", caps, 0, 0))
    body = struct.pack("<IHH", caps, HTTP_TUNNEL_PACKET_FIELD_PAA_COOKIE, 0) + _string(cookie, 0xFFFF, "PAA cookie")
    return _packet(TUNNEL_CREATE, body)


def tunnel_auth(name: str) -> bytes:
    return _packet(TUNNEL_AUTH, struct.pack("<H", 0) + _string(name, 0xFFFF, "client name"))


def channel_create(resource: str, port: int) -> bytes:
    return _packet(CHANNEL_CREATE, struct.pack("<BBHH", 1, 0, port, RDP_PROTOCOL) + _string(resource, 0xFFFF, "resource"))


def data_packet(payload: bytes) -> bytes:
    """One DATA packet; `payload` must fit cbDataLen (at most 65535 bytes)."""
    if len(payload) > 0xFFFF:
        raise RdgError("too_large", f"DATA payload {len(payload)} > 65535")
    return _HDR.pack(DATA, 0, HEADER_LEN + 2 + len(payload)) + struct.pack("<H", len(payload)) + payload


def close_channel_response(status: int = ERROR_SUCCESS) -> bytes:
    return _packet(CLOSE_CHANNEL_RESPONSE, struct.pack("<I", status))


# ---------------------------------------------------------------------------------------------------------
# HTTP heads

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VALUE = re.compile(rb"[\x20-\x7e\t]*")
_REASON = re.compile(rb"[\x20-\x7e\t]*")
_STATUS = re.compile(rb"[0-9]{3}")
_RDG_METHODS: Final = (b"RDG_OUT_DATA ", b"RDG_IN_DATA ")


@dataclass(frozen=True)
class RequestHead:
    """A parsed request head. Header names are lower-case; values have surrounding whitespace removed."""

    method: str
    target: str
    version: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class ResponseHead:
    version: str
    status: int
    reason: str
    headers: Mapping[str, str]


def head_complete(buf: bytes) -> int | None:
    """The index just after the first `\\r\\n\\r\\n` in `buf`, or None when the head is not complete yet."""
    i = buf.find(b"\r\n\r\n")
    return None if i < 0 else i + 4


def _head_lines(raw: bytes, max_bytes: int, max_headers: int) -> tuple[bytes, Mapping[str, str]]:
    end = head_complete(raw[: max_bytes + 4])
    if end is None or end > max_bytes:
        if len(raw) > max_bytes or (end is not None and end > max_bytes):
            raise RdgError("too_large", f"request head over {max_bytes} bytes")
        raise RdgError("bad_http", "incomplete head (no CRLFCRLF)")
    lines = raw[: end - 4].split(b"\r\n")
    if len(lines) - 1 > max_headers:
        raise RdgError("too_large", f"more than {max_headers} headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:  # also refuses obs-fold (a line starting with SP)
            raise RdgError("bad_http", "malformed header line")
        value = value.strip(b" \t")
        if _VALUE.fullmatch(value) is None:
            raise RdgError("bad_http", "header value with control or non-ASCII bytes")
        key = name.decode("ascii").lower()
        if key in headers:
            raise RdgError("bad_http", f"duplicate header {key!r}")
        headers[key] = value.decode("ascii")
    return lines[0], MappingProxyType(headers)


def parse_head(raw: bytes, *, max_bytes: int = 8192, max_headers: int = 64) -> RequestHead:
    """Parse a request head. `raw` must hold the whole head; bytes after `\\r\\n\\r\\n` are ignored.

    Raises RdgError: "too_large" for a head over `max_bytes` (terminator included) or more than
    `max_headers` headers; "bad_http" for no terminator, a malformed request line or header, bare CR/LF,
    non-ASCII or control bytes, obsolete line folding, or a duplicate header name.
    """
    first, headers = _head_lines(raw, max_bytes, max_headers)
    parts = first.split(b" ")
    if len(parts) != 3 or _TOKEN.fullmatch(parts[0]) is None or _TARGET.fullmatch(parts[1]) is None:
        raise RdgError("bad_http", "malformed request line")
    if _VERSION.fullmatch(parts[2]) is None:
        raise RdgError("bad_http", "malformed HTTP version")
    method, target, version = (p.decode("ascii") for p in parts)
    return RequestHead(method=method, target=target, version=version, headers=headers)


def parse_response_head(raw: bytes, *, max_bytes: int = 8192, max_headers: int = 64) -> ResponseHead:
    """Parse a response head (for the test client); the same rules as `parse_head`."""
    first, headers = _head_lines(raw, max_bytes, max_headers)
    version, _, rest = first.partition(b" ")
    status, _, reason = rest.partition(b" ")
    if _VERSION.fullmatch(version) is None or _STATUS.fullmatch(status) is None or _REASON.fullmatch(reason) is None:
        raise RdgError("bad_http", "malformed status line")
    return ResponseHead(version=version.decode("ascii"), status=int(status), reason=reason.decode("ascii"), headers=headers)


def is_rdg_request_line(first_bytes: bytes) -> bool | None:
    """Routing after TLS: True for an `RDG_OUT_DATA `/`RDG_IN_DATA ` request, False when the bytes cannot
    start one, None when more bytes are needed to tell."""
    for prefix in _RDG_METHODS:
        if first_bytes.startswith(prefix):
            return True
    if any(prefix.startswith(first_bytes) for prefix in _RDG_METHODS):
        return None
    return False


def response_head(status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """`HTTP/1.1 status reason` plus `headers`, ending in CRLFCRLF. Raises RdgError on CR/LF injection."""
    if not 100 <= status <= 999:
        raise RdgError("bad_http", f"status {status}")
    lines = [f"HTTP/1.1 {status} {reason}"]
    if _REASON.fullmatch(reason.encode("utf-8")) is None:
        raise RdgError("bad_http", "reason phrase with control or non-ASCII characters")
    for name, value in headers:
        if _TOKEN.fullmatch(name.encode("utf-8")) is None or _VALUE.fullmatch(value.encode("utf-8")) is None:
            raise RdgError("bad_http", f"bad response header {name!r}")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_WS_KEY = re.compile(r"[\x21-\x7e]{1,64}")


def websocket_accept(key: str) -> str:
    """`Sec-WebSocket-Accept` for `key`: b64(sha1(key + GUID)).

    FreeRDP 2.11 sends a 15-character key of bytes 0x40-0x5F, not base64 of 16 bytes as RFC 6455 asks, so any
    1-64 printable ASCII characters are accepted. Raises RdgError("bad_websocket") otherwise.
    """
    if _WS_KEY.fullmatch(key) is None:
        raise RdgError("bad_websocket", "Sec-WebSocket-Key must be 1-64 printable ASCII characters")
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _WS_GUID).digest()).decode("ascii")  # noqa: S324 (RFC 6455)


# ---------------------------------------------------------------------------------------------------------
# WebSocket framing (RFC 6455)

WS_CONTINUATION: Final = 0x0
WS_TEXT: Final = 0x1
WS_BINARY: Final = 0x2
WS_CLOSE: Final = 0x8
WS_PING: Final = 0x9
WS_PONG: Final = 0xA
_WS_OPCODES: Final = frozenset({WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG})
_UNMASK_STEP: Final = 16 * 1024  # slices stay in cache; measured faster than one big int over 64 KiB

# aiohttp's WebSocket mask (Cython; what /v1/tunnel uses). Private API, but aiohttp is pinned below 4 and the
# pure-Python path below is the fallback, checked against it by the codec tests. Unmasking in Python cost
# the gateway 2.3x the CPU of the other paths on RD Gateway uploads (bench/rdg.py).
_fast_mask: Callable[[bytes, bytearray], None] | None
try:
    from aiohttp._websocket.helpers import websocket_mask as _fast_mask
except ImportError:  # pragma: no cover - a future aiohttp without it
    _fast_mask = None


def _unmask(payload: bytes | memoryview, mask: bytes) -> bytes:
    """XOR with the 4-byte mask: aiohttp's compiled helper (tens of GB/s here) when it is there, else big ints."""
    if _fast_mask is not None:
        buf = bytearray(payload)
        _fast_mask(mask, buf)
        return bytes(buf)
    return _unmask_python(payload, mask)


def _unmask_python(payload: bytes | memoryview, mask: bytes) -> bytes:
    """XOR with the 4-byte mask, through big ints: about 0.3-0.5 GB/s, against 10-20 MB/s per byte."""
    n = len(payload)
    if n == 0:
        return b""
    if n <= _UNMASK_STEP:
        key = (mask * ((n >> 2) + 1))[:n]
        return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
    # The step is a multiple of 4, so each slice starts at mask phase 0 and shares one key integer.
    step_key = int.from_bytes(mask * (_UNMASK_STEP >> 2), "little")
    mv = memoryview(payload)
    full = n - n % _UNMASK_STEP
    parts = [
        (int.from_bytes(mv[i : i + _UNMASK_STEP], "little") ^ step_key).to_bytes(_UNMASK_STEP, "little")
        for i in range(0, full, _UNMASK_STEP)
    ]
    if full < n:
        parts.append(_unmask_python(mv[full:], mask))
    return b"".join(parts)


class _WsParser:
    def __init__(self, max_frame: int, *, masked: bool) -> None:
        if max_frame < 125:
            raise ValueError("max_frame must be at least 125")
        self._max = max_frame
        self._masked = masked
        self._buf = bytearray()
        self._frag_op: int | None = None
        self._frag: list[bytes] = []
        self._frag_len = 0
        self._error: RdgError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._frag_len

    def _fail(self, reason: RdgReason, message: str) -> RdgError:
        self._error = RdgError(reason, message)
        return self._error

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Complete messages as (opcode, payload); continuation frames are reassembled. Raises RdgError."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            fin, op, masked, length = b0 & 0x80, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
            if b0 & 0x70:
                raise self._fail("bad_websocket", "reserved bits set (no extension was negotiated)")
            if op not in _WS_OPCODES:
                raise self._fail("bad_websocket", f"unknown opcode {op:#x}")
            if bool(masked) != self._masked:
                raise self._fail("bad_websocket", "client frames must be masked" if self._masked else "server frames must not be masked")
            hlen = 2
            if length == 126:
                hlen = 4
                if n - pos < hlen:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            elif length == 127:
                hlen = 10
                if n - pos < hlen:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                if length >> 63:
                    raise self._fail("bad_websocket", "64-bit length with the top bit set")
            if op >= WS_CLOSE:
                if not fin:
                    raise self._fail("bad_websocket", "fragmented control frame")
                if length > 125:
                    raise self._fail("bad_websocket", "control frame over 125 bytes")
            elif length > self._max or (op == WS_CONTINUATION and self._frag_len + length > self._max):
                raise self._fail("too_large", f"WebSocket message over {self._max} bytes")
            if masked:
                hlen += 4
            if n - pos < hlen + length:
                break
            start = pos + hlen
            raw = memoryview(buf)[start : start + length]
            try:
                payload = _unmask(raw, bytes(buf[start - 4 : start])) if masked else bytes(raw)
            finally:
                raw.release()
            pos = start + length
            if op >= WS_CLOSE:
                if op == WS_CLOSE and length == 1:
                    raise self._fail("bad_websocket", "close frame with a 1-byte payload")
                out.append((op, payload))
            elif op == WS_CONTINUATION:
                if self._frag_op is None:
                    raise self._fail("bad_websocket", "continuation frame without a message")
                self._frag.append(payload)
                self._frag_len += length
                if fin:
                    out.append(self._message(self._frag_op, b"".join(self._frag)))
                    self._frag_op, self._frag, self._frag_len = None, [], 0
            else:
                if self._frag_op is not None:
                    raise self._fail("bad_websocket", "new data frame inside a fragmented message")
                if fin:
                    out.append(self._message(op, payload))
                else:
                    self._frag_op, self._frag, self._frag_len = op, [payload], length
        del buf[:pos]
        return out

    def _message(self, op: int, payload: bytes) -> tuple[int, bytes]:
        if op == WS_TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise self._fail("bad_websocket", "text message is not UTF-8") from None
        return op, payload


class WsReader(_WsParser):
    """Server side: decodes masked client frames (unmasked ones are refused, RFC 6455 §5.1).

    Rejects (RdgError "bad_websocket"): unmasked frames, reserved bits, unknown opcodes, control frames over
    125 bytes or fragmented, a 1-byte close payload, stray or interleaved continuation, 64-bit lengths with
    the top bit set, text that is not UTF-8; ("too_large") a message over `max_frame` after reassembly. The
    length is checked from the frame header, before the payload is buffered.
    """

    def __init__(self, max_frame: int = 70_000) -> None:
        super().__init__(max_frame, masked=True)


class WsClientReader(_WsParser):
    """Client side (the test client): decodes unmasked server frames; a masked one is an error."""

    def __init__(self, max_frame: int = 70_000) -> None:
        super().__init__(max_frame, masked=False)


def _ws_header(opcode: int, length: int, mask_bit: int) -> bytes:
    if opcode not in _WS_OPCODES or opcode == WS_CONTINUATION:
        raise RdgError("bad_websocket", f"cannot send opcode {opcode:#x}")
    if opcode >= WS_CLOSE and length > 125:
        raise RdgError("bad_websocket", "control frame over 125 bytes")
    b0 = 0x80 | opcode
    if length < 126:
        return struct.pack("!BB", b0, mask_bit | length)
    if length < 0x10000:
        return struct.pack("!BBH", b0, mask_bit | 126, length)
    return struct.pack("!BBQ", b0, mask_bit | 127, length)


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (server frames must not be masked: FreeRDP aborts on a masked one)."""
    return _ws_header(opcode, len(payload), 0) + payload


def ws_client_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One final frame masked with the 4-byte `mask`, as a client sends it."""
    if len(mask) != 4:
        raise RdgError("bad_websocket", "mask must be 4 bytes")
    return _ws_header(opcode, len(payload), 0x80) + mask + _unmask(payload, mask)


def ws_close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame: a 2-byte code and a UTF-8 reason cut to fit 125 bytes."""
    raw = reason.encode("utf-8", "replace")[:123].decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + raw


def parse_close_payload(payload: bytes) -> tuple[int | None, str]:
    """(code, reason) of a close frame; (None, "") for an empty payload. Raises RdgError on bad UTF-8."""
    if not payload:
        return None, ""
    if len(payload) < 2:
        raise RdgError("bad_websocket", "close frame with a 1-byte payload")
    try:
        return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise RdgError("bad_websocket", "close reason is not UTF-8") from None


# ---------------------------------------------------------------------------------------------------------
# Chunked transfer coding (legacy HTTP transport, IN channel)

_MAX_CHUNK_LINE: Final = 1024  # size line including any extension and the CRLF
_MAX_HEX_DIGITS: Final = 8
_HEX = re.compile(rb"[0-9A-Fa-f]{1,8}")
_EXT = re.compile(rb"[\x20-\x7e\t]*")


class ChunkedReader:
    """Decodes `<hex>[;ext]\\r\\n<data>\\r\\n` chunks, split anywhere; returns one bytes per whole chunk.

    A chunk over `max_chunk`, a size line over 1 KiB or with more than 8 hex digits, bad hex, control bytes
    in an extension, or a chunk not followed by CRLF raise RdgError ("too_large" / "bad_chunked"). The
    0-size chunk sets `done`; the trailer section and anything after it is ignored (the caller stops
    reading: FreeRDP never ends its IN stream, it drops the connection).
    """

    def __init__(self, max_chunk: int = 70_000) -> None:
        self._max = max_chunk
        self._buf = bytearray()
        self._need: int | None = None  # size of the chunk whose data we are reading
        self.done = False
        self._error: RdgError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _fail(self, reason: RdgReason, message: str) -> RdgError:
        self._error = RdgError(reason, message)
        return self._error

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise self._error
        if self.done:
            return []
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        while True:
            if self._need is None:
                eol = buf.find(b"\r\n", pos, pos + _MAX_CHUNK_LINE)
                if eol < 0:
                    if len(buf) - pos >= _MAX_CHUNK_LINE:
                        raise self._fail("too_large", "chunk size line over 1 KiB")
                    if b"\n" in buf[pos:] or b"\r" in buf[pos:-1]:
                        raise self._fail("bad_chunked", "bare CR or LF in a chunk size line")
                    break
                size_part, _, ext = bytes(buf[pos:eol]).partition(b";")
                size_part = size_part.rstrip(b" \t")
                if len(size_part) > _MAX_HEX_DIGITS:
                    raise self._fail("too_large", "chunk size over 8 hex digits")
                if _HEX.fullmatch(size_part) is None or _EXT.fullmatch(ext) is None:
                    raise self._fail("bad_chunked", "malformed chunk size line")
                size = int(size_part, 16)
                if size > self._max:
                    raise self._fail("too_large", f"chunk of {size} bytes over {self._max}")
                pos = eol + 2
                if size == 0:
                    self.done = True
                    buf.clear()
                    return out
                self._need = size
            size = self._need
            if len(buf) - pos < size + 2:
                break
            if buf[pos + size : pos + size + 2] != b"\r\n":
                raise self._fail("bad_chunked", "chunk data not followed by CRLF")
            out.append(bytes(buf[pos : pos + size]))
            pos += size + 2
            self._need = None
        del buf[:pos]
        return out
