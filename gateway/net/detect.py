"""Pure byte probes: which door do the first bytes of a connection belong to?"""

from __future__ import annotations

import enum


class Door(enum.Enum):
    SSH = "ssh"
    TLS = "tls"
    HTTP = "http"  # a plain-HTTP request line: answered with a hint, never served
    UNKNOWN = "unknown"
    NEED_MORE = "need_more"


_SSH = b"SSH-"
_HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")


def classify(first: bytes) -> Door:
    """Classify the bytes a client sent first (possibly fewer than needed).

    SSH clients send `SSH-` (RFC 4253 4.2). A TLS ClientHello starts with the
    handshake record type 0x16 and a record version 0x0300-0x0304.
    Empty input means "nothing yet", which the listener turns into SSH on a
    deadline since SSH servers may speak first. A plain-HTTP method and a space
    (`GET `, `POST `, ...) is HTTP: someone typed http:// for an https:// port.
    """
    if not first:
        return Door.NEED_MORE
    if first[0] == 0x16:
        if len(first) < 3:
            return Door.NEED_MORE
        return Door.TLS if first[1] == 0x03 and first[2] <= 0x04 else Door.UNKNOWN
    n = min(len(first), len(_SSH))
    if first[:n] == _SSH[:n]:
        return Door.SSH if n == len(_SSH) else Door.NEED_MORE
    for method in _HTTP_METHODS:
        n = min(len(first), len(method))
        if first[:n] == method[:n]:
            return Door.HTTP if n == len(method) else Door.NEED_MORE
    return Door.UNKNOWN
