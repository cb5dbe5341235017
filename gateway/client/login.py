"""`bastion login` / `bastion logout` on a user's machine: a short-lived SSH certificate from the gateway.

The command makes (once) an ed25519 key in its directory, sends the public key to the gateway, prints a URL
and a code, and waits while its user approves the code in a browser signed in to the gateway (identity
provider or one-time link). It then writes the certificate beside the key and an `ssh_config` snippet, so plain
`ssh`, `scp`, `sftp` and `ssh -J` work with no key registered anywhere. Nothing secret leaves the machine: the
private key never does, and the certificate is useless without it.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import webbrowser
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh

POLL_EVERY = 2.0
WAIT_AT_MOST = 600.0


class LoginError(Exception):
    """`message` is for the user, one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Files:
    dir: Path

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def cert(self) -> Path:
        return self.dir / "id_ed25519-cert.pub"

    @property
    def config(self) -> Path:
        return self.dir / "ssh_config"


def default_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "bastion"


def _key(files: Files) -> asyncssh.SSHKey:
    files.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(files.dir, 0o700)
    if files.key.exists():
        return asyncssh.read_private_key(files.key)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="bastion login")
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    files.key.with_name(files.key.name + ".pub").write_bytes(key.export_public_key())
    return key


def _ssl(ca_file: str | None, insecure: bool) -> ssl.SSLContext | bool:
    if insecure:
        return False
    return ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()


async def login(gateway: str, files: Files, *, ca_file: str | None, insecure: bool, open_browser: bool, out: Any = sys.stdout) -> str:
    """Run the whole login; returns the user name the certificate is for. Raises LoginError."""
    host, _, port = gateway.rpartition(":")
    if not host or not port.isdigit():
        raise LoginError(f"--gateway must be HOST:PORT, got {gateway!r}")
    key = _key(files)
    base = f"https://{gateway}"
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=_ssl(ca_file, insecure))) as http:
            async with http.post(base + "/api/cli/start", json={"public_key": key.export_public_key().decode()}) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise LoginError(f"the gateway refused: {body.get('message') if isinstance(body, dict) else resp.status}")
            print(f"Open {body['url']}\nsign in if asked, and approve the code {body['code']}", file=out, flush=True)
            if open_browser:
                webbrowser.open(body["url"])
            async with asyncio.timeout(WAIT_AT_MOST):
                while True:
                    async with http.get(base + "/api/cli/poll", params={"id": body["id"]}) as resp:
                        answer = await resp.json(content_type=None)
                        if resp.status == 200:
                            break
                        if resp.status != 202:
                            raise LoginError(answer.get("message", f"the gateway answered {resp.status}"))
                    await asyncio.sleep(POLL_EVERY)
    except aiohttp.ClientConnectorCertificateError as exc:
        raise LoginError(f"cannot verify the gateway's certificate ({exc.certificate_error}); pass --ca-file") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise LoginError(f"cannot reach {base}: {exc or type(exc).__name__}") from None
    user = str(answer["user"])
    fd = os.open(files.cert, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(str(answer["certificate"]) + "\n")
    alias = f"bastion-{host}"
    files.config.write_text(
        f"# written by `bastion login` for {user}; valid until {answer['valid_before']}\n"
        f"# use it with `ssh -F {files.config} {user}+VM@{alias}`, or `Include {files.config}` in ~/.ssh/config\n"
        f"Host {alias}\n  HostName {host}\n  Port {port}\n  IdentityFile {files.key}\n  CertificateFile {files.cert}\n"
        f"  IdentitiesOnly yes\n"
    )
    print(f"Signed in as {user} until {answer['valid_before']}. Try: ssh -F {files.config} {user}+VM@{alias}", file=out)
    return user


def logout(files: Files) -> bool:
    """Remove the certificate, the key and the snippet. True if there was anything to remove."""
    gone = False
    for path in (files.cert, files.key, files.key.with_name(files.key.name + ".pub"), files.config):
        if path.exists():
            path.unlink()
            gone = True
    return gone
