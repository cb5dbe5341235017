"""asyncssh's patched receive path (`gateway.protocols.asyncssh_fast`) on both ends of a loopback connection."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import asyncssh
import asyncssh.connection
import asyncssh.packet
import pytest
from asyncssh.constants import MSG_CHANNEL_DATA
from asyncssh.encryption import GCMEncryption
from asyncssh.packet import String, UInt32

from gateway.protocols import asyncssh_fast
from tests.e2e.conftest import Echo, GatewayFactory
from tests.e2e.test_ssh_jump import open_forward, roundtrip, stop, with_echo_vm
from tests.support.peers import free_port


class _Echo(asyncssh.SSHServerSession[bytes]):
    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def shell_requested(self) -> bool:
        return True

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._chan.write(data)

    def eof_received(self) -> bool:
        self._chan.exit(0)
        return False


class _Server(asyncssh.SSHServer):
    conns: ClassVar[list[asyncssh.SSHServerConnection]] = []
    lost: ClassVar[dict[asyncssh.SSHServerConnection, asyncio.Future[Exception | None]]] = {}

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        _Server.conns.append(conn)
        _Server.lost[conn] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        for conn, fut in _Server.lost.items():
            if not fut.done() and conn._transport is None:
                fut.set_result(exc)

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> _Echo:
        return _Echo()


async def _round_trip(ciphers: tuple[str, ...], payload: bytes, sizes: list[int], **options: Any) -> None:
    """Against an echo server on the patched path: `payload` written in `sizes` chunks comes back byte for byte, for
    each cipher (`options` go to asyncssh.connect)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(_Server, "127.0.0.1", 0, server_host_keys=[key], encoding=None)
    port = server.sockets[0].getsockname()[1]
    try:
        for cipher in ciphers:
            async with asyncssh.connect(
                "127.0.0.1", port, known_hosts=None, username="u", client_keys=None, agent_path=None, config=None,
                encryption_algs=[cipher], preferred_auth="none", **options,
            ) as conn:  # fmt: skip
                proc = await conn.create_process(encoding=None)
                pos, i = 0, 0
                while pos < len(payload):
                    n = sizes[i % len(sizes)]
                    proc.stdin.write(payload[pos : pos + n])
                    pos, i = pos + n, i + 1
                proc.stdin.write_eof()
                async with asyncio.timeout(60):
                    out = await proc.stdout.read()
                    await proc.wait()
                assert out == payload, cipher
    finally:
        server.close()
        await server.wait_closed()


async def test_patched_parser_round_trips_many_packets_exactly() -> None:
    """Through the patched path on both ends, 8 MB of varied writes (many packets per read, packets split
    across reads) come back byte for byte, over AES-GCM and chacha20."""
    assert asyncssh_fast.apply()
    sizes = [1, 7, 4096, 32767, 32768, 70000, 250000]
    await _round_trip(("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"), bytes(range(256)) * (8 * 4096), sizes)


async def test_no_ignore_packet_before_each_data_packet() -> None:
    """asyncssh alone sends an empty MSG_IGNORE before every packet (a CBC countermeasure); patched, an AES-GCM
    connection sends one packet per write: 200 one-byte echoes cost the client about 200 packets, not 400."""
    assert asyncssh_fast.apply()
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(_Server, "127.0.0.1", 0, server_host_keys=[key], encoding=None)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, known_hosts=None, username="u", client_keys=None, agent_path=None, config=None,
            encryption_algs=["aes128-gcm@openssh.com"], preferred_auth="none",
        ) as conn:  # fmt: skip
            proc = await conn.create_process(encoding=None)
            before = conn._send_seq
            async with asyncio.timeout(30):
                for _ in range(200):
                    proc.stdin.write(b"x")
                    assert await proc.stdout.readexactly(1) == b"x"
            sent = conn._send_seq - before
            assert 200 <= sent < 300, sent
            proc.stdin.write_eof()
            await proc.wait()
    finally:
        server.close()
        await server.wait_closed()


async def test_key_exchange_payloads_are_dropped_after_each_exchange() -> None:
    """Logged in, neither end keeps the two KEXINIT payloads nor the server its EXT_INFO; with a re-key every 16 KiB
    from the client, 200 KB echo back whole (each exchange's hash needs both payloads again) and none are kept after."""
    assert asyncssh_fast.apply()
    key = asyncssh.generate_private_key("ssh-ed25519")
    _Server.conns.clear()
    server = await asyncssh.create_server(_Server, "127.0.0.1", 0, server_host_keys=[key], encoding=None)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, known_hosts=None, username="u", client_keys=None, agent_path=None, config=None,
            preferred_auth="none", rekey_bytes=16 * 1024,
        ) as conn:  # fmt: skip
            proc = await conn.create_process(encoding=None)
            srv: Any = _Server.conns[-1]
            for end in (conn, srv):
                assert (end._client_kexinit, end._server_kexinit) == (b"", b"")
            assert not srv._extensions_to_send
            session_id = conn._session_id
            async with asyncio.timeout(30):
                for i in range(50):
                    proc.stdin.write(bytes([i]) * 4000)
                    assert await proc.stdout.readexactly(4000) == bytes([i]) * 4000
            assert conn._rekey_bytes_sent < 16 * 1024 + 8192 and conn._session_id == session_id  # re-keyed, same session
            for end in (conn, srv):
                assert (end._client_kexinit, end._server_kexinit) == (b"", b"")
            proc.stdin.write_eof()
            await proc.wait()
    finally:
        server.close()
        await server.wait_closed()


class _CountingTransport:
    """The server connection's real transport, counting the writes asyncssh makes on it."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self._real.write(data)

    def writelines(self, data: list[bytes]) -> None:
        self.writes += 1
        self._real.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


async def test_packets_sent_while_handling_one_read_share_one_write() -> None:
    """An echo of 4 MB sent in 1 MB writes: what the server relays while it handles one read of the socket
    goes out in one transport write, so it makes clearly fewer writes than it sends packets."""
    assert asyncssh_fast.apply()
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(_Server, "127.0.0.1", 0, server_host_keys=[key], encoding=None)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, known_hosts=None, username="u", client_keys=None, agent_path=None, config=None,
            encryption_algs=["aes128-gcm@openssh.com"], preferred_auth="none",
        ) as conn:  # fmt: skip
            proc = await conn.create_process(encoding=None)
            srv: Any = _Server.conns[-1]
            counting = _CountingTransport(srv._transport)
            srv._transport = counting
            before = srv._send_seq
            chunk = bytes(range(256)) * 4096
            async with asyncio.timeout(60):
                for _ in range(4):
                    proc.stdin.write(chunk)
                    assert await proc.stdout.readexactly(len(chunk)) == chunk
            packets = srv._send_seq - before
            assert packets >= 4 * len(chunk) // 32768
            assert counting.writes * 2 <= packets, (counting.writes, packets)
            proc.stdin.write_eof()
            await proc.wait()
    finally:
        server.close()
        await server.wait_closed()


async def test_patched_parser_survives_rekeys_in_the_middle_of_a_read() -> None:
    """Key re-exchange changes the block and MAC sizes between two packets of one read: with a rekey every 64 KiB
    on the client (and so on both ends), 4 MB of varied writes still come back byte for byte."""
    assert asyncssh_fast.apply()
    await _round_trip(
        ("aes128-gcm@openssh.com", "aes128-ctr"), bytes(range(251)) * (4 * 4180), [3, 5000, 32768, 65537, 200000], rekey_bytes=64 * 1024
    )


async def test_openssh_rekeying_often_through_the_gateway(gw: Any) -> None:
    """The real OpenSSH client re-keys every 64 KiB (RekeyLimit) while 4 MB go up and come back through a
    terminating session (both asyncssh legs patched): the bytes arrive whole and the session ends normally."""
    data = os.urandom(4 * 1024 * 1024)
    r = await gw.run(*gw.ssh_argv("alice+web01", "-o", "RekeyLimit=64K"), "cat", stdin=data)
    assert r.rc == 0 and r.out == data, r.errtext


@asynccontextmanager
async def _connected(
    session: Callable[[], asyncssh.SSHServerSession[bytes]] = _Echo, server_options: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[tuple[asyncssh.SSHClientConnection, Any, asyncssh.SSHClientProcess[bytes]]]:
    """A patched client connected over AES-GCM to a patched server running `session`: (client, server, process)."""
    assert asyncssh_fast.apply()

    class Server(_Server):
        def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
            return session()

    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(Server, "127.0.0.1", 0, server_host_keys=[key], encoding=None, **(server_options or {}))
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, known_hosts=None, username="u", client_keys=None, agent_path=None, config=None,
            encryption_algs=["aes128-gcm@openssh.com"], preferred_auth="none", **options,
        ) as conn:  # fmt: skip
            proc = await conn.create_process(encoding=None)
            yield conn, _Server.conns[-1], proc
    finally:
        server.close()
        await server.wait_closed()


async def _echoes(proc: asyncssh.SSHClientProcess[bytes], count: int) -> None:
    async with asyncio.timeout(30):
        for _ in range(count):
            proc.stdin.write(b"x")
            assert await proc.stdout.readexactly(1) == b"x"


async def test_channel_data_and_window_adjusts_skip_the_generic_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncssh builds an SSHPacket for every packet it receives and asks the cipher for every header; with the fast
    path, 200 echoes and 4 MB each way (data, and the window adjusts a bulk transfer brings) build almost no packet
    object and ask for no AES-GCM header on either end, and the bytes arrive whole."""
    made = [0]

    class Counting(asyncssh.packet.SSHPacket):
        def __init__(self, packet: bytes) -> None:
            made[0] += 1
            super().__init__(packet)

    headers = [0]
    orig_header = GCMEncryption.decrypt_header

    def counting_header(self: GCMEncryption, *args: Any) -> Any:
        headers[0] += 1
        return orig_header(self, *args)

    async with _connected() as (_conn, _srv, proc):
        monkeypatch.setattr(asyncssh.connection, "SSHPacket", Counting)
        monkeypatch.setattr(GCMEncryption, "decrypt_header", counting_header)
        await _echoes(proc, 200)
        chunk = os.urandom(1 << 20)
        async with asyncio.timeout(60):
            for _ in range(4):
                proc.stdin.write(chunk)
                assert await proc.stdout.readexactly(len(chunk)) == chunk
        assert made[0] < 20, made[0]  # without the fast path: over 2 * (200 + 4 MB / 32 KiB)
        assert headers[0] == 0, headers[0]  # GCM's length is read from the buffer, in the clear
        monkeypatch.undo()
        proc.stdin.write_eof()
        await proc.wait()


async def _refused_by_server(send: Callable[[Any, Any], None], **server_options: Any) -> str:
    """What the server's connection ended with after the client `send(conn, chan)` a packet asyncssh must refuse."""
    async with _connected(server_options=server_options) as (conn, srv, proc):
        await _echoes(proc, 3)
        send(conn, proc.channel)
        async with asyncio.timeout(10):
            exc = await _Server.lost[srv]
    assert isinstance(exc, asyncssh.ProtocolError), exc
    return exc.reason


async def test_data_beyond_the_receive_window_is_refused_as_asyncssh_does() -> None:
    """A peer that sends more than the window it was given is cut off with asyncssh's own error (the fast path
    leaves the packet to asyncssh's handler)."""
    reason = await _refused_by_server(
        lambda conn, chan: conn.send_packet(MSG_CHANNEL_DATA, UInt32(chan._send_chan), String(b"y" * 3000)), window=2048
    )
    assert reason == "Window exceeded"


async def test_data_for_an_unknown_channel_is_refused_as_asyncssh_does() -> None:
    """Data for a channel number the server never opened ends the connection with asyncssh's own error."""
    reason = await _refused_by_server(lambda conn, chan: conn.send_packet(MSG_CHANNEL_DATA, UInt32(chan._send_chan + 7), String(b"y")))
    assert reason.startswith("Invalid channel number ")


async def test_data_after_eof_is_refused_as_asyncssh_does() -> None:
    """Data on a channel after its EOF ends the connection with asyncssh's own error."""

    def send(conn: Any, chan: Any) -> None:
        chan.write_eof()
        conn.send_packet(MSG_CHANNEL_DATA, UInt32(chan._send_chan), String(b"y"))

    assert await _refused_by_server(send) == "Channel not open for sending"


class _Burst(_Echo):
    """Writes `size` bytes in one write from a callback of its own (outside any read), then echoes; `writes` is how many
    transport writes that one write made."""

    size = 1 << 20
    writes: ClassVar[list[int]] = []

    def shell_requested(self) -> bool:
        srv: Any = _Server.conns[-1]
        counting = _CountingTransport(srv._transport)
        srv._transport = counting

        def burst() -> None:
            before = counting.writes
            self._chan.write(b"z" * self.size)
            _Burst.writes.append(counting.writes - before)

        asyncio.get_running_loop().call_soon(burst)
        return True


async def test_a_write_of_many_packets_goes_out_in_one_transport_write() -> None:
    """1 MB written at once (it fits the peer's window) is cut into 32 KiB packets sent with one transport write; asyncssh
    alone makes one write per packet."""
    _Burst.writes.clear()
    async with _connected(_Burst) as (_conn, _srv, proc):
        async with asyncio.timeout(30):
            assert await proc.stdout.readexactly(_Burst.size) == b"z" * _Burst.size
        assert _Burst.writes == [1], _Burst.writes
        await _echoes(proc, 3)
        proc.stdin.write_eof()
        await proc.wait()


async def test_reads_do_not_replace_the_keepalive_timer() -> None:
    """asyncssh cancels and re-creates its keepalive timer on every read; patched, 200 echoes only note the time."""
    async with _connected(keepalive_interval=30) as (conn, _srv, proc):
        c: Any = conn
        calls = [0]
        orig = c._set_keepalive_timer

        def counting() -> None:
            calls[0] += 1
            orig()

        c._set_keepalive_timer = counting
        await _echoes(proc, 200)
        assert calls[0] == 0, calls[0]  # unpatched: one per read, 200 or more
        proc.stdin.write_eof()
        await proc.wait()


async def test_keepalive_still_fires_once_the_connection_goes_quiet() -> None:
    """With reads only noting their time, the keepalive timer re-arms itself while data flows and still sends its
    request once the peer has been quiet for the interval."""
    async with _connected(keepalive_interval=0.2) as (conn, _srv, proc):
        c: Any = conn
        sent = asyncio.Event()
        orig = c._make_keepalive_request

        async def request() -> None:
            sent.set()
            await orig()

        c._make_keepalive_request = request
        await _echoes(proc, 100)
        async with asyncio.timeout(10):
            await sent.wait()
        await _echoes(proc, 3)
        proc.stdin.write_eof()
        await proc.wait()


async def test_packet_log_lines_are_only_formatted_when_logged(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Below debug level 3 asyncssh drops its per-packet log line after formatting it: patched, relaying formats none;
    at level 3 the lines are still there (that level takes asyncssh's own paths)."""
    formatted = [0]
    orig = asyncssh.packet.plural

    def counting(*args: Any) -> str:
        formatted[0] += 1
        return orig(*args)

    monkeypatch.setattr(asyncssh.packet, "plural", counting)
    async with _connected() as (_conn, _srv, proc):
        await _echoes(proc, 50)
        assert formatted[0] == 0, formatted[0]
        asyncssh.set_debug_level(3)
        try:
            with caplog.at_level(logging.DEBUG, logger="asyncssh"):
                await _echoes(proc, 5)
        finally:
            asyncssh.set_debug_level(1)
        assert any("MSG_CHANNEL_DATA" in r.getMessage() for r in caplog.records)
        proc.stdin.write_eof()
        await proc.wait()


async def test_openssh_chacha20_through_the_gateway(gw: Any) -> None:
    """OpenSSH's first-choice cipher, chacha20-poly1305, on the user's leg: small writes (one run of the cipher for
    the Poly1305 key and the data) and 2 MB with a re-key every 64 KiB come back whole through a terminating
    session."""
    for data in (b"keystroke\n" * 10, os.urandom(2 * 1024 * 1024)):
        argv = gw.ssh_argv("alice+web01", "-c", "chacha20-poly1305@openssh.com", "-o", "RekeyLimit=64K")
        r = await gw.run(*argv, "cat", stdin=data)
        assert r.rc == 0 and r.out == data, r.errtext


async def test_openssh_rekeying_often_through_a_jump_forward(make_gateway: GatewayFactory, echo: Echo) -> None:
    """`ssh -L` through the gateway with the real OpenSSH client re-keying every 64 KiB: 8 MB go to a VM's echo
    port and come back whole (the fast receive and send paths across many key exchanges)."""
    async with make_gateway(with_echo_vm(echo.port)) as gw:
        lport = free_port()
        proc = await open_forward(gw, "alice", f"{lport}:echo01:{echo.port}", "-N", "-o", "RekeyLimit=64K")
        try:
            payload = os.urandom(8 * 1024 * 1024)
            assert await roundtrip(lport, payload) == payload
        finally:
            await stop(proc)
