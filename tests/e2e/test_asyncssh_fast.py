"""asyncssh's patched receive path (`gateway.protocols.asyncssh_fast`) on both ends of a loopback connection."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import asyncssh

from gateway.protocols import asyncssh_fast


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

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        _Server.conns.append(conn)

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
    data = bytes(range(256)) * (4 * 4096)
    r = await gw.run(*gw.ssh_argv("alice+web01", "-o", "RekeyLimit=64K"), "cat", stdin=data)
    assert r.rc == 0 and r.out == data, r.errtext
