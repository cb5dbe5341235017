"""The gateway in-process on uvloop, real OpenSSH sshd as VMs, real OpenSSH clients."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop

from gateway.app import App
from gateway.config import parse_config
from gateway.logs import make_logger
from tests.support.peers import SSHD, KeyPair, client_config, make_key, running_sshd


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The gateway runs on uvloop in production, so its tests do too."""
    return {"uvloop": uvloop.new_event_loop}


@dataclass(frozen=True)
class Keys:
    dir: Path
    alice: KeyPair
    bob: KeyPair
    carol: KeyPair
    stranger: KeyPair
    gw_to_vm: KeyPair
    ca: KeyPair


@pytest.fixture(scope="session")
def keys() -> Iterator[Keys]:
    d = Path(tempfile.mkdtemp(prefix="bastion-keys-"))
    try:
        yield Keys(
            dir=d,
            alice=make_key(d / "alice"),
            bob=make_key(d / "bob"),
            carol=make_key(d / "carol"),
            stranger=make_key(d / "stranger"),
            gw_to_vm=make_key(d / "gw_to_vm"),
            ca=make_key(d / "user_ca"),
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def vm(keys: Keys) -> Iterator[SSHD]:
    """One real sshd. It accepts the gateway's login key and alice's key (jump mode is end to end)."""
    d = Path(tempfile.mkdtemp(prefix="bastion-vm-"))
    try:
        with running_sshd(d, [keys.gw_to_vm.public, keys.alice.public]) as sshd:
            yield sshd
    finally:
        shutil.rmtree(d, ignore_errors=True)


class LogLines(io.StringIO):
    """Collects the gateway's JSON log lines; `changed` fires on every line (every registry change logs one)."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        self.changed.set()
        return n

    def isatty(self) -> bool:
        return False

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.getvalue().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                d = json.loads(line)
                if name is None or d.get("event") == name:
                    out.append(d)
        return out


@dataclass
class Result:
    rc: int
    out: bytes
    err: bytes

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")

    @property
    def errtext(self) -> str:
        return self.err.decode(errors="replace")


@dataclass
class Gateway:
    app: App
    port: int
    logs: LogLines
    keys: Keys
    vm: SSHD
    tmp: Path
    ssh_config: Path
    extra_tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)  # the config as a dict: edit it, then `await app.reload()` reads it

    @property
    def control_url(self) -> str:
        return f"https://127.0.0.1:{self.app.control_addresses[0][1]}"

    @property
    def ca_file(self) -> Path:
        return self.tmp / "state" / "tls.crt"

    async def run(self, *argv: str, stdin: bytes | None = b"", timeout: float = 60) -> Result:
        """Run a command (ssh, scp, sftp, ...) with a bounded wait."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return Result(proc.returncode, out, err)

    async def ssh(self, user: str, *command: str, opts: tuple[str, ...] = (), stdin: bytes | None = b"", timeout: float = 60) -> Result:
        """`ssh -F CFG OPTS USER@gw COMMAND...` through the gateway."""
        return await self.run(*self.ssh_argv(user, *opts), *command, stdin=stdin, timeout=timeout)

    def ssh_argv(self, user: str, *args: str, host: str = "gw") -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), *args, f"{user}@{host}"]

    def ssh_argv_keys(self, user: str, *identities: Path, opts: tuple[str, ...] = ()) -> list[str]:
        """ssh to the gateway offering exactly `identities` (no config file, no agent)."""
        ids = [x for k in identities for x in ("-i", str(k))]
        return [
            "ssh", "-F", "/dev/null", "-p", str(self.port),
            "-o", f"UserKnownHostsFile={self.tmp / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            *ids, *opts, f"{user}@127.0.0.1",
        ]  # fmt: skip


OPERATOR_TOKEN = "op-" + "t" * 40
VIEWER_TOKEN = "view-" + "v" * 40


def base_config(tmp: Path, keys: Keys, vm: SSHD) -> dict[str, Any]:
    login = vm.login
    return {
        # One process, as the tests of one gateway expect; tests/e2e/test_workers.py runs several.
        "gateway": {"node": "test-node", "state_dir": str(tmp / "state"), "connect_timeout": "5s", "workers": 1},
        "public": {"listen": ["127.0.0.1:0"]},
        "control": {"listen": ["127.0.0.1:0"]},
        # Every test client comes from 127.0.0.1 and some fail auth on purpose: penalties would lock the next test
        # out. Hostile tests clear this and attack from other loopback addresses (127.0.0.2, ...).
        "penalties": {"exempt": ["127.0.0.1/32", "::1/128"]},
        # Some tests open hundreds of sessions for alice within seconds; the per-user rate has its own tests.
        "sessions": {"rate_per_user": "off"},
        "operators": [
            {"name": "noc", "role": "operator", "token_sha256": hashlib.sha256(OPERATOR_TOKEN.encode()).hexdigest()},
            {"name": "watcher", "role": "viewer", "token_sha256": hashlib.sha256(VIEWER_TOKEN.encode()).hexdigest()},
        ],
        "ssh": {
            "login_grace_time": "20s",
            "max_auth_tries": 6,
            "max_startups": 50,
            "per_source_max_startups": 50,  # every test client comes from 127.0.0.1
            "user_ca_keys": [keys.ca.public],
        },
        "vms": [
            {
                "name": "web01",
                "address": vm.host,
                "ssh_port": vm.port,
                "host_key": vm.host_key.public,
                "default_login": login,
                "logins": {login: {"key": str(keys.gw_to_vm.private)}, "operator": {"key": str(keys.gw_to_vm.private)}},
            },
            {
                "name": "web02",
                "address": vm.host,
                "ssh_port": vm.port,
                "host_key": vm.host_key.public,
                "default_login": login,
                "logins": {login: {"key": str(keys.gw_to_vm.private)}},
            },
            {
                # Same sshd, but the inventory holds another key: the gateway must refuse.
                "name": "bad01",
                "address": vm.host,
                "ssh_port": vm.port,
                "host_key": keys.stranger.public,
                "default_login": login,
                "logins": {login: {"key": str(keys.gw_to_vm.private)}},
            },
        ],
        "users": [
            {"name": "alice", "keys": [keys.alice.public], "groups": ["ops"]},
            {"name": "bob", "keys": [keys.bob.public], "groups": ["dev"]},
            {"name": "carol", "keys": [], "groups": ["ops"]},  # certificate only
        ],
        "rules": [
            {
                "groups": ["ops"],
                "vms": ["web01", "bad01"],
                "protocols": ["ssh", "ssh-jump"],
                "logins": [login],
                "ports": [vm.port],
                "env": ["LC_*"],
            },
            {"users": ["bob"], "vms": ["web01"], "protocols": ["ssh"]},
        ],
    }


GatewayFactory = Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]


@pytest.fixture
def make_gateway(keys: Keys, vm: SSHD, tmp_path: Path) -> GatewayFactory:
    """Start the gateway with the base config, optionally edited by `edit(config_dict)`."""

    @contextlib.asynccontextmanager
    async def factory(
        edit: Callable[[dict[str, Any]], None] | None = None, jump_hosts: dict[str, int] | None = None
    ) -> AsyncIterator[Gateway]:
        raw = base_config(tmp_path, keys, vm)
        if edit is not None:
            edit(raw)
        cfg = parse_config(raw)
        logs = LogLines()
        app = App(cfg, make_logger(logs, fmt="json", node=cfg.gateway.node), reload_config=lambda: parse_config(raw))
        await app.start()
        try:
            port = app.public_addresses[0][1]
            kh = tmp_path / "known_hosts"
            lines = [f"[127.0.0.1]:{port} {k.export_public_key().decode().strip()}" for k in app.host_keys]
            lines.append(f"[web01]:{vm.port} {vm.host_key.public}")
            kh.write_text("\n".join(lines) + "\n")
            ssh_config = client_config(
                tmp_path / "ssh_config",
                gw_port=port,
                identity=keys.alice.private,
                known_hosts=kh,
                jump_hosts=jump_hosts if jump_hosts is not None else {"web01": vm.port},
            )
            yield Gateway(app=app, port=port, logs=logs, keys=keys, vm=vm, tmp=tmp_path, ssh_config=ssh_config, raw=raw)
        finally:
            await app.stop()

    return factory


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> AsyncIterator[Gateway]:
    async with make_gateway() as g:
        yield g


async def wait_for(predicate: Callable[[], bool], changed: asyncio.Event, timeout: float = 10.0) -> None:
    """Wait (bounded) until `predicate()` holds, re-checking each time `changed` fires."""
    async with asyncio.timeout(timeout):
        while True:
            changed.clear()
            if predicate():
                return
            await changed.wait()


class Echo:
    """A loopback TCP server that echoes everything and closes after the client's EOF."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()
        except ConnectionError:
            pass


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    e.server = await asyncio.start_server(e.handle, "127.0.0.1", 0)
    e.port = e.server.sockets[0].getsockname()[1]
    try:
        yield e
    finally:
        e.server.close()
        await e.server.wait_closed()


@pytest.fixture
def watcher() -> Iterator[socket.socket]:
    """A listening loopback socket that a test expects nobody to connect to (accept() must raise BlockingIOError)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()
