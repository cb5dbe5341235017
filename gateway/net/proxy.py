"""The PROXY protocol (haproxy's, v1 text and v2 binary): the header a TCP load balancer puts before a client's bytes.

Pure and bounded: no sockets here. A v1 header is at most 107 bytes (CRLF included), a v2 header 16 bytes plus an
address block and at most `MAX_TLV_BYTES` of TLVs. Everything malformed raises `ProxyError` with a `proxy_*` reason;
nothing else is raised for any input.

Two ways in, both over bytes that may arrive split:

- `header_length(prefix)`: how long the header at the start of `prefix` is (None: not known yet). A reader that
  must not consume past the header (the listener, which hands the rest of the stream to a door) peeks, asks this,
  then reads exactly that many bytes and calls `parse()`.
- `ProxyReader.feed(chunk)`: buffers until a header is complete and keeps what followed it in `remainder`.

A LOCAL command (a balancer's own health check) and a v1 `UNKNOWN` or v2 `AF_UNSPEC` header carry no client
address: `ProxyHeader.source` is None and the connection's own peer stands (`client(peer)`), as the spec says.
Only TCP over IPv4 and IPv6 is accepted with the PROXY command; UDP and unix sockets are errors.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

from gateway.errors import GatewayError

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # "PROXY TCP6 " + two full IPv6 addresses + two ports + CRLF (spec section 2.1)
MAX_TLV_BYTES = 1024
_V2_ADDRESS_BYTES = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}  # by address family: UNSPEC, INET, INET6, UNIX
MAX_V2 = 16 + max(_V2_ADDRESS_BYTES.values()) + MAX_TLV_BYTES
MAX_HEADER = max(V1_MAX, MAX_V2)  # what a reader may ever need to look at
_V2_PROTOCOLS = {0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32}  # the only family/transport bytes the spec allows
_PP2_TYPE_CRC32C = 0x03

Address = tuple[str, int]


class ProxyError(GatewayError):
    """A PROXY header that is missing, malformed, too long or for a transport we do not relay."""

    reason = "proxy_header"


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header. `source`/`destination` are None for LOCAL and UNKNOWN; `length` is what it took on the wire."""

    version: Literal[1, 2]
    command: Literal["proxy", "local"]
    source: Address | None
    destination: Address | None
    length: int
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def client(self, peer: Address) -> Address:
        """The client's address: the header's source, or the connection's own peer when the header carries none."""
        return self.source if self.source is not None else peer


def _fail(reason: str, message: str) -> ProxyError:
    return ProxyError(message, reason=reason)


def header_length(prefix: bytes) -> int | None:
    """The total length of the header `prefix` starts with, or None if more bytes are needed to know.

    Raises ProxyError as soon as `prefix` cannot start a valid header (a wrong signature, no CRLF within 107 bytes,
    a v2 length beyond the bound), so a reader never waits for bytes that cannot help.
    """
    if not prefix:
        return None
    if prefix[0] == V1_PREFIX[0]:
        n = min(len(prefix), len(V1_PREFIX))
        if prefix[:n] != V1_PREFIX[:n]:
            raise _fail("proxy_signature", "not a PROXY protocol header")
        end = prefix.find(b"\r\n", 0, V1_MAX)
        if end >= 0:
            return end + 2
        if len(prefix) >= V1_MAX:
            raise _fail("proxy_v1_too_long", f"no CRLF within {V1_MAX} bytes of a v1 header")
        if b"\n" in prefix[:V1_MAX]:
            raise _fail("proxy_v1_syntax", "a v1 header ends with CRLF, not a bare LF")
        return None
    n = min(len(prefix), len(V2_SIGNATURE))
    if prefix[:n] != V2_SIGNATURE[:n]:
        raise _fail("proxy_signature", "not a PROXY protocol header")
    if len(prefix) < 16:
        if len(prefix) > 12:
            _check_v2_fixed(prefix)
        return None
    _check_v2_fixed(prefix)
    body = struct.unpack_from("!H", prefix, 14)[0]
    need = _V2_ADDRESS_BYTES[prefix[13] >> 4]
    if body < need and prefix[12] & 0x0F == 0x1:
        raise _fail("proxy_v2_length", f"a v2 header announces {body} bytes, less than its {need}-byte address block")
    if body > need + MAX_TLV_BYTES:
        raise _fail("proxy_v2_too_long", f"a v2 header announces {body} bytes (at most {need + MAX_TLV_BYTES})")
    return 16 + int(body)


def looks_like_proxy(prefix: bytes) -> bool:
    """Whether `prefix` (5 bytes or more) starts like a PROXY header: to name a refusal, never to trust one."""
    if len(prefix) < 5:
        return False
    return any(prefix[: len(sig)] == sig[: len(prefix)] for sig in (V1_PREFIX, V2_SIGNATURE))


def _check_v2_fixed(prefix: bytes) -> None:
    """The version/command byte (and, once there, the family/transport byte) of a v2 header."""
    ver_cmd = prefix[12]
    if ver_cmd >> 4 != 0x2:
        raise _fail("proxy_v2_version", f"PROXY protocol version {ver_cmd >> 4} (only 2 is binary)")
    if ver_cmd & 0x0F not in (0x0, 0x1):
        raise _fail("proxy_v2_command", f"unknown v2 command {ver_cmd & 0x0F}")
    if len(prefix) > 13 and prefix[13] not in _V2_PROTOCOLS:
        raise _fail("proxy_v2_family", f"unknown v2 address family/transport byte 0x{prefix[13]:02x}")


def parse(header: bytes) -> ProxyHeader:
    """Parse exactly one complete header (`header_length(header) == len(header)`). Raises ProxyError."""
    n = header_length(header)
    if n is None:
        raise _fail("proxy_truncated", "the PROXY header is incomplete")
    if n != len(header):
        raise _fail("proxy_trailing", "bytes past the end of the PROXY header")
    return _parse_v1(header) if header[0] == V1_PREFIX[0] else _parse_v2(header)


def _parse_v1(header: bytes) -> ProxyHeader:
    line = header[len(V1_PREFIX) : -2]
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        return ProxyHeader(1, "proxy", None, None, len(header))  # whatever follows UNKNOWN is ignored (spec 2.1)
    parts = line.split(b" ")
    if len(parts) != 5:
        raise _fail("proxy_v1_syntax", "a v1 header is 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    proto, src, dst, sport, dport = parts
    if proto not in (b"TCP4", b"TCP6"):
        raise _fail("proxy_v1_protocol", "a v1 header's protocol is TCP4, TCP6 or UNKNOWN")
    version = 4 if proto == b"TCP4" else 6
    return ProxyHeader(1, "proxy", (_v1_ip(src, version), _v1_port(sport)), (_v1_ip(dst, version), _v1_port(dport)), len(header))


def _v1_ip(raw: bytes, version: int) -> str:
    try:
        text = raw.decode("ascii")
        ip = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except (UnicodeDecodeError, ValueError):
        raise _fail("proxy_v1_address", f"not an IPv{version} address in a v1 header") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise _fail("proxy_v1_address", "not an IPv6 address in a v1 header")
    return _canonical(ip)


def _v1_port(raw: bytes) -> int:
    # Decimal 0..65535 without a sign, spaces or leading zeros (int() would accept "+1", " 1", "1_0", "٣").
    if not raw or len(raw) > 5 or not all(0x30 <= b <= 0x39 for b in raw) or (len(raw) > 1 and raw[0] == 0x30):
        raise _fail("proxy_v1_port", "not a port (0 to 65535) in a v1 header")
    port = int(raw)
    if port > 65535:
        raise _fail("proxy_v1_port", "not a port (0 to 65535) in a v1 header")
    return port


def _parse_v2(header: bytes) -> ProxyHeader:
    command: Literal["proxy", "local"] = "local" if header[12] & 0x0F == 0x0 else "proxy"
    family, transport = header[13] >> 4, header[13] & 0x0F
    need = _V2_ADDRESS_BYTES[family]
    body = header[16:]
    if command == "local":  # the spec: accept any family with LOCAL and discard the whole block
        return ProxyHeader(2, "local", None, None, len(header))
    if family == 0x0:
        return ProxyHeader(2, "proxy", None, None, len(header), _tlvs(header, 0))
    if transport != 0x1:
        raise _fail("proxy_unsupported", "only TCP (STREAM) connections can be relayed, not UDP (DGRAM)")
    if family == 0x3:
        raise _fail("proxy_unsupported", "a unix socket source has no client address")
    if family == 0x1:
        src: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(body[0:4])
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(body[4:8])
        ports = body[8:12]
    else:
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        ports = body[32:36]
    sport, dport = struct.unpack("!HH", ports)
    return ProxyHeader(2, "proxy", (_canonical(src), sport), (_canonical(dst), dport), len(header), _tlvs(header, need))


def _tlvs(header: bytes, address_bytes: int) -> tuple[tuple[int, bytes], ...]:
    """The TLVs after the address block: each must fit exactly; a CRC32c TLV must match (spec 2.2.5)."""
    out: list[tuple[int, bytes]] = []
    pos = 16 + address_bytes
    while pos < len(header):
        if pos + 3 > len(header):
            raise _fail("proxy_v2_tlv", "a truncated TLV in a v2 header")
        kind, size = header[pos], struct.unpack_from("!H", header, pos + 1)[0]
        if pos + 3 + size > len(header):
            raise _fail("proxy_v2_tlv", "a TLV longer than the v2 header")
        value = bytes(header[pos + 3 : pos + 3 + size])
        if kind == _PP2_TYPE_CRC32C:
            if size != 4:
                raise _fail("proxy_v2_tlv", "a CRC32c TLV is 4 bytes")
            zeroed = header[: pos + 3] + b"\x00\x00\x00\x00" + header[pos + 7 :]
            if crc32c(zeroed) != struct.unpack("!I", value)[0]:
                raise _fail("proxy_v2_checksum", "the v2 header's CRC32c does not match")
        out.append((kind, value))
        pos += 3 + size
    return tuple(out)


def _canonical(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An IPv4-mapped IPv6 address is the IPv4 client it stands for (per-source limits and locks key on that)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the v2 header's PP2_TYPE_CRC32C carries it."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


class ProxyReader:
    """Feed it the connection's first bytes in any split; it returns the header once complete.

    Never holds more than `MAX_HEADER` bytes before deciding. `remainder` is what followed the header (the client's
    first bytes). Raises ProxyError, after which it must not be fed again.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: ProxyHeader | None = None
        self.remainder = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        if self.header is not None:
            self.remainder += data
            return self.header
        self._buf += data
        n = header_length(bytes(self._buf[:MAX_HEADER]))
        if n is None or len(self._buf) < n:
            return None
        self.header = parse(bytes(self._buf[:n]))
        self.remainder = bytes(self._buf[n:])
        self._buf.clear()
        return self.header
