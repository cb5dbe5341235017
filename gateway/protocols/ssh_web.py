"""The browser terminal: one WebSocket carries one PTY shell on a VM, logged in to by the gateway.

The web door authenticated the browser (its session cookie) and checked the Origin. Here: the policy check
(an `ssh` rule grants the VM and the login, as for `ssh USER+VM`), the login to the VM with the gateway's
credential, a PTY of the browser's size, and the relay. Binary messages carry terminal bytes both ways;
text messages are small JSON controls: from the browser `{"type":"resize","cols":C,"rows":R}`, from the
gateway `{"type":"notice","message":...}` (a banner) and `{"type":"ended","message":...,"reason":...}` just
before it closes, so the page can show why the terminal stopped. Backpressure: a browser that stops reading
pauses the VM channel (the WebSocket send is awaited before the next VM bytes go out).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from functools import partial

import asyncssh
from aiohttp import WSMsgType, web

from gateway.config import DEFAULT_VM_CIPHERS
from gateway.errors import GatewayError
from gateway.kinds import Reason
from gateway.policy import Grant, Policy, Principal
from gateway.protocols.lifecycle import end_if_crashed, ended_reason
from gateway.protocols.upstream_ssh import ClientOptions, Credentials, HostKeys, connect_vm
from gateway.sessions.registry import Session

CLOSE_ENDED = 4001  # the gateway ended the session (operator, limit, lock, restart): the reason was sent first
CLOSE_REFUSED = 4403  # refused before the shell started
MAX_COLS, MAX_ROWS = 1000, 500
_MAX_CONTROL = 256
_QUEUE_HIGH = 1 << 20  # bytes from the VM waiting for the browser before the VM channel is paused


@dataclass(frozen=True)
class WebTerminalRequest:
    principal: Principal
    vm: str
    login: str | None
    cols: int
    rows: int


def terminal_size(cols: str, rows: str) -> tuple[int, int] | None:
    """A PTY size from the query string (ASCII digits only), or None."""
    if not (cols.isascii() and cols.isdigit() and rows.isascii() and rows.isdigit()) or len(cols) > 4 or len(rows) > 4:
        return None
    c, r = int(cols), int(rows)
    return (c, r) if 1 <= c <= MAX_COLS and 1 <= r <= MAX_ROWS else None


class WebTerminalSide:
    """The browser's end: an HTTP request that becomes a WebSocket once the VM shell is open."""

    def __init__(self, request: web.Request, *, ping_interval: float, max_message: int) -> None:
        self.request = request
        self.ws = web.WebSocketResponse(heartbeat=ping_interval, max_msg_size=max_message, compress=False)
        self.response: web.StreamResponse = web.json_response(
            {"error": "internal_error", "message": "the terminal could not start"}, status=500
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def upgrade(self) -> None:
        await self.ws.prepare(self.request)
        self.response = self.ws

    def _send_later(self, payload: dict[str, str]) -> bool:
        if not self.ws.prepared or self.ws.closed:
            return False
        task = asyncio.get_running_loop().create_task(self._send(payload), name="web-terminal-control")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _send(self, payload: dict[str, str]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(json.dumps(payload))

    def notice(self, text: str) -> bool:
        return self._send_later({"type": "notice", "message": text})

    async def refuse(self, error: GatewayError) -> None:
        if self.ws.prepared:
            await self.close(CLOSE_REFUSED, error.message, error.reason)
            return
        status = 502 if error.reason.startswith("upstream") else 403
        self.response = web.json_response({"error": error.reason, "message": error.message}, status=status)

    async def end(self, text: str) -> None:
        await self.close(CLOSE_ENDED, text, "ended")

    async def close(self, code: int, text: str, reason: str) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.ws.prepared and not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                if text:  # in the terminal itself too, where it stays in the scrollback
                    await self.ws.send_bytes(f"\r\n\x1b[1m{text}\x1b[0m\r\n".encode())
                await self.ws.send_str(json.dumps({"type": "ended", "message": text, "reason": reason}))
                await self.ws.close(code=code, message=b"")


class _VMShell(asyncssh.SSHClientSession[bytes]):
    """The PTY shell on the VM: its output is queued for the browser; its end ends the session."""

    def __init__(self, session: Session, queue: asyncio.Queue[bytes | None]) -> None:
        self._session = session
        self._queue = queue
        self._queued = 0
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._queue.put_nowait(data)
        self._queued += len(data)
        if self._queued > _QUEUE_HIGH and self.chan is not None:
            self.chan.pause_reading()

    def taken(self, n: int) -> None:
        self._queued -= n
        if self._queued <= _QUEUE_HIGH // 2 and self.chan is not None:
            self.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._session.end(ended_reason(exc, user=False))
        self._queue.put_nowait(None)


class _WebRelay:
    def __init__(
        self, conn: asyncssh.SSHClientConnection, tasks: list[asyncio.Task[None]], side: WebTerminalSide, session: Session
    ) -> None:
        self._conn = conn
        self._tasks = tasks
        self._side = side
        self._session = session

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session.reason in (Reason.VM_CLOSED, Reason.VM_RESET, Reason.VM_SILENT):
            await self._side.close(1000, "The shell on the VM ended.", str(self._session.reason))
        elif not self._side.ws.closed:
            await self._side.close(1000, "", str(self._session.reason or ""))
        self._conn.close()


class SSHWebHandler:
    """Logs in to the VM for a browser terminal and relays the PTY."""

    kind = "ssh-web"

    def __init__(
        self,
        credentials: Credentials,
        host_keys: HostKeys,
        connect_timeout: float,
        *,
        keepalive: tuple[float, int],
        ciphers: tuple[str, ...] = DEFAULT_VM_CIPHERS,
    ) -> None:
        self._credentials = credentials
        self._host_keys = host_keys
        self._timeout = connect_timeout
        self._keepalive = keepalive
        self._ciphers = ciphers
        self._options = ClientOptions()  # the VM logins' prepared asyncssh options, shared by their connections

    def authorize(self, policy: Policy, request: WebTerminalRequest) -> Grant:
        return policy.check_web_terminal(request.principal, request.vm, request.login)

    async def connect(self, request: WebTerminalRequest, grant: Grant) -> asyncssh.SSHClientConnection:
        assert grant.login is not None
        return await connect_vm(
            grant.vm,
            grant.login,
            self._credentials,
            self._host_keys,
            self._timeout,
            keepalive=self._keepalive,
            ciphers=self._ciphers,
            options=self._options,
        )

    def discard(self, upstream: asyncssh.SSHClientConnection) -> None:
        upstream.close()

    async def serve(
        self, request: WebTerminalRequest, grant: Grant, upstream: asyncssh.SSHClientConnection, client: WebTerminalSide, session: Session
    ) -> _WebRelay:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        shell = _VMShell(session, queue)
        try:
            chan, _ = await upstream.create_session(
                lambda: shell,
                term_type="xterm-256color",
                term_size=(request.cols, request.rows),
                env={"LANG": "C.UTF-8"},
                encoding=None,
            )
        except (asyncssh.Error, OSError) as exc:
            upstream.close()
            raise GatewayError(f"VM {grant.vm.name!r} refused the shell: {exc}", reason="upstream_refused") from None
        try:
            await client.upgrade()
        except BaseException:
            upstream.close()
            raise
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._browser_to_vm(client.ws, chan, session), name=f"web-up:{session.id}"),
            loop.create_task(self._vm_to_browser(client.ws, shell, queue, session), name=f"web-down:{session.id}"),
        ]
        for task in tasks:
            task.add_done_callback(partial(end_if_crashed, session))
        return _WebRelay(upstream, tasks, client, session)

    async def _browser_to_vm(self, ws: web.WebSocketResponse, chan: asyncssh.SSHClientChannel[bytes], session: Session) -> None:
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    chan.write(msg.data)
                    session.add_up(len(msg.data))
                elif msg.type == WSMsgType.TEXT and len(msg.data) <= _MAX_CONTROL:
                    size = _resize(msg.data)
                    if size is not None:
                        session.activity()
                        chan.change_terminal_size(*size)
                elif msg.type == WSMsgType.ERROR:
                    session.end(Reason.CLIENT_SILENT if isinstance(ws.exception(), TimeoutError) else Reason.CLIENT_ERROR)
                    return
        except (ConnectionError, OSError, asyncssh.Error):
            session.end(Reason.CLIENT_LOST)
            return
        session.end(Reason.CLIENT_CLOSED if ws.close_code in (1000, 1001) else Reason.CLIENT_LOST)

    async def _vm_to_browser(
        self, ws: web.WebSocketResponse, shell: _VMShell, queue: asyncio.Queue[bytes | None], session: Session
    ) -> None:
        try:
            while (data := await queue.get()) is not None:
                await ws.send_bytes(data)
                shell.taken(len(data))
                session.add_down(len(data))
        except (ConnectionError, RuntimeError):
            session.end(Reason.CLIENT_LOST)


def _resize(text: str) -> tuple[int, int] | None:
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict) or body.get("type") != "resize":
        return None
    cols, rows = body.get("cols"), body.get("rows")
    if type(cols) is int and type(rows) is int and 1 <= cols <= MAX_COLS and 1 <= rows <= MAX_ROWS:  # not bool
        return cols, rows
    return None
