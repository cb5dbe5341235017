"""Pure byte probes: which door do the first bytes of a connection belong to?"""

from __future__ import annotations

import enum


class Door(enum.Enum):
    SSH = "ssh"
    TLS = "tls"
    UNKNOWN = "unknown"
    NEED_MORE = "need_more"


_SSH = b"SSH-"


def classify(first: bytes) -> Door:
    """Classify the bytes a client sent first (possibly fewer than needed).

    SSH clients send `SSH-` (RFC 4253 4.2). A TLS ClientHello starts with the
    handshake record type 0x16 and a record version 0x0300-0x0304.
    Empty input means "nothing yet", which the listener turns into SSH on a
    deadline since SSH servers may speak first.
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
    return Door.UNKNOWN
