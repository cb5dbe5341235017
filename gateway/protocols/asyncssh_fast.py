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

Per packet, asyncssh's receive path builds an `SSHPacket`, walks the dispatch rules, looks the handler up in a table,
formats the packet log line (dropped below debug level 3), checks the result with `inspect.isawaitable`, and resets
the keepalive timer (a cancel and a new `call_later`) once per read. For MSG_CHANNEL_DATA and
MSG_CHANNEL_WINDOW_ADJUST on an open channel of an authenticated connection, the patched `_recv_packet` hands the
decrypted bytes to the channel's own `_accept_data` / `_flush_send_buf` directly, after the checks asyncssh's handlers
make (channel state, the receive window, the exact packet layout); any packet that fails one of them, any other packet
type, compression, packet logging (debug level 2 or 3) or a channel class with its own handler goes through asyncssh's
own code, given the bytes already decrypted. With AES-GCM the packet length is read from the buffer (it is in the
clear) and the body handled in the same pass, without asyncssh's header method and the cipher's `decrypt_header`. The
send side of channel data does the same in one place: the packet is built with one join (no separate payload, `String`
and padding copies), AES-GCM runs on a cached `AESGCM` object (asyncssh builds one per packet) and its output goes to
the transport as is (no `header + ciphertext` and `packet + mac` copies), padding comes from a pooled `os.urandom`
buffer (one getrandom per 4 KiB, not one per packet). A write bigger than the peer's packet size that fits its window
is cut into packets at once and written with one `writelines`. Rekey-by-bytes and -by-time, key exchange in progress,
compression, CBC and packet logging all leave the packet to asyncssh's `send_packet`. The packet log formatting is
skipped below debug level 3 (where asyncssh's logger drops it), and a read only records its time for the keepalive
timer, which re-arms itself when it fires early instead of being replaced on every read. For chacha20-poly1305
(OpenSSH's first choice, so most users' leg), a packet of up to 4 KiB runs the cipher twice instead of three times:
once for the length, once for the Poly1305 key and the data together.

A connection also kept, for its whole life, what only its key exchange needs: both KEXINIT payloads (about 1.4 KiB
each from an OpenSSH or asyncssh peer, 5.4 KiB per terminating session) and, on the server, the EXT_INFO it sent (the
server-sig-algs list, built again at every re-key and never sent again). The patched `send_newkeys` drops them once the
exchange hash is made: a re-key sets both payloads again before its own hash (asyncssh stores each KEXINIT as it is
sent or received; the NEWKEYS packet itself can send the next KEXINIT when the re-key limit is already passed, and
that one is kept), and EXT_INFO goes out only after the first exchange. And a connection's receive handler is a bound
method of its own (`_recv_handler`), so every connection asyncssh closed stayed a reference cycle for the collector's
oldest generation; the patched `_cleanup` puts a plain function there once the connection is closed.

The patch leans on private names of exactly one asyncssh version: `apply()` changes nothing on any other (`PINNED`), and
`tests/unit/test_asyncssh_fast.py` fails when pyproject's pin moves, so a new version is read before the patch is
carried forward. `docs/upstream/` holds the same change as a diff against asyncssh 2.24.1's source.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA, MSG_CHANNEL_WINDOW_ADJUST, MSG_IGNORE, MSG_KEX_LAST
from asyncssh.crypto import chacha
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import GCMEncryption
from asyncssh.packet import SSHPacketLogger, String, UInt32
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

PINNED = "2.24.1"
_MARK = "_bastion_fast_recv"
_OPEN_FOR_ADJUST = frozenset({"open", "eof_pending", "eof"})  # asyncssh's _process_window_adjust


def _closed_recv() -> bool:
    """A closed connection's receive handler: it parses nothing more."""
    return False


def applied() -> bool:
    return bool(getattr(SSHConnection, _MARK, False))


class _Decrypted:
    """Stands in for a connection's receive cipher while asyncssh's own `_recv_packet` handles a packet the fast path
    already decrypted (and so advanced the cipher's state): it returns that plaintext (None: the MAC failed)."""

    def __init__(self, plain: bytes | None) -> None:
        self._plain = plain

    def decrypt_packet(self, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes) -> bytes | None:
        return self._plain


class _Padding:
    """Random padding bytes drawn from os.urandom 4 KiB at a time; every byte is used once."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            self._buf, self._pos = os.urandom(4096), 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out


def _aead(enc: object) -> tuple[GCMCipher, AESGCM] | None:
    """The AES-GCM cipher of a connection's encryption and a cached AESGCM for its key (asyncssh builds one per packet);
    None for every other cipher."""
    if type(enc) is not GCMEncryption:
        return None
    cipher: Any = enc._cipher
    aead: AESGCM | None = cipher.__dict__.get("_bastion_aead")
    if aead is None:
        aead = cipher._bastion_aead = AESGCM(cipher._key)
    return cipher, aead


# chacha20-poly1305@openssh.com: block 0 of the main key's stream (counter 0) is the Poly1305 key, the data is encrypted
# from block 1 (counter 1) on. asyncssh runs the cipher once for each: up to this size, one run over 64 zero bytes and
# the data gives both (one cipher object fewer per packet); above it the extra copy costs more than it saves.
_CHACHA_ONE_RUN = 4096
_BLOCK0 = bytes(64)


def _chacha_encrypt_and_sign(self: Any, header: bytes, data: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    if len(data) > _CHACHA_ONE_RUN:
        return _chacha_orig_encrypt(self, header, data, nonce)
    header = chacha.chacha20(self._adkey, header, nonce, 0)
    stream = chacha.chacha20(self._key, _BLOCK0 + data, nonce, 0)
    body = stream[64:]
    mac = Poly1305(stream[:32])
    mac.update(header)
    mac.update(body)
    return header + body, mac.finalize()


def _chacha_verify_and_decrypt(self: Any, header: bytes, data: bytes, nonce: bytes, tag: bytes) -> bytes | None:
    if len(data) > _CHACHA_ONE_RUN:
        return _chacha_orig_verify(self, header, data, nonce, tag)
    stream = chacha.chacha20(self._key, _BLOCK0 + data, nonce, 0)
    mac = Poly1305(stream[:32])
    mac.update(header)
    mac.update(data)
    try:
        mac.verify(tag)
    except InvalidSignature:
        return None
    return stream[64:]


_chacha_orig_encrypt: Callable[..., tuple[bytes, bytes]] = chacha.ChachaCipher.encrypt_and_sign
_chacha_orig_verify: Callable[..., bytes | None] = chacha.ChachaCipher.verify_and_decrypt


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

    slow_packet = windowed(orig_packet, lambda self: 4 + self._pktlen + self._recv_macsize - self._recv_blocksize)
    slow_pkthdr = windowed(orig_pkthdr, lambda self: self._recv_blocksize)
    chan_cls: Any = SSHChannel
    orig_process_data = chan_cls._packet_handlers[MSG_CHANNEL_DATA]
    orig_window_adjust = chan_cls._packet_handlers[MSG_CHANNEL_WINDOW_ADJUST]

    def channel_packet(self: Any, plain: bytes, seq: int) -> bool:
        """Data or a window adjust for an open channel, handled as asyncssh's channel handlers would (False: anything
        else, or anything those handlers would refuse, left to asyncssh)."""
        n = len(plain)
        pad = plain[0]
        stop = n - pad  # asyncssh's payload is plain[1:stop]
        if pad == 0 or stop < 10:
            return False
        pkttype = plain[1]
        if pkttype not in (MSG_CHANNEL_DATA, MSG_CHANNEL_WINDOW_ADJUST):
            return False
        chan: Any = self._channels.get(int.from_bytes(plain[2:6], "big"))
        if chan is None or chan._logger._debug_level >= 2:  # asyncssh logs each at debug level 2
            return False
        value = int.from_bytes(plain[6:10], "big")
        if pkttype == MSG_CHANNEL_DATA:
            if (
                stop != 10 + value
                or chan._recv_state != "open"
                or value > chan._recv_window
                or chan._packet_handlers.get(MSG_CHANNEL_DATA) is not orig_process_data
            ):
                return False
            chan._accept_data(plain[10:stop])
        else:
            if stop != 10 or chan._recv_state not in _OPEN_FOR_ADJUST or chan._packet_handlers.get(pkttype) is not orig_window_adjust:
                return False
            chan._send_window += value
            chan._flush_send_buf()
        self._finish_recv_packet(pkttype, seq)
        return True

    def recv_packet(self: Any) -> bool:
        enc = self._recv_encryption
        if enc is None or not self._auth_complete or self._decompressor is not None or self._logger._debug_level >= 3:
            return slow_packet(self)
        full: bytes = self._inpbuf
        pos: int = self._fast_pos
        macsize: int = self._recv_macsize
        bs: int = self._recv_blocksize
        end = pos + 4 + self._pktlen + macsize - bs
        if len(full) < end:
            return False
        seq: int = self._recv_seq
        gcm = _aead(enc)
        plain: bytes | None
        if gcm is not None:
            cipher, aead = gcm
            first: bytes = self._packet
            if pos >= bs and full[pos - bs : pos] == first:  # the header was parsed from this buffer: no concatenation
                body: Any = memoryview(full)[pos - bs + 4 : end]
            else:
                body = first[4:] + full[pos:end]
            try:
                plain = aead.decrypt(cipher._iv, body, first[:4])
            except InvalidTag:
                plain = None
            cipher._update_iv()
        else:
            plain = enc.decrypt_packet(seq, self._packet, full[pos : end - macsize], 4, full[end - macsize : end])
        if plain:
            self._fast_pos, self._packet = end, b""
            if channel_packet(self, plain, seq):
                return True
            self._fast_pos = pos
        # Every other packet (and a MAC failure) is asyncssh's to handle, from the plaintext computed here.
        self._recv_encryption = _Decrypted(plain)
        try:
            return slow_packet(self)
        finally:
            if type(self._recv_encryption) is _Decrypted:  # NEWKEYS may have installed the next cipher
                self._recv_encryption = enc

    def recv_pkthdr(self: Any) -> bool:
        if type(self._recv_encryption) is not GCMEncryption:
            return slow_pkthdr(self)
        full: bytes = self._inpbuf
        pos: int = self._fast_pos
        end = pos + self._recv_blocksize
        if len(full) < end:
            return False
        # GCMEncryption.decrypt_header: the length is the block's first 4 bytes, in the clear (it is the AAD)
        pktlen = int.from_bytes(full[pos : pos + 4], "big")
        if pktlen > self._max_recv_pktlen:
            raise asyncssh.ProtocolError("Max packet size exceeded")
        self._packet, self._pktlen, self._fast_pos = full[pos:end], pktlen, end
        self._recv_handler = self._recv_packet
        recv_packet(self)  # the body is usually in the same read: one pass of the loop for both
        return True

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

    def begin() -> bool:
        """Start collecting writes (True: this caller opened the batch and must `end()` it)."""
        if getattr(batch, "dirty", None) is None:
            batch.dirty = []
            return True
        return False

    def end() -> None:
        dirty, batch.dirty = batch.dirty, None
        for conn in dirty:
            flush(conn)

    def send_parts(self: Any, parts: tuple[bytes, ...]) -> None:
        dirty: list[Any] | None = getattr(batch, "dirty", None)
        if self._transport is None:
            return
        if dirty is None:
            try:  # noqa: SIM105 - once per packet: contextlib.suppress would add a context manager to each
                self._transport.writelines(parts)
            except ConnectionError:  # as asyncssh's own _send
                pass
        elif self._fast_out is None:
            self._fast_out = list(parts)
            dirty.append(self)
        else:
            self._fast_out.extend(parts)

    def send(self: Any, data: bytes) -> None:
        if getattr(batch, "dirty", None) is None or self._transport is None:
            orig_raw_send(self, data)
        else:
            send_parts(self, (data,))

    def force_close(self: Any, exc: Exception | None) -> None:
        flush(self)  # a DISCONNECT queued in this read goes out before the transport is dropped
        orig_force_close(self, exc)

    def recv_data(self: Any) -> None:
        outer = begin()
        if self._auth_complete and self._keepalive_timer is not None:
            self._fast_recv_at = self._loop.time()  # the timer re-arms itself from here when it fires
        else:
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
                end()

    orig_keepalive: Callable[[Any], None] = cls._keepalive_timer_callback

    def keepalive(self: Any) -> None:
        due: float = self._fast_recv_at + self._keepalive_interval
        if self._keepalive_interval and due > self._loop.time() + 0.001:  # input came after the timer was set
            self._keepalive_timer = self._loop.call_at(due, self._keepalive_timer_callback)
            return
        orig_keepalive(self)

    orig_send: Callable[..., None] = cls.send_packet
    orig_raw_send: Callable[[Any, bytes], None] = cls._send
    orig_force_close: Callable[[Any, Exception | None], None] = cls._force_close

    def cbc(self: Any) -> bool:
        cipher: bytes = self._enc_alg_cs if self.is_client() else self._enc_alg_sc
        return cipher.endswith(b"-cbc")

    def send_packet(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and self._fast_skip_ignore:
            self._fast_skip_ignore = False  # the one asyncssh inserts before the packet being sent: not for CTR/AEAD
            return
        if pkttype > MSG_KEX_LAST and self._send_encryption is not None:
            self._fast_skip_ignore = not cbc(self)
            try:
                orig_send(self, pkttype, *args, handler=handler)
            finally:
                self._fast_skip_ignore = False
            return
        orig_send(self, pkttype, *args, handler=handler)

    pad = _Padding()

    def send_data(self: Any, head: bytes, data: Any) -> bool:
        """One channel data packet, `head` (type, channel, [data type,] length) then `data`, sent as asyncssh's
        send_packet would send it; False (nothing sent) where asyncssh has more to do: a key exchange to start or in
        progress, compression, CBC's MSG_IGNORE, packet logging."""
        enc = self._send_encryption
        if (
            enc is None
            or not self._kex_complete
            or not self._auth_complete
            or self._compressor is not None
            or self._rekey_bytes_sent >= self._rekey_bytes
            or (self._rekey_seconds and time.monotonic() >= self._rekey_time)
            or self._logger._debug_level >= 3
            or cbc(self)
        ):
            return False
        blocksize: int = self._send_blocksize
        size = len(head) + len(data)
        padlen = -(self._send_enchdrlen + size) % blocksize
        if padlen < 4:
            padlen += blocksize
        pktlen = 1 + size + padlen
        hdr = pktlen.to_bytes(4, "big")
        packet = b"".join((padlen.to_bytes(1, "big"), head, data, pad.take(padlen)))
        seq: int = self._send_seq
        gcm = _aead(enc)
        if gcm is not None:
            cipher, aead = gcm
            parts = (hdr, aead.encrypt(cipher._iv, packet, hdr))  # ciphertext then tag: asyncssh's packet + mac
            cipher._update_iv()
        else:
            parts = enc.encrypt_packet(seq, hdr, packet)
        send_parts(self, parts)
        self._send_seq = (seq + 1) & 0xFFFFFFFF
        self._rekey_bytes_sent += pktlen
        return True

    orig_write: Callable[..., None] = chan_cls.write

    def write(self: Any, data: Any, datatype: int | None = None) -> None:
        # The relay's common case, sent at once: bytes that fit the peer's window on a channel with nothing queued,
        # cut at the peer's packet size. Everything else (and asyncssh's debug-level-2 line per write) is asyncssh's.
        n = len(data)
        conn: Any = self._conn
        if not (
            0 < n <= self._send_window
            and not self._send_buf
            and not self._send_paused
            and self._send_state == "open"
            and self._encoding is None
            and self._send_chan is not None
            and conn is not None
            and (datatype is None or datatype in self._write_datatypes)
            and self._logger._debug_level < 2
        ):
            orig_write(self, data, datatype)
            return
        pktsize: int = self._send_pktsize
        many = n > pktsize
        outer = many and begin()
        try:
            view = memoryview(data) if many else data
            for off in range(0, n, pktsize):
                chunk = view[off : off + pktsize] if many else data
                size = len(chunk)
                self._send_window -= size
                if datatype is None:
                    head = b"".join((b"\x5e", self._send_chan.to_bytes(4, "big"), size.to_bytes(4, "big")))
                    if not send_data(conn, head, chunk):
                        conn.send_packet(MSG_CHANNEL_DATA, UInt32(self._send_chan), String(bytes(chunk)), handler=self)
                else:
                    head = b"".join((b"\x5f", self._send_chan.to_bytes(4, "big"), datatype.to_bytes(4, "big"), size.to_bytes(4, "big")))
                    if not send_data(conn, head, chunk):
                        conn.send_packet(
                            MSG_CHANNEL_EXTENDED_DATA, UInt32(self._send_chan), UInt32(datatype), String(bytes(chunk)), handler=self
                        )
        finally:
            if outer:
                end()

    orig_newkeys: Callable[[Any, bytes, bytes], None] = cls.send_newkeys

    def send_newkeys(self: Any, k: bytes, h: bytes) -> None:
        used = (self._client_kexinit, self._server_kexinit)
        orig_newkeys(self, k, h)
        # The exchange hash was made. Sending NEWKEYS can start the next re-key (its KEXINIT replaces ours): keep that.
        if self._client_kexinit is used[0]:
            self._client_kexinit = b""
        if self._server_kexinit is used[1]:
            self._server_kexinit = b""
        if not self._can_send_ext_info:  # sent (or never to be sent): asyncssh reads it nowhere else
            self._extensions_to_send.clear()

    orig_cleanup: Callable[[Any, Exception | None], None] = cls._cleanup

    def cleanup(self: Any, exc: Exception | None) -> None:
        orig_cleanup(self, exc)
        self._recv_handler = _closed_recv  # its bound method made every closed connection a cycle (see the docstring)

    orig_log: Callable[..., None] = SSHPacketLogger._log_packet

    def log_packet(self: Any, *args: Any) -> None:
        if self.logger._debug_level >= 3:  # below, asyncssh's logger drops the line this would format
            orig_log(self, *args)

    chacha_cls: Any = chacha.ChachaCipher
    chacha_cls.encrypt_and_sign = _chacha_encrypt_and_sign
    chacha_cls.verify_and_decrypt = _chacha_verify_and_decrypt
    log_cls: Any = SSHPacketLogger
    log_cls._log_packet = log_packet
    chan_cls.write = write
    cls._fast_skip_ignore = False
    cls._fast_out = None
    cls._fast_recv_at = 0.0
    cls._send = send
    cls._force_close = force_close
    cls.send_packet = send_packet
    cls.send_newkeys = send_newkeys
    cls._cleanup = cleanup
    cls._keepalive_timer_callback = keepalive
    cls._fast_pos = 0  # class default: connections made before apply() (none, in the gateway) start at 0
    cls._recv_pkthdr = recv_pkthdr
    cls._recv_packet = recv_packet
    cls._recv_data = recv_data
    setattr(cls, _MARK, True)
    return True
