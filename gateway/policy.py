"""The VM inventory and the rules: may this principal reach this target?

Default deny: only what a rule grants is allowed. Names are compared exactly
(no case folding, no trailing dots). A refusal never says whether the VM
exists, so users cannot probe the inventory: only a user whom some rule lets
reach the VM learns which protocol is missing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gateway.config import VM, Limits, Rule, User
from gateway.errors import PolicyDenied, TargetRefused
from gateway.kinds import Protocol


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
    protocol: Protocol
    port: int
    login: str | None
    env: tuple[str, ...]
    limits: Limits = field(default_factory=Limits)


def _limits(rules: Iterable[Rule]) -> Limits:
    """The limits of the rules that granted an access: the most permissive of them."""
    out: Limits | None = None
    for rule in rules:
        out = rule.limits if out is None else out.most_permissive(rule.limits)
    return out or Limits()


def not_found_message(name: str) -> str:
    return f"VM {name!r} does not exist or you may not reach it"


class Policy:
    def __init__(self, vms: Mapping[str, VM], users: Mapping[str, User], rules: Iterable[Rule]) -> None:
        self._vms = dict(vms)
        self._users = dict(users)
        self._rules = tuple(rules)

    def replace(self, vms: Mapping[str, VM], users: Mapping[str, User], rules: Iterable[Rule]) -> None:
        """A reload: every later check sees the new inventory, users and rules (one object, shared by reference)."""
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

    def _not_granted(self, principal: Principal, vm: VM, protocol: Protocol) -> PolicyDenied:
        """The refusal when no rule grants `protocol` on `vm`: which protocol is missing, for a user who may reach
        the VM by another one (she knows it exists); else the same words as for a VM that does not exist."""
        others = [str(p) for p in Protocol if p != protocol and self._rules_for(principal, vm, p)]
        if others:
            text = f"VM {vm.name!r} does not grant you '{protocol}' (you may use: {', '.join(others)})"
            return PolicyDenied(text, reason="protocol_denied")
        return PolicyDenied(not_found_message(vm.name))

    def check_ssh(self, principal: Principal, vm_name: str, login: str | None) -> Grant:
        """May `principal` open an SSH session on `vm_name` as `login` (None: the default)?

        Raises PolicyDenied with a message that does not reveal whether the VM exists.
        """
        vm = self._vms.get(vm_name)
        if vm is None:
            raise PolicyDenied(not_found_message(vm_name), reason="unknown_vm")
        rules = self._rules_for(principal, vm, Protocol.SSH)
        if not rules:
            raise self._not_granted(principal, vm, Protocol.SSH)
        chosen = login if login is not None else vm.default_login
        if chosen is None:
            raise PolicyDenied(f"VM {vm_name!r} has no default login; name one as USER+VM+LOGIN", reason="login_required")
        if chosen not in vm.logins:
            raise PolicyDenied(f"login {chosen!r} is not available on VM {vm_name!r} for you", reason="login_denied")
        env: list[str] = []
        granting: list[Rule] = []
        for rule in rules:
            granted = rule.logins if rule.logins is not None else ((vm.default_login,) if vm.default_login else ())
            if chosen in granted or "*" in granted:
                granting.append(rule)
                env.extend(rule.env)
        if not granting:
            raise PolicyDenied(f"login {chosen!r} is not available on VM {vm_name!r} for you", reason="login_denied")
        return Grant(vm=vm, protocol=Protocol.SSH, port=vm.ssh_port, login=chosen, env=tuple(dict.fromkeys(env)), limits=_limits(granting))

    def check_forward(self, principal: Principal, host: str, port: int, protocol: Protocol = Protocol.SSH_JUMP) -> Grant:
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
        session_protocol = Protocol.RDP if is_rdp else protocol
        candidates = [(protocol, self._rules_for(principal, vm, protocol))]
        if is_rdp:
            candidates.append((Protocol.RDP, self._rules_for(principal, vm, Protocol.RDP)))
        if not any(rules for _, rules in candidates):
            raise self._not_granted(principal, vm, protocol)
        granting = [
            rule
            for proto, rules in candidates
            for rule in rules
            if port in (rule.ports if rule.ports is not None else _default_ports(vm, proto, (vm.ssh_port,)))
        ]
        if granting:
            return Grant(vm=vm, protocol=session_protocol, port=port, login=None, env=(), limits=_limits(granting))
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
        protocol = Protocol.RDP if vm.rdp_port is not None and port == vm.rdp_port else Protocol.TCP
        rules = self._rules_for(principal, vm, protocol)
        if not rules:
            if self._rules_for(principal, vm, Protocol.RDP if protocol == Protocol.TCP else Protocol.TCP):
                raise PolicyDenied(f"port {port} on VM {vm_name!r} is not granted to you", reason="port_denied")
            raise self._not_granted(principal, vm, protocol)
        granting = [rule for rule in rules if port in (rule.ports if rule.ports is not None else _default_ports(vm, protocol, ()))]
        if granting:
            return Grant(vm=vm, protocol=protocol, port=port, login=None, env=(), limits=_limits(granting))
        raise PolicyDenied(f"port {port} on VM {vm_name!r} is not granted to you", reason="port_denied")

    def check_rdg(self, principal: Principal, vm_name: str, port: int) -> Grant:
        """May `principal` reach `vm_name`'s RDP port `port` through the RD Gateway? Only an `rdp` rule grants it.

        Raises PolicyDenied without revealing whether the VM exists.
        """
        grant = self.check_tunnel(principal, vm_name, port)
        if grant.protocol != Protocol.RDP:
            raise PolicyDenied(f"port {port} on VM {vm_name!r} is not an RDP port granted to you", reason="port_denied")
        return dataclasses.replace(grant, protocol=Protocol.RDP_GATEWAY)

    def check_web_terminal(self, principal: Principal, vm_name: str, login: str | None) -> Grant:
        """May `principal` open a browser terminal on `vm_name` as `login`? Exactly what `ssh USER+VM+LOGIN` may."""
        return dataclasses.replace(self.check_ssh(principal, vm_name, login), protocol=Protocol.SSH_WEB)

    def ssh_logins(self, principal: Principal, vm: VM) -> tuple[str, ...]:
        """The logins `principal` may use on `vm` through an `ssh` rule (for the browser's VM list)."""
        out: list[str] = []
        for rule in self._rules_for(principal, vm, Protocol.SSH):
            granted = rule.logins if rule.logins is not None else ((vm.default_login,) if vm.default_login else ())
            names = vm.logins.keys() if "*" in granted else granted
            out.extend(n for n in names if n in vm.logins)
        return tuple(dict.fromkeys(out))

    def granted_ports(self, principal: Principal, vm: VM) -> tuple[int, ...]:
        """The ports of `vm` this principal may reach by jump mode or tunnels (for listings): exactly what
        `check_forward` allows, so a listing never hides a grant. A rule's `ports` apply to each of its VMs; a rule
        without `ports` grants the VM's own SSH port (jump) or RDP port (rdp)."""
        ports: set[int] = set()
        for proto in (Protocol.SSH_JUMP, Protocol.RDP, Protocol.TCP):
            for rule in self._rules_for(principal, vm, proto):
                if rule.ports is not None:
                    ports.update(rule.ports)
                elif proto == Protocol.SSH_JUMP:
                    ports.add(vm.ssh_port)
                elif proto == Protocol.RDP and vm.rdp_port is not None:
                    ports.add(vm.rdp_port)
        return tuple(sorted(ports))

    def reachable(self, principal: Principal) -> list[tuple[VM, tuple[str, ...]]]:
        """The VMs the principal may reach and by which protocols, for listings."""
        out = []
        for vm in self._vms.values():
            protos = tuple(str(p) for p in Protocol if self._rules_for(principal, vm, p))
            if protos:
                out.append((vm, protos))
        return out


def _default_ports(vm: VM, protocol: Protocol, otherwise: tuple[int, ...]) -> tuple[int, ...]:
    """The ports a rule without `ports` grants: the rdp_port for rdp, else `otherwise`."""
    return (vm.rdp_port,) if protocol == Protocol.RDP and vm.rdp_port is not None else otherwise


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
