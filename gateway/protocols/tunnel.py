"""The WebSocket TCP tunnel: one WebSocket carries one TCP connection to an inventory address.

Binary messages carry bytes unchanged and in order. WebSockets cannot half-close, so the
helper sends a text message `{"type": "eof"}` when its local side has finished sending;
the gateway then half-closes the VM connection and keeps relaying the VM's answer until
the VM closes, and then closes the WebSocket (1000). Backpressure both ways: the next
message is read only after the VM socket drained, and the next VM read waits for the
WebSocket send to drain.

Close codes the helper understands:
  1000 the VM closed normally;  4001 disconnected by an operator (reason: the notice);
  4502 the VM reset or failed mid-stream;  1009 a message over the size limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

from aiohttp import WSMsgType, web
from structlog.typing import FilteringBoundLogger

from gateway.policy import Grant
from gateway.protocols.base import Client, session_spec
from gateway.protocols.ssh_disconnect import notice_text
from gateway.sessions.registry import Session, SessionRegistry

CLOSE_OPERATOR = 4001
CLOSE_VM_FAILED = 4502
_EOF = "eof"
_READ = 256 * 1024


def close_reason(text: str) -> bytes:
    """A WebSocket close reason is at most 123 bytes of UTF-8."""
    raw = text.encode()
    while len(raw) > 123:
        text = text[:-1]
        raw = (text.rstrip() + "…").encode()
    return raw


class TunnelHandler:
    """Relays one WebSocket to one dialled VM socket, as a registry session."""

    kind = "tunnel"

    def __init__(self, registry: SessionRegistry, log: FilteringBoundLogger) -> None:
        self._registry = registry
        self._log = log

    async def serve(self, ws: web.WebSocketResponse, sock: socket.socket, grant: Grant, client: Client) -> None:
        """Own `sock` and `ws` until the tunnel ends. Cancellation propagates after both are closed."""
        vm = grant.vm
        spec = session_spec(client, vm, grant.port, grant.protocol)
        reader, writer = await asyncio.open_connection(sock=sock, limit=_READ)
        ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def finish(reason: str) -> None:
            if not ended.done():
                ended.set_result(reason)

        async def terminate(reason: str, grace: float) -> None:
            # A tunnel has no terminal for a warning; the grace period only delays the end.
            if grace > 0:
                asyncio.get_running_loop().call_later(grace, finish, reason)
            else:
                finish(reason)

        try:
            async with self._registry.open(spec, terminate=terminate) as session:
                up = asyncio.create_task(self._user_to_vm(ws, writer, session), name=f"tunnel-up:{session.id}")
                down = asyncio.create_task(self._vm_to_user(ws, reader, session), name=f"tunnel-down:{session.id}")
                try:
                    watched: set[asyncio.Future[Any]] = {up, down, ended}
                    while True:
                        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                        if ended in done:
                            session.close_reason = "terminated_by_operator"
                            await ws.close(code=CLOSE_OPERATOR, message=close_reason(notice_text(ended.result())))
                            break
                        if down in done:
                            session.close_reason = down.result()
                            break
                        if up in done:
                            outcome = up.result()
                            if outcome != _EOF:  # the user went away: nothing more to deliver
                                session.close_reason = outcome
                                break
                            watched.discard(up)  # half-closed: keep relaying the VM's answer
                finally:
                    for t in (up, down):
                        t.cancel()
                    await asyncio.gather(up, down, return_exceptions=True)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if not ws.closed:
                await ws.close()

    async def _user_to_vm(self, ws: web.WebSocketResponse, writer: asyncio.StreamWriter, session: Session) -> str:
        """Returns `eof` when the user half-closed, else why the user side ended."""
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                writer.write(msg.data)
                session.add_up(len(msg.data))
                await writer.drain()
            elif msg.type == WSMsgType.TEXT:
                try:
                    kind = json.loads(msg.data).get("type")
                except (ValueError, AttributeError):
                    kind = None
                if kind == _EOF:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return _EOF
            elif msg.type == WSMsgType.ERROR:
                exc = ws.exception()
                code = getattr(exc, "code", None)
                # e.g. a message over the size limit. aiohttp has usually dropped the connection
                # already (the client sees 1006); when it has not, say why with the close code.
                await ws.close(
                    code=int(code) if isinstance(code, int) and code >= 1000 else 1002, message=close_reason(str(exc or "protocol error"))
                )
                return "client_error"
        return "client_closed"

    async def _vm_to_user(self, ws: web.WebSocketResponse, reader: asyncio.StreamReader, session: Session) -> str:
        try:
            while data := await reader.read(_READ):
                await ws.send_bytes(data)
                session.add_down(len(data))
        except (ConnectionResetError, BrokenPipeError, OSError) as exc:
            if not ws.closed:
                await ws.close(code=CLOSE_VM_FAILED, message=close_reason(f"the VM reset the connection: {exc.strerror or exc}"))
            return "vm_reset"
        if not ws.closed:
            await ws.close(code=1000, message=b"the VM closed the connection")
        return "vm_closed"
