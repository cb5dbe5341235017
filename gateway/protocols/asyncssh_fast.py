"""asyncssh's per-packet costs on the relay path: buffer copies, an extra packet and a write per sent packet.

asyncssh 2.24.1 keeps unparsed input in `SSHConnection._inpbuf` (bytes) and consumes it by slicing: the packet
header (`_recv_pkthdr`: `self._inpbuf = self._inpbuf[blocksize:]`) and the rest of the packet (`_recv_packet`:
`self._inpbuf = self._inpbuf[rem:]`) each copy everything still unparsed. One read from a fast peer holds up to
256 KiB, so eight 32 KiB packets copy about 1.1 MB to parse 256 KiB, on the one core that also runs every relay.

`apply()` replaces those three methods on `asyncssh.connection.SSHConnection` (every client and server connection)
with versions that keep a read offset `_fast_pos` into `_inpbuf` while one `_recv_data()` runs, hand asyncssh's own
`_recv_pkthdr`/`_recv_packet` exactly the bytes they parse (one copy of the packet, which they would slice anyway),
and cut the consumed part off once per `_recv_data()`. Outside `_recv_data()` the offset is 0, so every other reader
of `_inpbuf` (version line, `_finish_recv_packet` after an async handler, `connection_lost`) sees what it saw before.
Packet parsing, decryption, MAC checks and dispatch stay asyncssh's own code.

On the send side, `send_packet` puts an empty MSG_IGNORE before every packet after key exchange: RFC 4251 9.3.1's
countermeasure to the chosen-plaintext attack on CBC. It doubles the packets, the encryptions and the transport
writes (two segments per keystroke with TCP_NODELAY). The gateway never negotiates CBC, and CTR, GCM and
chacha20-poly1305 need no such packet (OpenSSH sends none), so the patched `send_packet` leaves it out unless the
connection's send cipher is a CBC one.

And every packet was its own `transport.write`, so a syscall each: one read of 256 KiB relayed as eight packets made
eight sends. While one `_recv_data()` runs, what any connection sends (the relayed data on the other leg, window
adjusts on this one) is queued per connection and written at its end with one `writelines` (a writev on uvloop), in
order; a connection that closes in between writes its queue first, so a DISCONNECT still goes out before the drop.

`SSHChannel.write` copies every chunk into a bytearray, queues it and runs the whole flush loop even when it fits
the peer's window and packet size with nothing queued, which is the relay's case for every keystroke and most
bulk chunks; the patched `write` sends such a chunk as one packet at once and leaves every other case to asyncssh.

The patch leans on private names of exactly one asyncssh version: `apply()` changes nothing on any other (`PINNED`), and
`tests/unit/test_asyncssh_fast.py` fails when pyproject's pin moves, so a new version is read before the patch is
carried forward. It is the shape of a change offered upstream (an offset instead of a slice per packet).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA, MSG_IGNORE, MSG_KEX_LAST
from asyncssh.packet import String, UInt32

PINNED = "2.24.1"
_MARK = "_bastion_fast_recv"


def applied() -> bool:
    return bool(getattr(SSHConnection, _MARK, False))


def apply(version: str | None = None) -> bool:
    """Patch `SSHConnection` once per process (idempotent); True when the patch is in place. On any asyncssh but
    `PINNED` it changes nothing and returns False (asyncssh's own receive path, slower, still correct). Called by
    the composition root before any connection exists; `version` is for tests."""
    found = asyncssh.__version__ if version is None else version
    if found != PINNED:
        return False
    if applied():
        return True
    cls: Any = SSHConnection
    orig_pkthdr: Callable[[Any], bool] = cls._recv_pkthdr
    orig_packet: Callable[[Any], bool] = cls._recv_packet

    def windowed(orig: Callable[[Any], bool], need: Callable[[Any], int]) -> Callable[[Any], bool]:
        def handler(self: Any) -> bool:
            full: bytes = self._inpbuf
            pos: int = self._fast_pos
            n = need(self)
            if len(full) - pos < n:
                return False
            self._inpbuf = full if pos == 0 and len(full) == n else full[pos : pos + n]
            try:
                return orig(self)
            finally:
                # A packet can close the connection (DISCONNECT, a MAC or protocol error): it emptied the buffer.
                if self._transport is not None:
                    self._inpbuf, self._fast_pos = full, pos + n
                else:
                    self._inpbuf, self._fast_pos = b"", 0

        handler.__name__ = orig.__name__
        return handler

    batch = threading.local()  # per event-loop thread: the connections written to during the current read

    def flush(conn: Any) -> None:
        out: list[bytes] | None = conn._fast_out
        if out:
            conn._fast_out = None
            if conn._transport is not None:
                try:
                    if len(out) == 1:
                        conn._transport.write(out[0])
                    else:
                        conn._transport.writelines(out)  # uvloop: one writev
                except ConnectionError:  # as asyncssh's own _send
                    pass

    def send(self: Any, data: bytes) -> None:
        dirty: list[Any] | None = getattr(batch, "dirty", None)
        if dirty is None or self._transport is None:
            orig_raw_send(self, data)
            return
        if self._fast_out is None:
            self._fast_out = [data]
            dirty.append(self)
        else:
            self._fast_out.append(data)

    def force_close(self: Any, exc: Exception | None) -> None:
        flush(self)  # a DISCONNECT queued in this read goes out before the transport is dropped
        orig_force_close(self, exc)

    def recv_data(self: Any) -> None:
        outer = getattr(batch, "dirty", None) is None
        if outer:
            batch.dirty = []
        self._reset_keepalive_timer()
        try:
            while len(self._inpbuf) > self._fast_pos and self._recv_handler():
                pass
        except asyncssh.DisconnectError as exc:
            self._send_disconnect(exc.code, exc.reason, exc.lang)
            self._force_close(exc)
        except Exception:  # asyncssh's own contract: any parsing error ends the connection
            self.internal_error()
        finally:
            if self._fast_pos:
                self._inpbuf = self._inpbuf[self._fast_pos :]
                self._fast_pos = 0
            if outer:
                dirty, batch.dirty = batch.dirty, None
                for conn in dirty:
                    flush(conn)

    orig_send: Callable[..., None] = cls.send_packet
    orig_raw_send: Callable[[Any, bytes], None] = cls._send
    orig_force_close: Callable[[Any, Exception | None], None] = cls._force_close

    def send_packet(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and self._fast_skip_ignore:
            self._fast_skip_ignore = False  # the one asyncssh inserts before the packet being sent: not for CTR/AEAD
            return
        if pkttype > MSG_KEX_LAST and self._send_encryption is not None:
            cipher: bytes = self._enc_alg_cs if self.is_client() else self._enc_alg_sc
            self._fast_skip_ignore = not cipher.endswith(b"-cbc")
            try:
                orig_send(self, pkttype, *args, handler=handler)
            finally:
                self._fast_skip_ignore = False
            return
        orig_send(self, pkttype, *args, handler=handler)

    chan_cls: Any = SSHChannel
    orig_write: Callable[..., None] = chan_cls.write

    def write(self: Any, data: Any, datatype: int | None = None) -> None:
        # The relay's common case, sent at once: bytes that fit the peer's window and packet size on a channel with
        # nothing queued. Everything else (and asyncssh's debug-level-2 line per write) is asyncssh's own write.
        n = len(data)
        if (
            0 < n <= self._send_window
            and n <= self._send_pktsize
            and not self._send_buf
            and not self._send_paused
            and self._send_state == "open"
            and self._encoding is None
            and self._send_chan is not None
            and self._conn is not None
            and (datatype is None or datatype in self._write_datatypes)
        ):
            self._send_window -= n
            if datatype is None:
                self._conn.send_packet(MSG_CHANNEL_DATA, UInt32(self._send_chan), String(data), handler=self)
            else:
                self._conn.send_packet(MSG_CHANNEL_EXTENDED_DATA, UInt32(self._send_chan), UInt32(datatype), String(data), handler=self)
            return
        orig_write(self, data, datatype)

    chan_cls.write = write
    cls._fast_skip_ignore = False
    cls._fast_out = None
    cls._send = send
    cls._force_close = force_close
    cls.send_packet = send_packet
    cls._fast_pos = 0  # class default: connections made before apply() (none, in the gateway) start at 0
    cls._recv_pkthdr = windowed(orig_pkthdr, lambda self: self._recv_blocksize)
    cls._recv_packet = windowed(orig_packet, lambda self: 4 + self._pktlen + self._recv_macsize - self._recv_blocksize)
    cls._recv_data = recv_data
    setattr(cls, _MARK, True)
    return True
