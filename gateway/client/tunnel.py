"""`bastion tunnel`: a local port whose every connection becomes one WebSocket tunnel through the gateway.

Runs on the user's machine. Each accepted local connection opens
`wss://GATEWAY/v1/tunnel?vm=VM&port=N` with a bearer token, then relays bytes both
ways with backpressure. When the local side stops sending, the helper sends
`{"type": "eof"}` (WebSockets cannot half-close) and keeps delivering the VM's answer.
A local connection that resets is passed on: the WebSocket closes with 4499, so the
gateway ends the session at once instead of waiting on the VM. Notices the gateway
sends (`{"type": "notice"}`: a warning before a limit or a disconnect) are printed; a
close with code 4001 is a disconnect (by an operator, a limit or a restart): its
reason is printed. `check()` asks the gateway, before anything is relayed, whether it grants
the tunnel at all (`bastion rdp` does, before it starts the RDP client).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import urlencode

import aiohttp

CLOSE_OPERATOR = 4001
CLOSE_HALF_CLOSE = 4408
CLOSE_LOCAL_RESET = 4499
CLOSE_VM_FAILED = 4502
_READ = 256 * 1024


class TunnelError(Exception):
    pass


class _LocalReset(Exception):
    """The local connection broke (RST) while the helper read from it."""


@dataclass
class TokenSource:
    """A fixed token, or one fetched with `ssh ... USER@HOST token` and reused until it nears expiry."""

    fixed: str | None = field(default=None, repr=False)
    ssh_argv: list[str] = field(default_factory=list)
    lifetime_hint: float = 540.0
    _cached: str | None = field(default=None, repr=False)
    _fetched_at: float = 0.0

    async def get(self, *, fresh: bool = False) -> str:
        if self.fixed:
            return self.fixed
        if not fresh and self._cached and time.monotonic() - self._fetched_at < self.lifetime_hint:
            return self._cached
        proc = await asyncio.create_subprocess_exec(
            *self.ssh_argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(60):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise TunnelError(f"`{shlex.join(self.ssh_argv)}` did not answer within 60 s") from None
        token = out.decode().strip()
        if proc.returncode != 0 or not token:
            why = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
            if "Host key verification failed" in why and "-F" in self.ssh_argv:
                why += " (name the config's Host alias for the gateway with --ssh-host)"
            raise TunnelError(f"could not get a token with `{shlex.join(self.ssh_argv)}`: {why}")
        self._cached, self._fetched_at = token, time.monotonic()
        return token


class Tunnel:
    """Listens on `local`; owns one task per local connection."""

    def __init__(
        self,
        gateway: str,
        vm: str,
        port: int,
        tokens: TokenSource,
        *,
        ca_file: str | None = None,
        insecure: bool = False,
        out: TextIO = sys.stderr,
        max_message: int = 1024 * 1024,
    ) -> None:
        self.url = f"wss://{gateway}/v1/tunnel?{urlencode({'vm': vm, 'port': port})}"
        self._tokens = tokens
        self._out = out
        self._max_message = max_message
        if insecure:
            self._ssl: ssl.SSLContext | bool = False
        else:
            self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._http: aiohttp.ClientSession | None = None

    def say(self, text: str) -> None:
        print(f"bastion tunnel: {text}", file=self._out, flush=True)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=15, sock_connect=15))
        return self._http

    async def check(self) -> None:
        """Whether the gateway would open this tunnel, asked without opening one (nothing is dialled).

        Gets a token as the tunnel would (fresh once if the cached one is refused as expired), then sends the
        tunnel request without the upgrade: every check comes before the upgrade, so the gateway answers
        `400 upgrade_required` exactly when it grants the tunnel. Raises TunnelError with the gateway's reason.
        """
        url = "https://" + self.url.removeprefix("wss://")
        for attempt in (1, 2):
            token = await self._tokens.get(fresh=attempt == 2)
            try:
                async with (
                    asyncio.timeout(30),
                    self._session().get(url, headers={"Authorization": f"Bearer {token}"}, ssl=self._ssl) as resp,
                ):
                    body = await resp.json(content_type=None)
                    status = resp.status
            except aiohttp.ClientConnectorCertificateError as exc:
                raise TunnelError(f"cannot verify the gateway's certificate ({exc.certificate_error}); pass --ca-file") from None
            except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
                raise TunnelError(f"cannot ask the gateway at {url.split('/v1/')[0]}: {exc or type(exc).__name__}") from None
            error = body.get("error") if isinstance(body, dict) else None
            if status == 400 and error == "upgrade_required":
                return
            if status == 401 and attempt == 1 and not self._tokens.fixed:
                continue
            message = body.get("message") if isinstance(body, dict) else None
            raise TunnelError(f"the gateway refused the tunnel ({status}): {message or error or 'no reason given'}")

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._session()
        self._server = await asyncio.start_server(self._accept, host, port, limit=_READ)
        addr = self._server.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except (TunnelError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.say(str(exc) or type(exc).__name__)
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        assert self._http is not None
        for attempt in (1, 2):
            token = await self._tokens.get(fresh=attempt == 2)
            try:
                return await self._http.ws_connect(
                    self.url,
                    headers={"Authorization": f"Bearer {token}"},
                    ssl=self._ssl,
                    max_msg_size=self._max_message,
                    heartbeat=30.0,
                    compress=0,
                )
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401 and attempt == 1 and not self._tokens.fixed:
                    continue  # the cached token expired: fetch a fresh one once
                why = await self._explain(token)
                raise TunnelError(f"the gateway refused the tunnel ({exc.status}): {why or exc.message}") from None
            except aiohttp.ClientConnectorCertificateError as exc:
                raise TunnelError(f"cannot verify the gateway's certificate ({exc.certificate_error}); pass --ca-file") from None
        raise TunnelError("unreachable")

    async def _explain(self, token: str) -> str:
        """A WebSocket client sees only the refusal's status; ask again without upgrading to read why.

        The gateway makes every check before it dials, so a refused request dials nothing either time.
        """
        assert self._http is not None
        url = "https://" + self.url.removeprefix("wss://")
        try:
            async with self._http.get(url, headers={"Authorization": f"Bearer {token}"}, ssl=self._ssl) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, ValueError, TimeoutError):
            return ""
        return str(body.get("message", "")) if isinstance(body, dict) else ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ws = await self._connect()
        up = asyncio.create_task(self._local_to_ws(reader, ws), name="tunnel-local-to-ws")
        down = asyncio.create_task(self._ws_to_local(ws, writer), name="tunnel-ws-to-local")
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if not down.done() and up.done() and not up.cancelled() and isinstance(up.exception(), _LocalReset):
                # The local connection broke (reset): tell the gateway, which ends the session now.
                with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):
                    await ws.close(code=CLOSE_LOCAL_RESET, message=b"the local connection was reset")
                writer.transport.abort()
                return
            code, reason = await down
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            await ws.close()
        if code == CLOSE_OPERATOR:
            text = reason or "You have been disconnected."
            if not text.startswith("You have been disconnected."):
                text = f"You have been disconnected. {text}"
            self.say(text)
            writer.transport.abort()
        elif code == CLOSE_HALF_CLOSE:
            self.say(f"the gateway ended the connection: {reason}")
            writer.transport.abort()
        elif code == CLOSE_VM_FAILED or (code not in (1000, None)):
            self.say(f"the tunnel ended with an error ({code}): {reason}")
            writer.transport.abort()
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _local_to_ws(self, reader: asyncio.StreamReader, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Local bytes to the gateway, then `eof`. Raises _LocalReset when the local connection broke.

        A WebSocket that fails to send is left to `_ws_to_local`, which reads how it ended.
        """
        with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):
            while True:
                try:
                    data = await reader.read(_READ)
                except OSError as exc:
                    raise _LocalReset(str(exc)) from None
                if not data:
                    break
                await ws.send_bytes(data)
            await ws.send_str('{"type":"eof"}')
        # Stay alive until the WebSocket ends, so only a broken local side ends this task early.
        await asyncio.Event().wait()

    async def _ws_to_local(self, ws: aiohttp.ClientWebSocketResponse, writer: asyncio.StreamWriter) -> tuple[int | None, str]:
        """Relay until the WebSocket closes; returns the close code and reason from the CLOSE message."""
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                writer.write(msg.data)
                await writer.drain()
            elif msg.type == aiohttp.WSMsgType.TEXT:
                self._notice(msg.data)
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                return int(msg.data), str(msg.extra or "")
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return ws.close_code, ""
            elif msg.type == aiohttp.WSMsgType.ERROR:
                return None, str(ws.exception() or "WebSocket error")

    def _notice(self, data: str) -> None:
        try:
            body = json.loads(data)
        except ValueError:
            return
        if isinstance(body, dict) and body.get("type") == "notice" and isinstance(body.get("message"), str):
            self.say(" ".join(body["message"].split())[:400])


async def run_tunnel(
    stop: asyncio.Event, tunnel: Tunnel, local: tuple[str, int], on_ready: Callable[[str, int], Awaitable[None]] | None = None
) -> int:
    try:
        host, port = await tunnel.start(*local)
    except OSError as exc:
        tunnel.say(f"cannot listen on {local[0]}:{local[1]}: {exc.strerror}")
        return 1
    tunnel.say(f"listening on {host}:{port} -> {tunnel.url}")
    try:
        if on_ready is not None:
            await on_ready(host, port)
        else:
            await stop.wait()
    finally:
        await tunnel.stop()
    return 0
