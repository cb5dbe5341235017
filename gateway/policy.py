"""The VM inventory and the rules: may this principal reach this target?

Default deny: only what a rule grants is allowed. Names are compared exactly
(no case folding, no trailing dots). A refusal never says whether the VM
exists, so users cannot probe the inventory.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.config import VM, Rule, User
from gateway.errors import PolicyDenied, TargetRefused


@dataclass(frozen=True)
class Principal:
    """An authenticated user."""

    name: str
    groups: tuple[str, ...]
    auth_method: str  # "publickey" | "certificate"


@dataclass(frozen=True)
class Grant:
    """What policy allowed: the resolved VM, and for SSH terminate the login."""

    vm: VM
    protocol: str
    port: int
    login: str | None
    env: tuple[str, ...]


def not_found_message(name: str) -> str:
    return f"VM {name!r} does not exist or you may not reach it"


class Policy:
    def __init__(self, vms: Mapping[str, VM], users: Mapping[str, User], rules: Iterable[Rule]) -> None:
        self._vms = dict(vms)
        self._users = dict(users)
        self._rules = tuple(rules)

    def user(self, name: str) -> User | None:
        return self._users.get(name)

    def users(self) -> Mapping[str, User]:
        return self._users

    def vm(self, name: str) -> VM | None:
        return self._vms.get(name)

    def _rules_for(self, principal: Principal, vm: VM, protocol: str) -> list[Rule]:
        out = []
        for rule in self._rules:
            who = principal.name in rule.users or "*" in rule.users or any(g in rule.groups for g in principal.groups)
            if who and protocol in rule.protocols and (vm.name in rule.vms or "*" in rule.vms):
                out.append(rule)
        return out

    def check_ssh(self, principal: Principal, vm_name: str, login: str | None) -> Grant:
        """May `principal` open an SSH session on `vm_name` as `login` (None: the default)?

        Raises PolicyDenied with a message that does not reveal whether the VM exists.
        """
        vm = self._vms.get(vm_name)
        if vm is None:
            raise PolicyDenied(not_found_message(vm_name), reason="unknown_vm")
        rules = self._rules_for(principal, vm, "ssh")
        if not rules:
            raise PolicyDenied(not_found_message(vm_name))
        chosen = login if login is not None else vm.default_login
        if chosen is None:
            raise PolicyDenied(f"VM {vm_name!r} has no default login; name one as USER+VM+LOGIN", reason="login_required")
        if chosen not in vm.logins:
            raise PolicyDenied(f"login {chosen!r} is not available on VM {vm_name!r} for you", reason="login_denied")
        env: list[str] = []
        allowed = False
        for rule in rules:
            granted = rule.logins if rule.logins is not None else ((vm.default_login,) if vm.default_login else ())
            if chosen in granted or "*" in granted:
                allowed = True
                env.extend(rule.env)
        if not allowed:
            raise PolicyDenied(f"login {chosen!r} is not available on VM {vm_name!r} for you", reason="login_denied")
        return Grant(vm=vm, protocol="ssh", port=vm.ssh_port, login=chosen, env=tuple(dict.fromkeys(env)))

    def check_forward(self, principal: Principal, host: str, port: int, protocol: str = "ssh-jump") -> Grant:
        """May `principal` open a TCP connection to inventory name `host` on `port` (ssh -J/-W/-L)?

        `host` is what a client typed: it must be an inventory name exactly. IP
        literals and anything else are refused; the address dialled is always the
        inventory's. A forward to the VM's rdp_port is an `rdp` session, allowed by
        an `rdp` rule (absent `ports`: the rdp_port) or an `ssh-jump` rule listing the port.
        """
        if _is_ip_literal(host):
            raise TargetRefused(f"{host!r} is an address; name a VM from the inventory instead", reason="target_not_inventory")
        vm = self._vms.get(host)
        if vm is None:
            raise PolicyDenied(not_found_message(host), reason="unknown_vm")
        is_rdp = vm.rdp_port is not None and port == vm.rdp_port
        session_protocol = "rdp" if is_rdp else protocol
        candidates = [(protocol, self._rules_for(principal, vm, protocol))]
        if is_rdp:
            candidates.append(("rdp", self._rules_for(principal, vm, "rdp")))
        if not any(rules for _, rules in candidates):
            raise PolicyDenied(not_found_message(host))
        for proto, rules in candidates:
            for rule in rules:
                default = (vm.rdp_port,) if proto == "rdp" and vm.rdp_port is not None else (vm.ssh_port,)
                if port in (rule.ports if rule.ports is not None else default):
                    return Grant(vm=vm, protocol=session_protocol, port=port, login=None, env=())
        raise PolicyDenied(f"port {port} on VM {host!r} is not granted to you", reason="port_denied")

    def check_tunnel(self, principal: Principal, vm_name: str, port: int) -> Grant:
        """May `principal` tunnel TCP (a WebSocket tunnel) to `vm_name` port `port`?

        The session protocol is `rdp` when the port is the VM's rdp_port, else `tcp`;
        a rule must grant that protocol and the port (absent `ports`: only the rdp_port,
        for rdp). Raises PolicyDenied without revealing whether the VM exists.
        """
        vm = self._vms.get(vm_name)
        if vm is None:
            raise PolicyDenied(not_found_message(vm_name), reason="unknown_vm")
        protocol = "rdp" if vm.rdp_port is not None and port == vm.rdp_port else "tcp"
        rules = self._rules_for(principal, vm, protocol)
        if not rules:
            if self._rules_for(principal, vm, "rdp" if protocol == "tcp" else "tcp"):
                raise PolicyDenied(f"port {port} on VM {vm_name!r} is not granted to you", reason="port_denied")
            raise PolicyDenied(not_found_message(vm_name))
        for rule in rules:
            default = (vm.rdp_port,) if protocol == "rdp" and vm.rdp_port is not None else ()
            if port in (rule.ports if rule.ports is not None else default):
                return Grant(vm=vm, protocol=protocol, port=port, login=None, env=())
        raise PolicyDenied(f"port {port} on VM {vm_name!r} is not granted to you", reason="port_denied")

    def granted_ports(self, principal: Principal, vm: VM) -> tuple[int, ...]:
        """The VM ports this principal may reach by jump mode or tunnels (for listings)."""
        ports: set[int] = set()
        for proto in ("ssh-jump", "rdp", "tcp"):
            for rule in self._rules_for(principal, vm, proto):
                if rule.ports is not None:
                    ports.update(rule.ports)
                elif proto == "ssh-jump":
                    ports.add(vm.ssh_port)
                elif proto == "rdp" and vm.rdp_port is not None:
                    ports.add(vm.rdp_port)
        return tuple(sorted(ports))

    def reachable(self, principal: Principal) -> list[tuple[VM, tuple[str, ...]]]:
        """The VMs the principal may reach and by which protocols, for listings."""
        out = []
        for vm in self._vms.values():
            protos = tuple(p for p in ("ssh", "ssh-jump", "rdp", "tcp") if self._rules_for(principal, vm, p))
            if protos:
                out.append((vm, protos))
        return out


def env_allowed(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_ip_literal(host: str) -> bool:
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class LoginTarget:
    """What an SSH user name asks for: `alice`, `alice+web01`, `alice+web01+root`."""

    user: str
    vm: str | None
    login: str | None


def parse_username(raw: str) -> LoginTarget:
    """Split an SSH user name into user, VM and login.

    Accepted forms (all work unquoted with ssh, scp and sftp):
    `USER`, `USER+VM`, `USER@VM`, `USER+VM+LOGIN`, `USER@VM+LOGIN`.
    Raises ValueError on anything else.
    """
    if raw.count("@") > 1:
        raise ValueError("too many '@' in user name")
    head, sep, rest = raw.partition("@")
    if sep:
        if "+" in head:
            raise ValueError("expected USER@VM or USER@VM+LOGIN")
        parts = [head, *rest.split("+")]
    else:
        parts = raw.split("+")
    if len(parts) > 3 or any(p == "" for p in parts):
        raise ValueError("expected USER, USER+VM or USER+VM+LOGIN")
    return LoginTarget(parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else None)
