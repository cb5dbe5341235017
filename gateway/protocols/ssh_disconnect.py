"""Ending a user's SSH session so that the user actually reads why.

asyncssh's public `disconnect()` closes every channel first; the OpenSSH
client then usually exits before it reads the DISCONNECT text. What works:
write the notice into the channel, let it drain, then send the SSH DISCONNECT
with the reason while the channels are still open, let that flush, and drop
the transport. OpenSSH prints `Received disconnect from HOST port PORT:11:
REASON`. This needs asyncssh internals (`_send_disconnect`, `_transport`,
`_channels`, `_force_close`): the version is pinned in pyproject.toml and the
behaviour is covered by tests that read what a real `ssh` prints.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncssh

# OpenSSH shows at most this many characters of a DISCONNECT reason.
MAX_REASON = 400
_DRAIN_LIMIT = 2.0
_SETTLE = 0.5


async def _drained(probe: Any, limit: float) -> None:
    """Wait until `probe()` reports an empty buffer, at most `limit` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit):
            # Neither asyncssh channels nor transports signal "buffer empty"; poll, bounded.
            while probe() > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.02)


async def disconnect_with_notice(
    chan: asyncssh.SSHServerChannel[bytes] | asyncssh.SSHTCPChannel[bytes] | None,
    text: str | None,
    *,
    pty: bool,
) -> None:
    """Show `text` on the channel (stdout with a PTY, else stderr), then end the session.

    If the channel is the connection's last, the whole connection ends with an
    SSH DISCONNECT carrying `text` (so jump users, who see no channel text, read
    it too). Otherwise only this channel is closed, so the user's other
    channels (forwards, multiplexed sessions) keep working. Never raises for a
    connection that is already gone.
    """
    if chan is None:
        return
    conn = chan.get_extra_info("connection")
    if text and isinstance(chan, asyncssh.SSHServerChannel):
        with contextlib.suppress(asyncssh.Error, OSError, RuntimeError, BrokenPipeError):
            data = f"\r\n{text}\r\n".encode()
            if pty:
                chan.write(data)
            else:
                chan.write(data, asyncssh.EXTENDED_DATA_STDERR)
            await _drained(chan.get_write_buffer_size, _DRAIN_LIMIT)
            await asyncio.sleep(_SETTLE)
    channels = getattr(conn, "_channels", {})
    transport = getattr(conn, "_transport", None)
    if conn is None or transport is None or len(channels) > 1:
        chan.close()
        return
    await disconnect_connection(conn, text)


async def disconnect_connection(conn: Any, text: str | None) -> None:
    """End a whole SSH connection with a DISCONNECT carrying `text`, flushed (bounded) before the transport drops."""
    transport = getattr(conn, "_transport", None)
    if transport is None:
        return
    reason = (text or "Disconnected by the gateway")[:MAX_REASON]
    with contextlib.suppress(asyncssh.Error, OSError, RuntimeError):
        conn._send_disconnect(asyncssh.DISC_BY_APPLICATION, reason, "en-US")
        await _drained(transport.get_write_buffer_size, _DRAIN_LIMIT)
    conn._force_close(None)
