"""gateway.policy: user-name parsing, default deny, login selection, forward targets, env patterns."""

from __future__ import annotations

import pytest

from gateway.config import VM, Rule
from gateway.errors import PolicyDenied, TargetRefused
from gateway.policy import LoginTarget, Policy, env_allowed, not_found_message, parse_username

from .helpers import ALICE, BOB, CAROL, make_policy, users

SSH_WEB01 = Rule(users=("alice",), vms=("web01",), protocols=("ssh",))
JUMP_WEB01 = Rule(users=("alice",), vms=("web01",), protocols=("ssh-jump",))


def _denied_ssh(rule: Rule | None, vm: str, login: str | None = None) -> PolicyDenied:
    policy = make_policy(*(() if rule is None else (rule,)))
    with pytest.raises(PolicyDenied) as info:
        policy.check_ssh(ALICE, vm, login)
    return info.value


def _denied_forward(rule: Rule | None, host: str, port: int, protocol: str = "ssh-jump") -> PolicyDenied:
    policy = make_policy(*(() if rule is None else (rule,)))
    with pytest.raises(PolicyDenied) as info:
        policy.check_forward(ALICE, host, port, protocol)
    return info.value


# --- parse_username ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice", LoginTarget("alice", None, None)),
        ("alice+web01", LoginTarget("alice", "web01", None)),
        ("alice@web01", LoginTarget("alice", "web01", None)),
        ("alice+web01+root", LoginTarget("alice", "web01", "root")),
        ("alice@web01+root", LoginTarget("alice", "web01", "root")),
    ],
)
def test_parse_username_accepted_forms(raw: str, expected: LoginTarget) -> None:
    """Every documented user-name form splits into user, VM and login."""
    assert parse_username(raw) == expected


@pytest.mark.parametrize("raw", ["alice++web01", "a+b+c+d", "a@b@c", "+web01", "alice+", "alice@", "@web01", "", "alice@web01+root+x"])
def test_parse_username_rejects(raw: str) -> None:
    """Empty parts, too many parts and repeated '@' raise ValueError."""
    with pytest.raises(ValueError):
        parse_username(raw)


def test_parse_username_rejects_plus_before_at() -> None:
    """`USER+VM@LOGIN` is not a documented form and must raise ValueError."""
    with pytest.raises(ValueError):
        parse_username("alice+web01@root")


# --- check_ssh: who and which VM --------------------------------------------


def test_no_rules_denies() -> None:
    """Default deny: with no rules nobody reaches anything."""
    assert _denied_ssh(None, "web01").reason == "policy_denied"


def test_unknown_and_denied_vm_give_the_same_message() -> None:
    """A refusal reads the same whether the VM is missing or merely not granted."""
    denied = _denied_ssh(SSH_WEB01, "db01")
    unknown = _denied_ssh(SSH_WEB01, "ghost01")
    assert denied.message.replace("db01", "NAME") == unknown.message.replace("ghost01", "NAME")
    assert denied.message == not_found_message("db01")


def test_unknown_and_denied_forward_give_the_same_message() -> None:
    """check_forward refusals do not reveal which VMs exist either."""
    denied = _denied_forward(JUMP_WEB01, "db01", 2222)
    unknown = _denied_forward(JUMP_WEB01, "ghost01", 2222)
    assert denied.message.replace("db01", "NAME") == unknown.message.replace("ghost01", "NAME")


def test_a_user_who_reaches_the_vm_reads_which_protocol_is_missing() -> None:
    """alice may SSH to web01 but holds no tcp rule: the tunnel refusal names 'tcp' and what she may use instead."""
    with pytest.raises(PolicyDenied) as info:
        make_policy(SSH_WEB01, JUMP_WEB01).check_tunnel(ALICE, "web01", 8080)
    assert info.value.message == "VM 'web01' does not grant you 'tcp' (you may use: ssh, ssh-jump)"
    assert info.value.reason == "protocol_denied"


def test_the_missing_protocol_is_named_for_ssh_and_jump_too() -> None:
    """Only a jump rule: `ssh alice+web01` names 'ssh'; only an ssh rule: `ssh -J` names 'ssh-jump'."""
    assert _denied_ssh(JUMP_WEB01, "web01").message == "VM 'web01' does not grant you 'ssh' (you may use: ssh-jump)"
    assert _denied_forward(SSH_WEB01, "web01", 22).message == "VM 'web01' does not grant you 'ssh-jump' (you may use: ssh)"


def test_a_user_who_cannot_reach_the_vm_learns_nothing_about_its_protocols() -> None:
    """bob holds no rule for web01 at all: his tunnel refusal is the unchanged 'does not exist or you may not reach it'."""
    with pytest.raises(PolicyDenied) as info:
        make_policy(SSH_WEB01).check_tunnel(BOB, "web01", 8080)
    assert info.value.message == not_found_message("web01")


def test_rule_by_user_grants() -> None:
    """A rule naming the user grants the VM with its default login and SSH port."""
    grant = make_policy(SSH_WEB01).check_ssh(ALICE, "web01", None)
    assert (grant.vm.name, grant.protocol, grant.port, grant.login) == ("web01", "ssh", 22, "deploy")


def test_rule_by_user_does_not_grant_other_users() -> None:
    """A rule naming alice does not grant bob."""
    with pytest.raises(PolicyDenied):
        make_policy(SSH_WEB01).check_ssh(BOB, "web01", None)


def test_rule_by_group_grants() -> None:
    """A rule naming a group grants its members."""
    rule = Rule(groups=("dev",), vms=("web01",), protocols=("ssh",))
    assert make_policy(rule).check_ssh(BOB, "web01", None).vm.name == "web01"


def test_rule_by_group_does_not_grant_non_members() -> None:
    """A rule naming a group does not grant users outside it."""
    rule = Rule(groups=("dev",), vms=("web01",), protocols=("ssh",))
    with pytest.raises(PolicyDenied):
        make_policy(rule).check_ssh(ALICE, "web01", None)


def test_rule_for_any_user() -> None:
    """users = ["*"] grants every authenticated user."""
    rule = Rule(users=("*",), vms=("web01",), protocols=("ssh",))
    assert make_policy(rule).check_ssh(CAROL, "web01", None).login == "deploy"


def test_rule_for_every_vm() -> None:
    """vms = ["*"] grants every VM in the inventory."""
    rule = Rule(users=("alice",), vms=("*",), protocols=("ssh",))
    policy = make_policy(rule)
    assert policy.check_ssh(ALICE, "db01", None).port == 2222
    assert policy.check_ssh(ALICE, "web01", None).port == 22


def test_wildcard_vm_rule_still_refuses_unknown_vm() -> None:
    """vms = ["*"] does not conjure VMs that are not in the inventory."""
    rule = Rule(users=("alice",), vms=("*",), protocols=("ssh",))
    assert _denied_ssh(rule, "ghost01").message == not_found_message("ghost01")


def test_ssh_jump_rule_does_not_grant_ssh() -> None:
    """A rule for ssh-jump only does not allow a terminated SSH session."""
    assert _denied_ssh(JUMP_WEB01, "web01").reason == "protocol_denied"


def test_vm_name_is_matched_exactly_for_ssh() -> None:
    """WEB01 is not web01."""
    assert _denied_ssh(SSH_WEB01, "WEB01").message == not_found_message("WEB01")


# --- check_ssh: logins ------------------------------------------------------


def test_explicit_login_granted() -> None:
    """An explicit login listed in the rule is granted."""
    rule = Rule(users=("alice",), vms=("web01",), protocols=("ssh",), logins=("deploy", "root"))
    assert make_policy(rule).check_ssh(ALICE, "web01", "root").login == "root"


def test_explicit_login_not_granted() -> None:
    """An explicit login the rule does not list is refused with login_denied."""
    rule = Rule(users=("alice",), vms=("web01",), protocols=("ssh",), logins=("deploy",))
    assert _denied_ssh(rule, "web01", "root").reason == "login_denied"


def test_default_login_used_when_none_given() -> None:
    """No login in the user name means the VM's default_login."""
    rule = Rule(users=("alice",), vms=("web01",), protocols=("ssh",), logins=("deploy", "root"))
    assert make_policy(rule).check_ssh(ALICE, "web01", None).login == "deploy"


def test_absent_logins_allow_default_login_explicitly() -> None:
    """Without `logins` in the rule, naming the default login explicitly is allowed."""
    assert make_policy(SSH_WEB01).check_ssh(ALICE, "web01", "deploy").login == "deploy"


def test_absent_logins_deny_other_logins() -> None:
    """Without `logins` in the rule, only the VM's default_login is granted."""
    assert _denied_ssh(SSH_WEB01, "web01", "root").reason == "login_denied"


def test_wildcard_logins_grant_any_vm_login() -> None:
    """logins = ["*"] grants every login the VM defines."""
    rule = Rule(users=("alice",), vms=("web01",), protocols=("ssh",), logins=("*",))
    assert make_policy(rule).check_ssh(ALICE, "web01", "root").login == "root"


def test_wildcard_logins_do_not_invent_logins() -> None:
    """logins = ["*"] still refuses a login the VM does not define."""
    rule = Rule(users=("alice",), vms=("web01",), protocols=("ssh",), logins=("*",))
    assert _denied_ssh(rule, "web01", "admin").reason == "login_denied"


def test_vm_without_default_login_requires_one() -> None:
    """A VM with no default_login and no login in the user name gives login_required."""
    rule = Rule(users=("alice",), vms=("lab01",), protocols=("ssh",), logins=("*",))
    assert _denied_ssh(rule, "lab01").reason == "login_required"


def test_vm_without_default_login_and_rule_without_logins_grants_nothing() -> None:
    """With no default_login and no `logins` in the rule, no login is granted."""
    rule = Rule(users=("alice",), vms=("lab01",), protocols=("ssh",))
    assert _denied_ssh(rule, "lab01", "alpha").reason == "login_denied"


def test_login_granted_by_any_matching_rule() -> None:
    """A second rule can grant a login the first one does not."""
    narrow = Rule(users=("alice",), vms=("web01",), protocols=("ssh",), logins=("deploy",))
    wide = Rule(groups=("ops",), vms=("web01",), protocols=("ssh",), logins=("root",))
    assert make_policy(narrow, wide).check_ssh(ALICE, "web01", "root").login == "root"


def test_env_comes_only_from_rules_granting_the_login() -> None:
    """Env patterns are merged, de-duplicated, from the rules that grant the chosen login."""
    r1 = Rule(users=("alice",), vms=("web01",), protocols=("ssh",), logins=("deploy",), env=("LANG", "LC_*"))
    r2 = Rule(groups=("ops",), vms=("*",), protocols=("ssh",), logins=("deploy",), env=("LC_*", "TZ"))
    r3 = Rule(users=("alice",), vms=("web01",), protocols=("ssh",), logins=("root",), env=("SECRET",))
    assert make_policy(r1, r2, r3).check_ssh(ALICE, "web01", "deploy").env == ("LANG", "LC_*", "TZ")


# --- check_forward ----------------------------------------------------------


@pytest.mark.parametrize("host", ["10.0.0.1", "10.0.0.5", "127.0.0.1", "[::1]", "::1", "[fe80::1]"])
def test_forward_refuses_ip_literals(host: str) -> None:
    """IP literals, even the address of a granted VM, are refused as not inventory names."""
    rule = Rule(users=("alice",), vms=("*",), protocols=("ssh-jump",))
    with pytest.raises(TargetRefused) as info:
        make_policy(rule).check_forward(ALICE, host, 22)
    assert info.value.reason == "target_not_inventory"


@pytest.mark.parametrize("host", ["localhost", "WEB01", "web01.", "web01.internal", " web01", ""])
def test_forward_refuses_non_inventory_names(host: str) -> None:
    """Names that differ from an inventory name in any way are unknown."""
    rule = Rule(users=("alice",), vms=("*",), protocols=("ssh-jump",))
    assert _denied_forward(rule, host, 22).message == not_found_message(host)


def test_forward_default_port_is_vm_ssh_port() -> None:
    """Without `ports` the rule grants the VM's ssh_port."""
    rule = Rule(users=("alice",), vms=("db01",), protocols=("ssh-jump",))
    grant = make_policy(rule).check_forward(ALICE, "db01", 2222)
    assert (grant.vm.name, grant.port, grant.protocol, grant.login) == ("db01", 2222, "ssh-jump", None)


def test_forward_default_port_refuses_other_ports() -> None:
    """Without `ports` the rule refuses any port but ssh_port."""
    rule = Rule(users=("alice",), vms=("db01",), protocols=("ssh-jump",))
    assert _denied_forward(rule, "db01", 22).reason == "port_denied"


def test_forward_listed_port_allowed() -> None:
    """A port listed in the rule's ports is granted."""
    rule = Rule(users=("alice",), vms=("web01",), protocols=("ssh-jump",), ports=(22, 8080))
    assert make_policy(rule).check_forward(ALICE, "web01", 8080).port == 8080


def test_forward_unlisted_port_denied() -> None:
    """A port not in the rule's ports is refused with port_denied."""
    rule = Rule(users=("alice",), vms=("web01",), protocols=("ssh-jump",), ports=(8080,))
    assert _denied_forward(rule, "web01", 22).reason == "port_denied"


def test_forward_needs_protocol_in_rule() -> None:
    """A rule for "ssh" does not grant "ssh-jump"."""
    assert _denied_forward(SSH_WEB01, "web01", 22).reason == "protocol_denied"


def test_forward_with_explicit_protocol() -> None:
    """check_forward honours the protocol it is asked about."""
    grant = make_policy(SSH_WEB01).check_forward(ALICE, "web01", 22, protocol="ssh")
    assert grant.protocol == "ssh"


def test_forward_default_deny() -> None:
    """With no rules check_forward refuses."""
    assert _denied_forward(None, "web01", 22).reason == "policy_denied"


# --- reachable and env_allowed ----------------------------------------------


def test_listed_ports_are_each_vms_own_grants() -> None:
    """`ls` lists per VM what the rules grant for that VM, and exactly what check_forward allows: a rule without
    ports gives each VM its own SSH port (not the union of the VMs' ports); a rule's explicit ports apply to each of
    its VMs, and are listed for each, since each may be reached."""
    vms = {
        "web01": VM(name="web01", address="127.0.0.1", ssh_port=10122),
        "web02": VM(name="web02", address="127.0.0.1", ssh_port=10222),
    }
    own = Policy(vms, users(), [Rule(users=("alice",), vms=("*",), protocols=("ssh-jump",))])
    assert own.granted_ports(ALICE, vms["web01"]) == (10122,) and own.granted_ports(ALICE, vms["web02"]) == (10222,)
    explicit = Policy(vms, users(), [Rule(users=("alice",), vms=("*",), protocols=("ssh-jump",), ports=(5432, 10122))])
    assert explicit.granted_ports(ALICE, vms["web02"]) == (5432, 10122)
    for port in (5432, 10122):
        assert explicit.check_forward(ALICE, "web02", port).port == port


def test_reachable_lists_granted_vms_and_protocols() -> None:
    """reachable() lists each granted VM with the protocols that reach it."""
    reach = make_policy(SSH_WEB01, JUMP_WEB01, Rule(groups=("ops",), vms=("db01",), protocols=("ssh-jump",))).reachable(ALICE)
    assert [(vm.name, protos) for vm, protos in reach] == [("web01", ("ssh", "ssh-jump")), ("db01", ("ssh-jump",))]


@pytest.mark.parametrize(
    ("name", "patterns", "allowed"),
    [
        ("LC_ALL", ("LC_*",), True),
        ("LC_", ("LC_*",), True),
        ("LANG", ("LC_*",), False),
        ("lc_all", ("LC_*",), False),
        ("XLC_ALL", ("LC_*",), False),
        ("LANG", ("LANG",), True),
        ("LANGUAGE", ("LANG",), False),
        ("TZ", ("LC_*", "TZ"), True),
        ("TZ", (), False),
    ],
)
def test_env_allowed(name: str, patterns: tuple[str, ...], allowed: bool) -> None:
    """Env names match exact names or NAME* patterns, case-sensitively."""
    assert env_allowed(name, patterns) is allowed
