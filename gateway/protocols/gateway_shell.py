"""The gateway's own session: a user connected with no VM in the user name.

A shell shows a banner listing the VMs the user may reach and stays open, so
`ssh -L` forwards on the same connection keep working; `token` and `ls` are the
only commands. It relays nothing, so it is not a registry session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import asyncssh
from structlog.typing import FilteringBoundLogger

from gateway.errors import PolicyDenied
from gateway.policy import Policy
from gateway.protocols.lifecycle import Client
from gateway.tokens import TokenService

WEB_LINK_LIFETIME = 60.0  # seconds


class ShellContext(Protocol):
    """What the gateway shell needs from the door that accepted the connection."""

    @property
    def policy(self) -> Policy: ...

    @property
    def tokens(self) -> TokenService | None: ...

    @property
    def node(self) -> str: ...

    @property
    def public_hint(self) -> str: ...

    @property
    def public_port(self) -> int: ...

    @property
    def log(self) -> FilteringBoundLogger: ...


class GatewayShellSession(asyncssh.SSHServerSession[bytes]):
    """A session on the gateway itself (no VM named): a banner, then it stays open for forwards."""

    def __init__(self, door: ShellContext, client: Client, on_close: Callable[[], None] | None = None) -> None:
        self._door = door
        self._on_close = on_close
        self._client = client
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._kind = "shell"
        self._command: str | None = None
        self._pty = False

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def connection_lost(self, exc: Exception | None) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int], term_modes: dict[int, int]) -> bool:  # type: ignore[override]
        self._pty = True
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self._kind = "exec"
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def session_started(self) -> None:
        assert self._chan is not None
        nl = "\r\n" if self._pty else "\n"
        name = self._client.principal.name
        if self._kind == "exec":
            self._run_gateway_command((self._command or "").strip(), nl)
            return
        lines = [
            f"Bastion {self._door.node}: signed in as {name}. No VM named in the user name.",
            "Port forwards stay open while this session lasts (Ctrl-D or Ctrl-C ends it).",
            "VMs you may reach:",
        ]
        reachable = self._door.policy.reachable(self._client.principal)
        for vm, protos in reachable:
            lines.append(f"  {vm.name:<20} {', '.join(protos)}")
        if not reachable:
            lines.append("  (none)")
        port = self._door.public_port
        lines.append(f"Open a shell on one with: ssh {'' if port == 22 else f'-p {port} '}{name}+VM@{self._door.public_hint}")
        self._chan.write((nl.join(lines) + nl).encode())

    def _listing(self) -> list[str]:
        lines = []
        principal = self._client.principal
        for vm, protos in self._door.policy.reachable(principal):
            ports = self._door.policy.granted_ports(principal, vm)
            shown = "ports " + ", ".join(str(p) for p in ports) if ports else ""
            lines.append(f"  {vm.name:<20} {', '.join(protos):<28} {shown}".rstrip())
        return lines or ["  (none)"]

    def _run_gateway_command(self, command: str, nl: str) -> None:
        """The few commands the gateway itself answers: `token`, `ls`."""
        assert self._chan is not None
        name = self._client.principal.name
        if command == "token" and self._door.tokens is not None:
            token, claims = self._door.tokens.issue(name)
            self._door.log.info("token_issued", user=name, token_id=claims.token_id, lifetime_s=self._door.tokens.lifetime)
            self._chan.write((token + nl).encode())
            self._chan.exit(0)
        elif command == "web":
            self._web_link(nl)
        elif command == "rdp" or command.startswith("rdp "):
            self._rdp_file(command.split()[1:], nl)
        elif command == "ls":
            self._chan.write((nl.join(["VMs you may reach:", *self._listing()]) + nl).encode())
            self._chan.exit(0)
        else:
            msg = f"bastion: the gateway runs only `token`, `web`, `rdp VM` and `ls`; connect as {name}+VM to run commands on a VM{nl}"
            self._chan.write(msg.encode(), asyncssh.EXTENDED_DATA_STDERR)
            self._chan.exit(2)

    def _web_link(self, nl: str) -> None:
        """`web`: a one-time link that signs this user in to the browser terminal (a minute, one use)."""
        assert self._chan is not None
        name = self._client.principal.name
        if self._door.tokens is None:
            self._chan.exit(2)
            return
        token, claims = self._door.tokens.issue(name, use="web", lifetime=WEB_LINK_LIFETIME)
        self._door.log.info("token_issued", user=name, token_id=claims.token_id, purpose="web", lifetime_s=WEB_LINK_LIFETIME)
        self._chan.write(f"https://{self._door.public_hint}:{self._door.public_port}/login/link?t={token}{nl}".encode())
        self._chan.write(f"# open it within {WEB_LINK_LIFETIME:g} s; it works once{nl}".encode(), asyncssh.EXTENDED_DATA_STDERR)
        self._chan.exit(0)

    def _rdp_file(self, args: list[str], nl: str) -> None:
        """`rdp VM`: an .rdp file for mstsc or xfreerdp with an RD Gateway token bound to this user, VM and port."""
        assert self._chan is not None
        principal = self._client.principal
        if len(args) != 1 or self._door.tokens is None:
            self._chan.write(f"bastion: usage: rdp VM  (then save the output as VM.rdp){nl}".encode(), asyncssh.EXTENDED_DATA_STDERR)
            self._chan.exit(2)
            return
        vm = self._door.policy.vm(args[0])
        try:
            grant = self._door.policy.check_rdg(principal, args[0], vm.rdp_port if vm is not None and vm.rdp_port else 3389)
        except PolicyDenied as exc:
            self._door.log.info("token_refused", user=principal.name, purpose="rdg", target=args[0][:64], reason=exc.reason)
            self._chan.write(f"bastion: {exc.message}{nl}".encode(), asyncssh.EXTENDED_DATA_STDERR)
            self._chan.exit(1)
            return
        token, claims = self._door.tokens.issue(principal.name, vm=grant.vm.name, port=grant.port)
        self._door.log.info(
            "token_issued", user=principal.name, token_id=claims.token_id, purpose="rdg", vm=grant.vm.name, port=grant.port,
            lifetime_s=self._door.tokens.lifetime,
        )  # fmt: skip
        target = grant.vm.name if grant.port == 3389 else f"{grant.vm.name}:{grant.port}"
        gateway = f"{self._door.public_hint}:{self._door.public_port}"
        lines = [
            f"full address:s:{target}",
            f"gatewayhostname:s:{gateway}",
            "gatewayusagemethod:i:1",
            "gatewaycredentialssource:i:5",
            "gatewayprofileusagemethod:i:1",
            f"gatewayaccesstoken:s:{token}",
        ]
        self._chan.write(("\r\n".join(lines) + "\r\n").encode())
        hint = (
            f"# valid {self._door.tokens.lifetime / 60:g} min for one connection to {grant.vm.name}; open it with mstsc, or:{nl}"
            f"#   xfreerdp /v:{target} /g:{gateway} /gat:TOKEN          (FreeRDP 2){nl}"
            f"#   xfreerdp /v:{target} /gateway:g:{gateway},access-token:TOKEN   (FreeRDP 3){nl}"
        )
        self._chan.write(hint.encode(), asyncssh.EXTENDED_DATA_STDERR)
        self._chan.exit(0)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._chan is not None and (b"\x03" in data or b"\x04" in data):
            self._chan.exit(0)

    def eof_received(self) -> bool:
        if self._chan is not None:
            self._chan.exit(0)
        return True
