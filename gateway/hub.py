"""The workers' shared store: the few Redis commands the cluster uses, served from the supervisor's memory.

`[gateway] workers = N` runs N worker processes; each is a cluster node (`sessions/cluster.py`) and talks to this
hub exactly as it would to Redis, over a Unix socket only the gateway's user can open (mode 0600 in a 0700
directory). So the workers share one session view, disconnects, notices, locks, revoked tokens, penalties and
one-time links through the same seam as several gateways do, and one gateway needs no Redis.

It speaks RESP2 and implements what redis-py sends for the cluster's calls: PING, CLIENT (ignored), SET with PX
and NX, GET, MGET, DEL, SCAN with MATCH and COUNT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, HSET, HDEL, HGETALL. Anything
else is answered with an error naming the command. Every client is bounded: a request is at most
`MAX_REQUEST` bytes and `MAX_ARGS` arguments, a subscriber whose unread messages pass `MAX_BACKLOG` bytes is
dropped (it reconnects and resyncs, as it would after a Redis restart), and the store holds at most `MAX_KEYS`
keys. A malformed request closes that client's connection; it never reaches another client or the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

MAX_REQUEST = 64 * 1024 * 1024  # one worker's heartbeat carries its whole session list (9,000 rows: about 5 MB)
MAX_ARGS = 100_000
MAX_BACKLOG = 256 * 1024 * 1024
MAX_KEYS = 100_000
MAX_CLIENTS = 1024

Value = bytes | dict[bytes, bytes]


class ProtocolError(Exception):
    pass


def _encode(reply: object) -> bytes:
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, bool):
        return b":1\r\n" if reply else b":0\r\n"
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    if isinstance(reply, Status):
        return b"+%s\r\n" % reply.text
    if isinstance(reply, Failure):
        return b"-ERR %s\r\n" % reply.text
    if isinstance(reply, list):
        return b"*%d\r\n" % len(reply) + b"".join(_encode(r) for r in reply)
    raise TypeError(type(reply))


class Status:
    __slots__ = ("text",)

    def __init__(self, text: bytes) -> None:
        self.text = text


class Failure:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text.encode()


OK = Status(b"OK")


class Hub:
    """The store and the channels. Not thread-safe (one event loop). `start()` listens on `path`; `stop()` closes
    every client. `clock` is monotonic seconds (injected for the expiry tests)."""

    def __init__(
        self, path: Path, clock: Callable[[], float] = time.monotonic, *, max_request: int = MAX_REQUEST, max_backlog: int = MAX_BACKLOG
    ) -> None:
        self.path = path
        self._clock = clock
        self.max_request = max_request
        self.max_backlog = max_backlog
        self._data: dict[bytes, Value] = {}
        self._expires: dict[bytes, float] = {}
        self._channels: dict[bytes, set[_Client]] = {}
        self._clients: set[_Client] = set()
        self._server: asyncio.AbstractServer | None = None
        self.dropped = 0  # subscribers dropped for not reading

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(lambda: _Client(self), str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._clients):
            c.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def put(self, key: str, value: str) -> None:
        """Set a key with no expiry (the supervisor's own figures)."""
        self._expires.pop(key.encode(), None)
        self._data[key.encode()] = value.encode()

    def get(self, key: str) -> str | None:
        value = self._live(key.encode())
        return value.decode() if isinstance(value, bytes) else None

    def publish(self, channel: str, message: str) -> int:
        """Publish from the supervisor itself; returns how many subscribers got it."""
        return self._publish(channel.encode(), message.encode())

    def delete(self, key: str) -> None:
        """Drop a key now (the supervisor does it for a worker that died: the others report it lost at once)."""
        self._drop(key.encode())

    # The store.

    def _live(self, key: bytes) -> Value | None:
        deadline = self._expires.get(key)
        if deadline is not None and deadline <= self._clock():
            self._drop(key)
            return None
        return self._data.get(key)

    def _drop(self, key: bytes) -> bool:
        self._expires.pop(key, None)
        return self._data.pop(key, None) is not None

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, t in self._expires.items() if t <= now]:
            self._drop(key)

    def _room(self, key: bytes) -> bool:
        if key in self._data or len(self._data) < MAX_KEYS:
            return True
        self._sweep()
        return len(self._data) < MAX_KEYS

    def _hash(self, key: bytes) -> dict[bytes, bytes] | Failure | None:
        value = self._live(key)
        if value is None or isinstance(value, dict):
            return value
        return Failure("WRONGTYPE Operation against a key holding the wrong kind of value")

    def execute(self, client: _Client, args: list[bytes]) -> object:  # one flat command table reads best
        name = args[0].upper()
        rest = args[1:]
        if name == b"PING":
            return Status(b"PONG") if not client.channels else [b"pong", b""]
        if name in (b"CLIENT", b"SELECT"):
            return OK
        if name == b"SET" and len(rest) >= 2:
            key, value, opts = rest[0], rest[1], [o.upper() for o in rest[2:]]
            ttl: float | None = None
            if b"PX" in opts or b"EX" in opts:
                i = opts.index(b"PX") if b"PX" in opts else opts.index(b"EX")
                try:
                    ttl = int(rest[2 + i + 1]) / (1000.0 if opts[i] == b"PX" else 1.0)
                except (IndexError, ValueError):
                    return Failure("value is not an integer or out of range")
            if b"NX" in opts and self._live(key) is not None:
                return None
            if not self._room(key):
                return Failure("hub full")
            self._data[key] = value
            if ttl is not None:
                self._expires[key] = self._clock() + ttl
            else:
                self._expires.pop(key, None)
            return OK
        if name == b"GET" and len(rest) == 1:
            found = self._live(rest[0])
            return Failure("WRONGTYPE") if isinstance(found, dict) else found
        if name == b"MGET" and rest:
            return [v if isinstance(v := self._live(k), bytes) else None for k in rest]
        if name == b"DEL" and rest:
            return sum(self._drop(k) for k in rest if self._live(k) is not None)
        if name == b"SCAN" and rest:
            pattern = b"*"
            for i, opt in enumerate(rest[1:-1], start=1):
                if opt.upper() == b"MATCH":
                    pattern = rest[i + 1]
            self._sweep()
            return [b"0", [k for k in self._data if fnmatch.fnmatchcase(k.decode("latin-1"), pattern.decode("latin-1"))]]
        if name == b"PUBLISH" and len(rest) == 2:
            return self._publish(rest[0], rest[1])
        if name == b"SUBSCRIBE" and rest:
            for ch in rest:
                client.channels.add(ch)
                self._channels.setdefault(ch, set()).add(client)
                client.send(_encode([b"subscribe", ch, len(client.channels)]))
            return _NO_REPLY
        if name == b"UNSUBSCRIBE":
            for ch in rest or list(client.channels):
                client.channels.discard(ch)
                self._unsubscribe(client, ch)
                client.send(_encode([b"unsubscribe", ch, len(client.channels)]))
            if not rest and not client.channels:
                client.send(_encode([b"unsubscribe", None, 0]))
            return _NO_REPLY
        if name == b"HSET" and len(rest) >= 3 and len(rest) % 2 == 1:
            table = self._hash(rest[0])
            if isinstance(table, Failure):
                return table
            if table is None:
                if not self._room(rest[0]):
                    return Failure("hub full")
                table = self._data[rest[0]] = {}
            added = 0
            for i in range(1, len(rest), 2):
                added += rest[i] not in table
                table[rest[i]] = rest[i + 1]
            return added
        if name == b"HDEL" and len(rest) >= 2:
            table = self._hash(rest[0])
            if isinstance(table, Failure):
                return table
            if table is None:
                return 0
            gone = sum(table.pop(f, None) is not None for f in rest[1:])
            if not table:
                self._drop(rest[0])
            return gone
        if name == b"HGETALL" and len(rest) == 1:
            table = self._hash(rest[0])
            if isinstance(table, Failure):
                return table
            return [x for kv in (table or {}).items() for x in kv]
        return Failure(f"unknown command or wrong number of arguments for '{name.decode('latin-1')[:32]}'")

    def _publish(self, channel: bytes, message: bytes) -> int:
        clients = list(self._channels.get(channel, ()))
        frame = _encode([b"message", channel, message])
        for c in clients:
            c.send(frame)
        return len(clients)

    def _unsubscribe(self, client: _Client, channel: bytes) -> None:
        subs = self._channels.get(channel)
        if subs is not None:
            subs.discard(client)
            if not subs:
                del self._channels[channel]


_NO_REPLY = object()


class _Client(asyncio.Protocol):
    """One connection: parses RESP2 arrays of bulk strings, answers in order."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.buffer = bytearray()
        self.channels: set[bytes] = set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        if len(self.hub._clients) >= MAX_CLIENTS:
            self.transport.abort()
            return
        self.hub._clients.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub._clients.discard(self)
        for ch in list(self.channels):
            self.hub._unsubscribe(self, ch)
        self.channels.clear()

    def send(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if t.get_write_buffer_size() > self.hub.max_backlog:  # a subscriber that stopped reading: it reconnects and resyncs
            self.hub.dropped += 1
            t.abort()
            return
        t.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > self.hub.max_request:
            self._fail()
            return
        out: list[bytes] = []
        try:
            while (parsed := _parse(self.buffer)) is not None:
                args, used = parsed
                del self.buffer[:used]
                reply = self.hub.execute(self, args)
                if reply is not _NO_REPLY:
                    out.append(_encode(reply))
        except ProtocolError:
            self._fail()
            return
        if out:
            self.send(b"".join(out))

    def _fail(self) -> None:
        if self.transport is not None:
            self.transport.write(b"-ERR Protocol error\r\n")
            self.transport.close()
        self.buffer.clear()


def _line(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    end = buf.find(b"\r\n", start)
    if end < 0:
        if len(buf) - start > 64:
            raise ProtocolError("header too long")
        return None
    return bytes(buf[start:end]), end + 2


def _parse(buf: bytearray) -> tuple[list[bytes], int] | None:
    """One request from the front of `buf` ((args, bytes used)), None if incomplete. Raises ProtocolError."""
    if not buf:
        return None
    if buf[0:1] != b"*":
        raise ProtocolError("expected an array")
    head = _line(buf, 1)
    if head is None:
        return None
    try:
        count, pos = int(head[0]), head[1]
    except ValueError:
        raise ProtocolError("bad array length") from None
    if not 1 <= count <= MAX_ARGS:
        raise ProtocolError("bad array length")
    args: list[bytes] = []
    for _ in range(count):
        if pos >= len(buf):
            return None
        if buf[pos : pos + 1] != b"$":
            raise ProtocolError("expected a bulk string")
        size_line = _line(buf, pos + 1)
        if size_line is None:
            return None
        try:
            size = int(size_line[0])
        except ValueError:
            raise ProtocolError("bad bulk length") from None
        if not 0 <= size <= MAX_REQUEST:
            raise ProtocolError("bad bulk length")
        start = size_line[1]
        if len(buf) < start + size + 2:
            return None
        if buf[start + size : start + size + 2] != b"\r\n":
            raise ProtocolError("bulk string not terminated")
        args.append(bytes(buf[start : start + size]))
        pos = start + size + 2
    return args, pos


async def _serve(path: Path) -> None:
    """`python -m gateway.hub PATH`: the hub alone (tests run the cluster's tests against it as against Redis)."""
    import signal

    from gateway.sdnotify import Notifier

    hub = Hub(path)
    await hub.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    Notifier.from_env(os.environ).ready(f"hub on {path}")
    try:
        await stop.wait()
    finally:
        await hub.stop()


if __name__ == "__main__":
    import sys

    asyncio.run(_serve(Path(sys.argv[1])))
