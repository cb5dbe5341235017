"""The WebSocket TCP tunnel: one WebSocket carries one TCP connection to an inventory address.

Binary messages carry bytes unchanged and in order. WebSockets cannot half-close, so the
helper sends a text message `{"type": "eof"}` when its local side has finished sending;
the gateway then half-closes the VM connection and keeps relaying the VM's answer until
the VM closes (within the rule's `half_close_timeout`), and then closes the WebSocket
(1000). The gateway keeps reading the WebSocket after the helper's EOF, so a helper that
goes away (or stops answering pings) ends the session at once. Backpressure both ways:
the next message is read only after the VM socket drained, and the next VM read waits
for the WebSocket send to drain.

The gateway may send text messages `{"type": "notice", "message": ...}` (a warning or an
operator's notice) that the helper prints.

Close codes the helper understands:
  1000 the VM closed normally;  4001 disconnected (by an operator, a limit, a restart;
  the reason is the notice);  4408 the VM did not finish after the helper's EOF;
  4502 the VM reset or failed mid-stream;  1009 a message over the size limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass
from functools import partial

from aiohttp import WSMsgType, web

from gateway.errors import BadRequest, GatewayError, UpstreamError
from gateway.kinds import Reason
from gateway.net.upstream import dial, reset
from gateway.policy import Grant, Policy, Principal
from gateway.protocols.lifecycle import end_if_crashed, ended_reason
from gateway.sessions.registry import Session

CLOSE_OPERATOR = 4001
CLOSE_HALF_CLOSE = 4408
CLOSE_VM_FAILED = 4502
_EOF = "eof"
_FLUSH_DEADLINE = 2.0
_READ = 256 * 1024


def close_reason(text: str) -> bytes:
    """A WebSocket close reason is at most 123 bytes of UTF-8."""
    raw = text.encode()
    while len(raw) > 123:
        text = text[:-1]
        raw = (text.rstrip() + "…").encode()
    return raw


def _refusal(status: int, error: str, message: str) -> web.Response:
    # The reason phrase carries the message too: a WebSocket client sees only status and phrase.
    phrase = message.encode("ascii", "replace").decode()[:200]
    return web.json_response({"error": error, "message": message}, status=status, reason=phrase)


@dataclass(frozen=True)
class TunnelRequest:
    """A tunnel the HTTPS door authenticated: who, to which VM name and port (as typed)."""

    principal: Principal
    vm: str
    port: int
    upgrade: bool = True  # False: a plain GET (the helper reading why it was refused) must dial nothing


class TunnelSide:
    """The user's end of a tunnel: an HTTP request that becomes a WebSocket once the VM is reached.

    `response` is what the door returns to aiohttp: a refusal, or the WebSocket.
    """

    def __init__(self, request: web.Request, *, max_message: int, ping_interval: float) -> None:
        self.request = request
        self.ws = web.WebSocketResponse(max_msg_size=max_message, heartbeat=ping_interval, compress=False)
        self.response: web.StreamResponse = _refusal(500, "internal_error", "the tunnel could not start")
        self._tasks: set[asyncio.Task[None]] = set()

    async def upgrade(self) -> None:
        await self.ws.prepare(self.request)
        self.response = self.ws

    def notice(self, text: str) -> bool:
        if not self.ws.prepared or self.ws.closed:
            return False
        task = asyncio.get_running_loop().create_task(self._send_notice(text), name="tunnel-notice")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _send_notice(self, text: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(json.dumps({"type": "notice", "message": text}))

    async def refuse(self, error: GatewayError) -> None:
        if self.ws.prepared:  # the VM refused after the upgrade
            await self.close(CLOSE_VM_FAILED, error.message)
            return
        if isinstance(error, UpstreamError):
            self.response = _refusal(502, error.reason, error.message)
        elif isinstance(error, BadRequest):
            self.response = _refusal(400, error.reason, error.message)
        else:
            self.response = _refusal(403, "forbidden", error.message)

    async def end(self, text: str) -> None:
        await self.close(CLOSE_OPERATOR, text)

    async def close(self, code: int, text: str) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.ws.prepared and not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.close(code=code, message=close_reason(text))


_MAX_CONTROL = 256  # a control message is `{"type":"eof"}`; anything longer is not one


def _control_kind(data: str) -> str | None:
    """The `type` of a control text message, or None. Bounded before parsing, so deep nesting cannot recurse."""
    if len(data) > _MAX_CONTROL:
        return None
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return None
    kind = body.get("type") if isinstance(body, dict) else None
    return kind if isinstance(kind, str) else None


class _TunnelRelay:
    def __init__(self, side: TunnelSide, writer: asyncio.StreamWriter, session: Session, tasks: list[asyncio.Task[None]]) -> None:
        self._side = side
        self._writer = writer
        self._session = session
        self._tasks = tasks

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        reason = self._session.reason
        if reason is Reason.VM_CLOSED:
            await self._side.close(1000, "the VM closed the connection")
        elif reason is Reason.VM_RESET:
            await self._side.close(CLOSE_VM_FAILED, "the VM reset the connection")
        elif reason is Reason.HALF_CLOSE_TIMEOUT:
            await self._side.close(CLOSE_HALF_CLOSE, "the VM did not finish after your end of the stream")
        else:
            await self._side.close(1000, "")
        # Flush to the VM after an orderly end; otherwise (or if the VM takes nothing more) abort, so a VM
        # that stopped reading never keeps the gateway's socket open with data queued for it.
        if reason in (Reason.CLIENT_CLOSED, Reason.VM_CLOSED):
            self._writer.close()
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(_FLUSH_DEADLINE):
                    await self._writer.wait_closed()
        reset(self._writer.transport)


class TunnelHandler:
    """Relays one WebSocket to one dialled VM socket."""

    kind = "tunnel"

    def __init__(self, connect_timeout: float) -> None:
        self._timeout = connect_timeout

    def authorize(self, policy: Policy, request: TunnelRequest) -> Grant:
        grant = policy.check_tunnel(request.principal, request.vm, request.port)
        if not request.upgrade:
            raise BadRequest("this endpoint needs a WebSocket upgrade (use `bastion tunnel`)", reason="upgrade_required")
        return grant

    async def connect(self, request: TunnelRequest, grant: Grant) -> socket.socket:
        return await dial(grant.vm.address, grant.port, self._timeout)

    def discard(self, upstream: socket.socket) -> None:
        upstream.close()

    async def serve(
        self, request: TunnelRequest, grant: Grant, upstream: socket.socket, client: TunnelSide, session: Session
    ) -> _TunnelRelay:
        try:
            reader, writer = await asyncio.open_connection(sock=upstream, limit=_READ)
        except OSError as exc:
            upstream.close()
            raise UpstreamError(f"cannot use the connection to VM {grant.vm.name!r}: {exc}") from None
        try:
            await client.upgrade()
        except BaseException:
            writer.transport.abort()
            raise
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._user_to_vm(client.ws, writer, session), name=f"tunnel-up:{session.id}"),
            loop.create_task(self._vm_to_user(client.ws, reader, session), name=f"tunnel-down:{session.id}"),
        ]
        for task in tasks:
            task.add_done_callback(partial(end_if_crashed, session))
        return _TunnelRelay(client, writer, session, tasks)

    async def _user_to_vm(self, ws: web.WebSocketResponse, writer: asyncio.StreamWriter, session: Session) -> None:
        """Reads the WebSocket for the whole session (also after the helper's EOF, so its departure is seen)."""
        eof = False
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    if eof:
                        session.end(Reason.CLIENT_ERROR)  # data after its own EOF: a broken helper
                        return
                    writer.write(msg.data)
                    session.add_up(len(msg.data))
                    await writer.drain()
                elif msg.type == WSMsgType.TEXT:
                    kind = _control_kind(msg.data)
                    if kind == _EOF and not eof:
                        eof = True
                        session.activity()
                        if writer.can_write_eof():
                            writer.write_eof()
                        session.half_closed("user")
                elif msg.type == WSMsgType.ERROR:
                    exc = ws.exception()
                    if isinstance(exc, TimeoutError):
                        session.end(Reason.CLIENT_SILENT)
                    else:
                        # e.g. a message over the size limit. aiohttp has usually dropped the connection
                        # already (the client sees 1006); when it has not, say why with the close code.
                        code = getattr(exc, "code", None)
                        session.end(Reason.CLIENT_ERROR)
                        with contextlib.suppress(ConnectionError, RuntimeError):
                            await ws.close(
                                code=int(code) if isinstance(code, int) and code >= 1000 else 1002,
                                message=close_reason(str(exc or "protocol error")),
                            )
                    return
        except (ConnectionError, OSError):
            session.end(Reason.VM_RESET)
            return
        # 4499: the helper's local connection was reset. Any other non-normal code: the helper went away badly.
        session.end(Reason.CLIENT_CLOSED if ws.close_code in (1000, 1001) else Reason.CLIENT_LOST)

    async def _vm_to_user(self, ws: web.WebSocketResponse, reader: asyncio.StreamReader, session: Session) -> None:
        try:
            while data := await reader.read(_READ):
                await ws.send_bytes(data)
                session.add_down(len(data))
        except BrokenPipeError:
            session.end(Reason.CLIENT_CLOSED)
            return
        except OSError as exc:  # a reset, or the kernel's keepalive giving up on a vanished VM (vm_silent)
            session.end(Reason.CLIENT_CLOSED if ws.closed else ended_reason(exc, user=False))
            return
        # The VM finished. If the helper had sent its EOF first, the user ended the stream and the VM followed.
        session.end(Reason.CLIENT_CLOSED if session.half_closed_side == "user" else Reason.VM_CLOSED)
