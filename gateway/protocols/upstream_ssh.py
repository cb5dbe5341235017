"""Log in to a VM over SSH with the gateway's credential, verifying its host key."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import asyncssh
from asyncssh.encryption import get_encryption_algs
from asyncssh.kex import get_kex_algs
from asyncssh.mac import get_mac_algs
from structlog.typing import FilteringBoundLogger

from gateway.config import DEFAULT_VM_CIPHERS, SSH_KEX_ALGS, SSH_MAC_ALGS, VM
from gateway.errors import (
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamHostKeyMismatch,
    UpstreamTimeout,
)
from gateway.filemodes import read_private_key
from gateway.net.upstream import dial
from gateway.protocols.asyncssh_options import connect_shared


def supported(wanted: Sequence[str], available: list[bytes]) -> list[str]:
    """`wanted`, in its order, less what this asyncssh cannot do."""
    have = {a.decode() for a in available}
    return [a for a in wanted if a in have]


def login_key_path(vm: VM, login: str) -> str:
    """The config key path of a VM login's private key, as every problem with it is named."""
    return f"vms[{vm.name}].logins.{login}.key"


class Credentials:
    """Private keys per (VM, login), loaded once at start. Never printed."""

    def __init__(self, keys: Mapping[tuple[str, str], asyncssh.SSHKey]) -> None:
        self._keys = dict(keys)

    def __repr__(self) -> str:
        return f"Credentials({len(self._keys)} keys)"

    @classmethod
    def load(cls, vms: Mapping[str, VM]) -> Credentials:
        """Read every configured login key. Raises StartupError naming the key path, also for a key that is not
        the gateway's own or that group or others may access (as ssh refuses such an identity file)."""
        keys: dict[tuple[str, str], asyncssh.SSHKey] = {}
        for vm in vms.values():
            for login in vm.logins.values():
                keys[(vm.name, login.name)] = read_private_key(login.key, login_key_path(vm, login.name), "VM login key")
        return cls(keys)

    def get(self, vm: str, login: str) -> asyncssh.SSHKey | None:
        return self._keys.get((vm, login))


_SETTLED_NS = 2_000_000_000  # a known_hosts file older than this is cached (see HostKeys._read_known_hosts)


class HostKeys:
    """Trusted host keys per VM: from the inventory, a known_hosts file, or trust on first use.

    Inventory keys are parsed once per VM. A known_hosts file is parsed again only when its device, inode, size,
    mtime or ctime changed since a login last read it, so an edit counts from the next login; a reload builds a new
    HostKeys and so reads every file again."""

    def __init__(self, vms: Mapping[str, VM], tofu_file: Path, log: FilteringBoundLogger) -> None:
        self._vms = vms
        self._tofu_file = tofu_file
        self._log = log
        self._inventory: dict[str, tuple[VM, list[asyncssh.SSHKey]]] = {}
        self._known_hosts: dict[Path, tuple[tuple[int, ...], asyncssh.SSHKnownHosts]] = {}
        self._learned: dict[str, list[asyncssh.SSHKey]] = {}
        self._lock = asyncio.Lock()
        if tofu_file.exists():
            for line in tofu_file.read_text().splitlines():
                name, _, key = line.partition(" ")
                with contextlib.suppress(asyncssh.KeyImportError, ValueError):
                    self._learned.setdefault(name, []).append(asyncssh.import_public_key(key))

    def _read_known_hosts(self, path: Path) -> asyncssh.SSHKnownHosts:
        """The parsed file, read again when it changed. Raises OSError or ValueError as asyncssh's reader does.

        A file changed in the last seconds is not kept: file times tick coarsely (a few ms), and a second write of the
        same size within one tick would otherwise go unseen."""
        st = os.stat(path)
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._known_hosts.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        kh = asyncssh.read_known_hosts(str(path))
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS:
            self._known_hosts[path] = (stamp, kh)
        return kh

    def trusted(self, vm: VM) -> list[asyncssh.SSHKey]:
        inventory = self._inventory.get(vm.name)
        if inventory is None or inventory[0] is not vm:
            inventory = self._inventory[vm.name] = (vm, [asyncssh.import_public_key(k) for k in vm.host_keys])
        keys = list(inventory[1])
        if vm.known_hosts is not None:
            try:
                kh = self._read_known_hosts(vm.known_hosts)
            except (OSError, ValueError) as exc:
                self._log.error("known_hosts_unreadable", vm=vm.name, path=str(vm.known_hosts), error=str(exc))
            else:
                for host in (vm.name, vm.address):
                    port_host = host if vm.ssh_port == 22 else f"[{host}]:{vm.ssh_port}"
                    for h in {host, port_host}:
                        matched = kh.match(h, "", vm.ssh_port)
                        keys.extend(matched[0])
        if vm.trust_on_first_use:
            keys.extend(self._learned.get(vm.name, []))
        return keys

    async def learn(self, vm: VM, key: asyncssh.SSHKey) -> None:
        async with self._lock:
            if vm.name in self._learned:
                return
            self._learned[vm.name] = [key]
            line = f"{vm.name} {key.export_public_key().decode().strip()}\n"
            fd = os.open(self._tofu_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(line)
        self._log.warning("upstream_host_key_trusted_first_use", vm=vm.name, fingerprint=key.get_fingerprint())


class ClientOptions:
    """Prepared asyncssh client options by the shape of a VM login (see `connect_vm`), at most `limit` of them (the
    oldest goes first). One per handler: a reload builds new handlers, so nothing here outlives the config it came from."""

    def __init__(self, limit: int = 256) -> None:
        self._limit = limit
        self._templates: dict[tuple[object, ...], asyncssh.SSHClientConnectionOptions] = {}

    def __repr__(self) -> str:
        return f"ClientOptions({len(self._templates)} templates)"

    def get(self, shape: tuple[object, ...]) -> asyncssh.SSHClientConnectionOptions | None:
        return self._templates.get(shape)

    def put(self, shape: tuple[object, ...], template: asyncssh.SSHClientConnectionOptions) -> None:
        if shape not in self._templates and len(self._templates) >= self._limit:
            del self._templates[next(iter(self._templates))]
        self._templates[shape] = template


async def connect_vm(
    vm: VM,
    login: str,
    credentials: Credentials,
    host_keys: HostKeys,
    timeout: float,
    *,
    keepalive: tuple[float, int] = (30.0, 3),
    ciphers: Sequence[str] = DEFAULT_VM_CIPHERS,
    options: ClientOptions | None = None,
) -> asyncssh.SSHClientConnection:
    """Dial the VM's inventory address and log in as `login`, offering `ciphers` (`ssh.vm_ciphers`) in that order and
    only modern key exchanges and MACs (asyncssh's defaults still include SHA-1 ones).

    With `options`, the prepared asyncssh options are shared by every connection to the same VM address and port as
    the same login with the same key, trusted host keys, keepalive and ciphers (`asyncssh_options`).

    The caller owns the returned connection. Raises UpstreamHostKeyMismatch when
    the VM's key is not the trusted one, UpstreamAuthFailed, UpstreamTimeout or
    UpstreamError.
    """
    key = credentials.get(vm.name, login)
    if key is None:
        raise UpstreamAuthFailed(f"no credential for login {login!r} on VM {vm.name!r}")
    trusted = host_keys.trusted(vm)
    first_use = not trusted and vm.trust_on_first_use
    if not trusted and not first_use:
        raise UpstreamHostKeyMismatch(f"no trusted host key for VM {vm.name!r}")
    no_keys: list[asyncssh.SSHKey] = []
    known_hosts = None if first_use else (trusted, no_keys, no_keys)
    kex, enc = supported(SSH_KEX_ALGS, get_kex_algs()), supported(ciphers, get_encryption_algs())
    mac = supported(SSH_MAC_ALGS, get_mac_algs())
    shape = (vm.name, vm.address, vm.ssh_port, login, key.public_data, tuple(k.public_data for k in trusted), keepalive, tuple(enc))
    template = options.get(shape) if options is not None else None
    sock = await dial(vm.address, vm.ssh_port, timeout)
    try:
        async with asyncio.timeout(timeout):
            if template is None:
                template = await asyncssh.SSHClientConnectionOptions.construct(
                    host=vm.address,
                    port=vm.ssh_port,
                    config=None,
                    known_hosts=known_hosts,
                    username=login,
                    client_keys=[key],
                    agent_path=None,
                    agent_forwarding=False,
                    preferred_auth="publickey",
                    password=None,
                    kbdint_auth=False,
                    gss_host=None,
                    x509_trusted_certs=None,
                    encoding=None,
                    keepalive_interval=keepalive[0],
                    keepalive_count_max=keepalive[1],
                    kex_algs=kex,
                    encryption_algs=enc,
                    mac_algs=mac,
                )
                if options is not None:
                    options.put(shape, template)
            conn = await connect_shared(sock, template)
    except asyncssh.HostKeyNotVerifiable:
        raise UpstreamHostKeyMismatch(f"host key of VM {vm.name!r} does not match the trusted key") from None
    except asyncssh.PermissionDenied:
        raise UpstreamAuthFailed(f"VM {vm.name!r} refused the gateway's credential for {login!r}") from None
    except TimeoutError:
        sock.close()
        raise UpstreamTimeout(f"VM {vm.name!r} did not finish the SSH handshake within {timeout:g}s") from None
    except (asyncssh.Error, OSError) as exc:
        sock.close()
        raise UpstreamError(f"SSH to VM {vm.name!r} failed: {exc}") from None
    if first_use:
        server_key = conn.get_server_host_key()
        if server_key is not None:
            await host_keys.learn(vm, server_key)
    return conn
