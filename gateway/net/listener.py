"""Accept on the public port, peek at the first bytes, hand the socket to a door.

The listener imports no door: `app.py` registers one handler per `Door`.
Peeking never consumes, so the door sees the connection from its first byte.

Before anything else costs CPU or memory, each accepted connection is admitted or closed at once: a source serving
a penalty (`net.penalties`), a source holding `max_per_source` connections already, or a listener holding
`max_connections` (kept below the fd limit, so a flood cannot starve logins and the control port of fds). A
connection is held from accept until its door's handler returns; refusals are counted and logged rate-limited.

Behind a load balancer (`public.proxy_protocol_from`), a connection from a balancer must start with a PROXY protocol
header (`net.proxy`), read (consumed) within the detect deadline before anything else: only the global cap applies at
accept, and the penalty and per-source checks run after the header, on the client address it names, which is then
the `peer` every door sees. A PROXY header from anyone else is never parsed: detection sees unknown bytes and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import ipaddress
import resource
import socket
import struct
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from gateway.config import ListenAddress
from gateway.errors import StartupError
from gateway.kinds import Refusal
from gateway.net.detect import Door, classify
from gateway.net.proxy import MAX_HEADER, ProxyError, ProxyHeader, header_length, looks_like_proxy, parse
from gateway.net.ratelog import RateLimitedLog
from gateway.net.startups import source_key

DoorHandler = Callable[[socket.socket, tuple[str, int]], Awaitable[None]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_PEEK = 8
# What a plain-HTTP request gets on a port that speaks SSH and TLS only, before the close.
PLAIN_HTTP_TEXT = "This port speaks SSH and HTTPS (TLS); use https:// or ssh."
_PLAIN_HTTP_ANSWER = (
    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    f"Content-Length: {len(PLAIN_HTTP_TEXT) + 1}\r\nConnection: close\r\n\r\n{PLAIN_HTTP_TEXT}\n"
).encode()
_PLAIN_HTTP_DEADLINE = 2.0  # seconds to send the answer and read what the client still sends
_PLAIN_HTTP_READ = 64 * 1024  # read (and drop) at most this much, so the close is not a reset over unread bytes


class ConnectionObserver(Protocol):
    """Told about connections closed before any protocol ran (metrics implement this)."""

    def connection_refused(self, listener: str, reason: Refusal) -> None: ...


class PenaltyCheck(Protocol):
    def refused(self, address: str) -> float | None:
        """Seconds `address`'s source is still refused for, or None."""
        ...


@dataclass(frozen=True)
class Caps:
    """Connections a listener holds at once, in all and per source (an IPv4 address or an IPv6 /64)."""

    total: int
    per_source: int


FD_RESERVE = 64  # fds kept for the listening sockets, logs, host keys, the control port and dials in flight
_MAX_DERIVED = 100_000


def default_max_connections(soft_limit: int | None = None) -> int:
    """`public.max_connections` when not configured: half the fds left after a reserve, so that every held
    connection can also have its one connection to a VM open (`RLIMIT_NOFILE`'s soft limit if not given)."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY or soft_limit < 0:
        return _MAX_DERIVED
    return max(1, min(_MAX_DERIVED, (soft_limit - FD_RESERVE) // 2))


def bind(address: ListenAddress, backlog: int = 1024, *, reuse_port: bool = False) -> socket.socket:
    """Bind and listen. Raises StartupError with the address and the OS reason."""
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        what = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" if exc.errno == errno.EACCES else ""
        raise StartupError(f"cannot listen on {address}: {what}{hint}") from None
    return sock


SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h
_SKF_NET_OFF = -0x100000  # classic BPF: offsets from the network header


def _by_source_program(count: int) -> bytes:
    """Classic BPF for a SO_REUSEPORT group: the socket index is the client's address modulo `count` (IPv4: the
    whole address; IPv6: bits 32-63, inside its /64), so a client always reaches the same worker."""

    def ins(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)

    ld_b, ld_w, rsh, jeq, ja, mod, ret_a = 0x30, 0x20, 0x74, 0x15, 0x05, 0x94, 0x16
    return b"".join([
        ins(ld_b, 0, 0, _SKF_NET_OFF),  # first byte of the IP header
        ins(rsh, 0, 0, 4),  # its version
        ins(jeq, 0, 2, 4),
        ins(ld_w, 0, 0, _SKF_NET_OFF + 12),  # IPv4 source address
        ins(ja, 0, 0, 1),
        ins(ld_w, 0, 0, _SKF_NET_OFF + 12),  # IPv6: source address bytes 4-7
        ins(mod, 0, 0, count),
        ins(ret_a, 0, 0, 0),
    ])  # fmt: skip


def bind_group(address: ListenAddress, count: int, backlog: int = 1024) -> list[socket.socket]:
    """`count` listening sockets on one address (SO_REUSEPORT), one per worker, with the kernel choosing the
    socket by the client's address (`_by_source_program`). Raises StartupError with the address and the OS reason."""
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            port = group[0].getsockname()[1] if group else address.port  # port 0: every socket on the first one's port
            group.append(bind(ListenAddress(address.host, port), backlog, reuse_port=True))
        if count > 1:
            program = ctypes.create_string_buffer(_by_source_program(count))
            fprog = struct.pack("HL", len(program.raw) // 8, ctypes.addressof(program))
            group[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        for s in group:
            s.close()
        raise StartupError(f"cannot share {address} between workers: {exc.strerror or exc}") from None
    except StartupError:
        for s in group:
            s.close()
        raise
    return group


async def peek_door(sock: socket.socket, deadline: float) -> Door:
    """Wait for the first bytes and classify them without consuming them.

    Silence until `deadline` seconds means SSH (the server speaks first).
    A closed connection or unknown bytes give Door.UNKNOWN.

    After a partial prefix (`S`, a lone TLS record byte) the socket stays readable with the same bytes, so
    instead of re-peeking on a timer (a connection sending one byte cost the loop a wake-up every 10 ms) the
    socket's SO_RCVLOWAT is raised past what is there: the kernel wakes us only when more bytes (or a FIN)
    arrive. It is back to 1 before the socket is handed on.
    """
    try:
        async with asyncio.timeout(deadline), contextlib.aclosing(_peeks(sock, _PEEK)) as peeks:
            async for data in peeks:
                if not data:
                    return Door.UNKNOWN
                door = classify(data)
                if door is not Door.NEED_MORE:
                    return door
                if len(data) >= _PEEK:
                    return Door.UNKNOWN
    except TimeoutError:
        # One more look before calling it silence: when this loop was held up past the deadline (a loaded box, a
        # long collection), the bytes may have arrived meanwhile, and the timer fires before their wake-up runs. A
        # TLS client judged silent here would be sent the SSH banner.
        try:
            data = sock.recv(_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return Door.SSH
        except OSError:
            return Door.UNKNOWN
        if not data:
            return Door.UNKNOWN
        door = classify(data)
        return Door.SSH if door is Door.NEED_MORE else door
    except OSError:
        return Door.UNKNOWN
    return Door.UNKNOWN


async def _peeks(sock: socket.socket, size: int, want: Callable[[bytes], int] | None = None) -> AsyncGenerator[bytes, None]:
    """What is queued on `sock` (peeked, never consumed), again each time more arrives; b"" once the peer closed.

    Between two looks SO_RCVLOWAT is raised past what was seen (or to `want(data)`, the length the caller needs), so
    the kernel wakes us only for new bytes or a FIN, not for the same partial prefix every loop turn. It is back to 1
    when the generator closes (use `contextlib.aclosing`). Raises OSError from recv.
    """
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    raised = False
    try:
        while True:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            try:
                data = sock.recv(size, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            yield data
            if not data:
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, (want(data) if want else 0) or len(data) + 1)
            raised = True
    finally:
        if raised:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _peek_proxy(sock: socket.socket) -> bool:
    """Whether the bytes detection refused look like the start of a PROXY header (for the refusal's reason)."""
    try:
        return looks_like_proxy(sock.recv(16, socket.MSG_PEEK))
    except OSError:
        return False


async def read_proxy_header(sock: socket.socket, deadline: float) -> ProxyHeader:
    """Consume exactly one PROXY header (v1 or v2) from the start of `sock` within `deadline` seconds.

    Peeks to learn the header's length (a v1 header ends at its CRLF), then reads exactly that many bytes, so the
    next peek sees the client's first byte. Like `peek_door`, a partial header raises SO_RCVLOWAT past what is there
    instead of re-peeking on a timer. Raises ProxyError (`proxy_timeout`, `proxy_closed` or the parser's reason).
    """
    try:
        async with asyncio.timeout(deadline), contextlib.aclosing(_peeks(sock, MAX_HEADER, lambda d: header_length(d) or 0)) as peeks:
            async for data in peeks:
                if not data:
                    raise ProxyError("connection closed before its PROXY header", reason="proxy_closed")
                n = header_length(data)
                if n is not None and len(data) >= n:
                    return parse(_recv_exactly(sock, n))
    except TimeoutError:
        raise ProxyError(f"no complete PROXY header within {deadline}s", reason="proxy_timeout") from None
    except OSError as exc:
        raise ProxyError(f"connection failed before its PROXY header: {exc.strerror}", reason="proxy_closed") from None
    raise ProxyError("connection closed before its PROXY header", reason="proxy_closed")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """`n` bytes a peek has just seen queued (one recv in practice; bounded by `n` in any case)."""
    out = bytearray()
    while len(out) < n:
        try:
            chunk = sock.recv(n - len(out))
        except OSError:
            chunk = b""
        if not chunk:
            raise ProxyError("connection failed while its PROXY header was read", reason="proxy_closed")
        out += chunk
    return bytes(out)


async def answer_plain_http(sock: socket.socket) -> None:
    """Tell a plain-HTTP client in one line that this port wants TLS or SSH, then let it see the close.

    The request is read and dropped first, and after the answer until the client closes (bounded in time and
    bytes): closing with unread bytes would send a reset, which can destroy the answer before the client reads it.
    The caller closes the socket.
    """
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(_PLAIN_HTTP_DEADLINE):
            await loop.sock_recv(sock, _PLAIN_HTTP_READ)
            await loop.sock_sendall(sock, _PLAIN_HTTP_ANSWER)
            sock.shutdown(socket.SHUT_WR)
            left = _PLAIN_HTTP_READ
            while left > 0 and (data := await loop.sock_recv(sock, min(left, 16384))):
                left -= len(data)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Listener:
    """Owns the listening sockets and every connection task until it is handed to a door."""

    def __init__(
        self,
        sockets: list[socket.socket],
        doors: Mapping[Door, DoorHandler],
        detect_timeout: float,
        log: FilteringBoundLogger,
        *,
        caps: Caps | None = None,
        penalties: PenaltyCheck | None = None,
        observer: ConnectionObserver | None = None,
        name: str = "public",
        proxy_from: Iterable[Network] = (),
    ) -> None:
        self._proxy_from = tuple(proxy_from)
        self._caps = caps
        self._penalties = penalties
        self._observer = observer
        self.name = name  # a closed set: "public" or "control" (a metric label)
        self.held = 0
        self._by_source: dict[str, int] = {}
        self._refusal_log = RateLimitedLog()
        self._sockets = sockets
        self._doors = dict(doors)
        self._detect_timeout = detect_timeout
        self._log = log
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: list[asyncio.Task[None]] = []
        self._counter = 0
        self._addresses_seen: list[tuple[str, int]] = []

    @property
    def addresses(self) -> list[tuple[str, int]]:
        live = [s.getsockname()[:2] for s in self._sockets if s.fileno() != -1]
        return live or list(self._addresses_seen)

    def start(self) -> None:
        for s in self._sockets:
            self._accepting.append(asyncio.create_task(self._accept_loop(s), name=f"accept:{s.getsockname()}"))

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(lsock)
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning.
                self._log.warning("accept_failed", error=exc.strerror or str(exc))
                await asyncio.sleep(0.1)
                continue
            address = (str(peer[0]), int(peer[1]))
            # A balancer's connections are admitted per source only once its PROXY header names the client.
            balancer = self._is_balancer(address[0])
            key = None if balancer else source_key(address[0])
            refused = self._admit(address[0], key)
            if refused is not None:
                conn.close()
                self._refused(address, refused)
                continue
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._counter += 1
            self.held += 1
            if key is not None:
                self._by_source[key] = self._by_source.get(key, 0) + 1
            task = asyncio.create_task(self._serve(conn, address, proxied=balancer), name=f"conn-{self._counter}")
            self._tasks.add(task)
            # A done callback, not a `finally`: it runs even for a task cancelled before it first ran.
            task.add_done_callback(functools.partial(self._release, key=key))

    def set_caps(self, caps: Caps | None) -> None:
        """A reload: connections held now stay; new ones are admitted under `caps`."""
        self._caps = caps

    def set_proxy_from(self, networks: Iterable[Network]) -> None:
        """A reload: new connections from `networks` must start with a PROXY header; held ones are not affected."""
        self._proxy_from = tuple(networks)

    def _is_balancer(self, address: str) -> bool:
        if not self._proxy_from:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._proxy_from)

    def _admit(self, address: str, key: str | None, *, accepted: bool = False) -> Refusal | None:
        """Why this connection may not be held now, or None. O(1): it runs for every connection of a flood.

        `key` None: a balancer's connection at accept (only the global cap). `accepted`: the check after a PROXY
        header, for a connection already held (the global cap counted it at accept).
        """
        if key is not None and self._penalties is not None and self._penalties.refused(address) is not None:
            return Refusal.PENALTY
        if self._caps is not None:
            if key is not None and self._by_source.get(key, 0) >= self._caps.per_source:
                return Refusal.MAX_CONNECTIONS_PER_SOURCE
            if not accepted and self.held >= self._caps.total:
                return Refusal.MAX_CONNECTIONS
        return None

    def _refused(self, peer: tuple[str, int], reason: Refusal, **fields: object) -> None:
        if self._observer is not None:
            self._observer.connection_refused(self.name, reason)
        self._refusal_log.warning(
            self._log, "connection_refused", reason, listener=self.name, source_ip=peer[0], source_port=peer[1], held=self.held, **fields
        )

    def _release(self, task: asyncio.Task[None], *, key: str | None) -> None:
        self._tasks.discard(task)
        self.held -= 1
        if key is not None:
            self._unhold(key)

    def _unhold(self, key: str) -> None:
        n = self._by_source.get(key, 0) - 1
        if n > 0:
            self._by_source[key] = n
        else:
            self._by_source.pop(key, None)

    async def _serve(self, conn: socket.socket, peer: tuple[str, int], *, proxied: bool = False) -> None:
        handed = False
        held_as: str | None = None  # the client's per-source key, counted here for a balancer's connection
        try:
            if proxied:
                balancer = peer
                try:
                    header = await read_proxy_header(conn, self._detect_timeout)
                except ProxyError as exc:
                    self._refused(balancer, Refusal.PROXY_HEADER, detail=exc.reason)
                    return
                peer = header.client(balancer)
                key = source_key(peer[0])
                refused = self._admit(peer[0], key, accepted=True)
                if refused is not None:
                    self._refused(peer, refused, balancer_ip=balancer[0])
                    return
                self._by_source[key] = self._by_source.get(key, 0) + 1
                held_as = key
            door = await peek_door(conn, self._detect_timeout)
            handler = self._doors.get(door)
            if handler is None and door is Door.HTTP:
                self._refused(peer, Refusal.PLAIN_HTTP)
                await answer_plain_http(conn)
                return
            if handler is None:
                if _peek_proxy(conn):
                    # A client's own PROXY header (to us directly, or inside a balancer's stream): never trusted.
                    self._refused(peer, Refusal.PROXY_UNTRUSTED)
                    return
                self._refused(peer, Refusal.UNKNOWN_PROTOCOL)
                return
            handed = True
            await handler(conn, peer)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log.exception("connection_failed", source_ip=peer[0], source_port=peer[1])
        finally:
            if held_as is not None:
                self._unhold(held_as)
            if not handed:
                conn.close()

    async def stop_accepting(self) -> None:
        """Close the listening sockets; connections already accepted go on."""
        for t in self._accepting:
            t.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        self._accepting.clear()
        for s in self._sockets:
            if s.fileno() != -1:
                self._addresses_seen = [*self._addresses_seen, s.getsockname()[:2]]
            s.close()

    async def stop(self) -> None:
        """Stop accepting, then cancel every connection and wait for them."""
        await self.stop_accepting()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
