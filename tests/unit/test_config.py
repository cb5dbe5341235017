"""gateway.config: parse_config / load_config problems with key paths, parse_duration, parse_listen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import Limits, ListenAddress, OIDCSection, load_config, parse_config, parse_duration, parse_listen
from gateway.errors import ConfigError

from .helpers import config_problems, problem_message, problem_paths, public_key, valid_config_data

LOOKALIKE = "w\u0435b01"  # Cyrillic small letter ie, renders like "web01"


def _vm(data: dict[str, Any], index: int = 0) -> dict[str, Any]:
    vm: dict[str, Any] = data["vms"][index]
    return vm


def _rule(data: dict[str, Any], index: int = 0) -> dict[str, Any]:
    rule: dict[str, Any] = data["rules"][index]
    return rule


# --- the valid baseline -----------------------------------------------------


def test_minimal_document_is_valid() -> None:
    """The helper's baseline document parses into the expected objects."""
    cfg = parse_config(valid_config_data(), base_dir=Path("/cfg"))
    assert set(cfg.vms) == {"web01"}
    assert set(cfg.users) == {"alice"}
    assert cfg.rules[0].vms == ("web01",)
    assert cfg.public.listen == (ListenAddress("127.0.0.1", 2222),)


def test_relative_paths_resolve_against_base_dir() -> None:
    """A relative login key path is taken relative to the config file's folder; absolute ones stay."""
    cfg = parse_config(valid_config_data(), base_dir=Path("/cfg"))
    logins = cfg.vms["web01"].logins
    assert logins["deploy"].key == Path("/cfg/keys/deploy")
    assert logins["root"].key == Path("/etc/bastion/root")


def test_rule_without_logins_or_ports_keeps_them_none() -> None:
    """Absent `logins` and `ports` stay None so policy can apply the VM's defaults."""
    rule = parse_config(valid_config_data(), base_dir=Path("/cfg")).rules[0]
    assert rule.logins is None
    assert rule.ports is None


def test_single_login_becomes_default_login() -> None:
    """A VM with exactly one login and no default_login uses that login as default."""
    data = valid_config_data()
    del _vm(data)["default_login"]
    _vm(data)["logins"] = {"deploy": {"key": "keys/deploy"}}
    assert parse_config(data, base_dir=Path("/cfg")).vms["web01"].default_login == "deploy"


# --- problems, one at a time ------------------------------------------------


def test_unknown_top_level_key() -> None:
    """An unknown top-level key is reported at its own name."""
    data = valid_config_data()
    data["firewall"] = {}
    assert problem_paths(data) == ["firewall"]


def test_unknown_top_level_key_message_lists_allowed_keys() -> None:
    """The unknown-key message lists what is allowed."""
    data = valid_config_data()
    data["firewall"] = {}
    assert "gateway" in problem_message(data, "firewall")


def test_unknown_key_inside_ssh_section() -> None:
    """An unknown key inside [ssh] is reported as ssh.<key>."""
    data = valid_config_data()
    data["ssh"]["ciphers"] = ["aes"]
    assert problem_paths(data) == ["ssh.ciphers"]


def test_bad_duration() -> None:
    """A duration with an unknown unit is reported at its key with the value."""
    data = valid_config_data()
    data["ssh"]["login_grace_time"] = "30x"
    assert problem_paths(data) == ["ssh.login_grace_time"]
    assert "'30x'" in problem_message(data, "ssh.login_grace_time")


def test_zero_duration_is_rejected() -> None:
    """A duration must be positive."""
    data = valid_config_data()
    data["gateway"]["connect_timeout"] = "0s"
    assert problem_paths(data) == ["gateway.connect_timeout"]
    assert "'0s'" in problem_message(data, "gateway.connect_timeout")


def test_port_out_of_range() -> None:
    """vms[0].ssh_port = 70000 is reported with the value."""
    data = valid_config_data()
    _vm(data)["ssh_port"] = 70000
    assert problem_paths(data) == ["vms[0].ssh_port"]
    assert "70000" in problem_message(data, "vms[0].ssh_port")


def test_port_zero_is_out_of_range() -> None:
    """Port 0 is not a valid VM port."""
    data = valid_config_data()
    _vm(data)["ssh_port"] = 0
    assert problem_paths(data) == ["vms[0].ssh_port"]


def test_boolean_given_as_port() -> None:
    """`ssh_port = true` is a mistake, not port 1."""
    data = valid_config_data()
    _vm(data)["ssh_port"] = True
    assert problem_paths(data) == ["vms[0].ssh_port"]
    assert "True" in problem_message(data, "vms[0].ssh_port")


def test_string_given_as_port() -> None:
    """A quoted port is reported as not an integer."""
    data = valid_config_data()
    _vm(data)["ssh_port"] = "22"
    assert "'22'" in problem_message(data, "vms[0].ssh_port")


def test_rule_port_out_of_range() -> None:
    """A bad entry in rules[0].ports is reported at its index."""
    data = valid_config_data()
    _rule(data)["ports"] = [22, 70000]
    assert problem_paths(data) == ["rules[0].ports[1]"]
    assert "70000" in problem_message(data, "rules[0].ports[1]")


def test_rule_naming_unknown_vm() -> None:
    """A rule that grants a VM missing from the inventory is reported at rules[0].vms[0]."""
    data = valid_config_data()
    _rule(data)["vms"] = ["web99"]
    assert problem_paths(data) == ["rules[0].vms[0]"]
    assert "'web99'" in problem_message(data, "rules[0].vms[0]")


def test_rule_naming_unknown_user() -> None:
    """A rule that names a user who is not configured is reported at rules[0].users[0]."""
    data = valid_config_data()
    _rule(data)["users"] = ["mallory"]
    assert problem_paths(data) == ["rules[0].users[0]"]
    assert "'mallory'" in problem_message(data, "rules[0].users[0]")


def test_rule_without_users_or_groups() -> None:
    """A rule must say who it applies to."""
    data = valid_config_data()
    del _rule(data)["users"]
    assert problem_paths(data) == ["rules[0]"]


def test_unknown_protocol() -> None:
    """An unknown protocol is reported at its index with the value."""
    data = valid_config_data()
    _rule(data)["protocols"] = ["ssh", "telnet"]
    assert problem_paths(data) == ["rules[0].protocols[1]"]
    assert "'telnet'" in problem_message(data, "rules[0].protocols[1]")


def test_rule_without_protocols() -> None:
    """A rule must list at least one protocol."""
    data = valid_config_data()
    del _rule(data)["protocols"]
    assert problem_paths(data) == ["rules[0].protocols"]


def test_vm_without_host_key_source() -> None:
    """A VM with no host_key, known_hosts or trust_on_first_use is reported at vms[0]."""
    data = valid_config_data()
    del _vm(data)["host_key"]
    assert problem_paths(data) == ["vms[0]"]
    message = problem_message(data, "vms[0]")
    for option in ("host_key", "known_hosts", "trust_on_first_use"):
        assert option in message


@pytest.mark.parametrize(("key", "value"), [("known_hosts", "/etc/bastion/known_hosts"), ("trust_on_first_use", True)])
def test_vm_host_key_alternatives_are_accepted(key: str, value: object) -> None:
    """known_hosts or trust_on_first_use each replace host_key."""
    data = valid_config_data()
    del _vm(data)["host_key"]
    _vm(data)[key] = value
    assert "web01" in parse_config(data, base_dir=Path("/cfg")).vms


def test_bad_vm_host_key() -> None:
    """A host_key that is not an OpenSSH public key is reported with the value."""
    data = valid_config_data()
    _vm(data)["host_key"] = "ssh-ed25519 notbase64"
    assert "notbase64" in problem_message(data, "vms[0].host_key")


def test_default_login_not_among_logins() -> None:
    """default_login must name one of the VM's logins."""
    data = valid_config_data()
    _vm(data)["default_login"] = "admin"
    assert problem_paths(data) == ["vms[0].default_login"]
    assert "'admin'" in problem_message(data, "vms[0].default_login")


def test_vm_name_with_unicode_lookalike() -> None:
    """A VM name with a Cyrillic lookalike letter is rejected with the value."""
    data = valid_config_data()
    _vm(data)["name"] = LOOKALIKE
    _rule(data)["vms"] = ["*"]
    assert problem_paths(data) == ["vms[0].name"]
    assert repr(LOOKALIKE) in problem_message(data, "vms[0].name")


def test_rule_naming_unicode_lookalike_vm() -> None:
    """A rule naming a lookalike VM is rejected as an invalid name."""
    data = valid_config_data()
    _rule(data)["vms"] = [LOOKALIKE]
    paths = problem_paths(data)
    assert "rules[0].vms[0]" in paths
    assert repr(LOOKALIKE) in problem_message(data, "rules[0].vms[0]")


def test_duplicate_vm_names() -> None:
    """The second VM with a taken name is reported at vms[1].name."""
    data = valid_config_data()
    data["vms"].append(dict(_vm(data)))
    assert problem_paths(data) == ["vms[1].name"]
    assert "'web01'" in problem_message(data, "vms[1].name")


def test_duplicate_user_names() -> None:
    """The second user with a taken name is reported at users[1].name."""
    data = valid_config_data()
    data["users"].append({"name": "alice"})
    assert problem_paths(data) == ["users[1].name"]


def test_tls_cert_without_tls_key() -> None:
    """tls_cert alone is reported at the missing tls_key."""
    data = valid_config_data()
    data["public"]["tls_cert"] = "tls/cert.pem"
    assert problem_paths(data) == ["public.tls_key"]
    assert "go together" in problem_message(data, "public.tls_key")


def test_tls_key_without_tls_cert() -> None:
    """tls_key alone is reported at the missing tls_cert."""
    data = valid_config_data()
    data["public"]["tls_key"] = "tls/key.pem"
    assert problem_paths(data) == ["public.tls_cert"]


def test_bad_user_public_key() -> None:
    """A user key that is not an OpenSSH public key is reported at users[0].keys[0] with the value."""
    data = valid_config_data()
    data["users"][0]["keys"] = ["ssh-rsa AAAA-not-a-key alice@laptop"]
    assert problem_paths(data) == ["users[0].keys[0]"]
    assert "AAAA-not-a-key" in problem_message(data, "users[0].keys[0]")


def test_good_user_key_after_bad_one_is_not_reported() -> None:
    """Only the bad entry of a key list is reported, by its index."""
    data = valid_config_data()
    data["users"][0]["keys"] = [public_key("alice"), "garbage"]
    assert problem_paths(data) == ["users[0].keys[1]"]


def test_bad_listen_address() -> None:
    """A listen entry with a host name is reported at public.listen[0] with the value."""
    data = valid_config_data()
    data["public"]["listen"] = ["example.com:443"]
    assert problem_paths(data) == ["public.listen[0]"]
    assert "'example.com'" in problem_message(data, "public.listen[0]")


def test_bad_listen_address_at_second_index() -> None:
    """Each bad listen entry is reported at its own index."""
    data = valid_config_data()
    data["public"]["listen"] = ["0.0.0.0:443", "nohostport"]
    assert problem_paths(data) == ["public.listen[1]"]
    assert "'nohostport'" in problem_message(data, "public.listen[1]")


def test_wrong_type_for_section() -> None:
    """A section given as a string is reported as not a table."""
    data = valid_config_data()
    data["ssh"] = "yes"
    assert problem_paths(data) == ["ssh"]
    assert "a table" in problem_message(data, "ssh")


def test_vm_missing_address() -> None:
    """address is required for a VM."""
    data = valid_config_data()
    del _vm(data)["address"]
    assert "vms[0].address" in problem_paths(data)


def test_invalid_user_name() -> None:
    """Upper-case user names are rejected with the value."""
    data = valid_config_data()
    data["users"].append({"name": "Bob"})
    assert problem_paths(data) == ["users[1].name"]
    assert "'Bob'" in problem_message(data, "users[1].name")


def test_several_problems_are_all_reported() -> None:
    """One pass reports every problem, in document order."""
    data = valid_config_data()
    data["bogus"] = 1
    data["ssh"]["login_grace_time"] = "30x"
    _vm(data)["ssh_port"] = 70000
    data["users"][0]["keys"] = ["not a key"]
    _rule(data)["vms"] = ["web99"]
    _rule(data)["protocols"] = ["ssh", "telnet"]
    assert problem_paths(data) == [
        "bogus",
        "ssh.login_grace_time",
        "vms[0].ssh_port",
        "users[0].keys[0]",
        "rules[0].vms[0]",
        "rules[0].protocols[1]",
    ]


def test_config_error_message_names_every_path() -> None:
    """The ConfigError text joins every path and message."""
    data = valid_config_data()
    data["bogus"] = 1
    _vm(data)["ssh_port"] = 70000
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=Path("/cfg"))
    assert "bogus: unknown key" in str(info.value)
    assert "vms[0].ssh_port: port must be 1-65535, got 70000" in str(info.value)
    assert info.value.reason == "config_invalid"


def test_port_problem_reported_even_when_vm_name_is_invalid() -> None:
    """An invalid VM name must not hide a bad ssh_port on the same VM."""
    data = valid_config_data()
    _vm(data)["name"] = LOOKALIKE
    _vm(data)["ssh_port"] = 70000
    _rule(data)["vms"] = ["*"]
    assert problem_paths(data) == ["vms[0].name", "vms[0].ssh_port"]


# --- load_config ------------------------------------------------------------


def _toml_document() -> str:
    return f"""
[gateway]
node = "gw1"
state_dir = "state"

[public]
listen = ["127.0.0.1:2222"]

[[vms]]
name = "web01"
address = "10.0.0.5"
host_key = "{public_key("web01-host")}"
logins = {{ deploy = {{ key = "keys/deploy" }} }}

[[users]]
name = "alice"
keys = ["{public_key("alice")}"]

[[rules]]
users = ["alice"]
vms = ["web01"]
protocols = ["ssh"]
"""


def test_load_config_reads_toml_relative_to_its_folder(tmp_path: Path) -> None:
    """A valid file loads and relative paths resolve against the file's folder."""
    path = tmp_path / "bastion.toml"
    path.write_text(_toml_document(), encoding="utf-8")
    cfg = load_config(path)
    assert cfg.gateway.state_dir == tmp_path / "state"
    assert cfg.vms["web01"].logins["deploy"].key == tmp_path / "keys" / "deploy"


def test_load_config_missing_file(tmp_path: Path) -> None:
    """A missing file is one (file) problem naming the path."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p for p, _ in info.value.problems] == ["(file)"]
    assert str(path) in info.value.problems[0][1]


def test_load_config_invalid_toml(tmp_path: Path) -> None:
    """A file that is not TOML is one (file) problem naming the path."""
    path = tmp_path / "broken.toml"
    path.write_text("[gateway\nnode = ", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p for p, _ in info.value.problems] == ["(file)"]
    assert "not valid TOML" in info.value.problems[0][1]
    assert str(path) in info.value.problems[0][1]


def test_load_config_invalid_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is reported as not valid TOML, not a crash."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[gateway]\nnode = "\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p for p, _ in info.value.problems] == ["(file)"]


def test_load_config_reports_validation_problems(tmp_path: Path) -> None:
    """A syntactically valid file still goes through validation."""
    path = tmp_path / "bastion.toml"
    path.write_text(_toml_document() + "\n[extra]\n", encoding="utf-8")
    assert [p for p, _ in _problems_of_file(path)] == ["extra"]


def _problems_of_file(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


# --- parse_duration ---------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("30s", 30.0), ("10m", 600.0), ("1.5h", 5400.0), (" 2s ", 2.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations with ms/s/m/h units convert to seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["30x", "30", "s", "", "-5s", "1,5h", "10 m", "1e3s"])
def test_parse_duration_rejects(text: str) -> None:
    """Anything but NUMBER+UNIT raises ValueError naming the value."""
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_parse_duration_rejects_non_string() -> None:
    """A bare number (TOML integer) is not a duration."""
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(30)  # type: ignore[arg-type]


# --- parse_listen -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:443", ListenAddress("0.0.0.0", 443)),
        ("[::1]:443", ListenAddress("::1", 443)),
        ("127.0.0.1:0", ListenAddress("127.0.0.1", 0)),
        ("localhost:8443", ListenAddress("localhost", 8443)),
    ],
)
def test_parse_listen(text: str, expected: ListenAddress) -> None:
    """IPv4, bracketed IPv6 and localhost with a port are accepted."""
    assert parse_listen(text) == expected


def test_listen_address_renders_ipv6_in_brackets() -> None:
    """str() of an IPv6 listen address round-trips to the bracketed form."""
    assert str(parse_listen("[::1]:443")) == "[::1]:443"


@pytest.mark.parametrize("text", ["host:99999", "127.0.0.1:99999", "nohostport", "::1:443", "[::1]", "example.com:443", ":443", "0.0.0.0:"])
def test_parse_listen_rejects(text: str) -> None:
    """Bad hosts, missing or out-of-range ports raise ValueError."""
    with pytest.raises(ValueError):
        parse_listen(text)


def test_parse_listen_out_of_range_port_message() -> None:
    """An out-of-range port names the port."""
    with pytest.raises(ValueError, match="99999"):
        parse_listen("127.0.0.1:99999")


def test_parse_listen_no_port_message() -> None:
    """A value without a port names the value."""
    with pytest.raises(ValueError, match="'nohostport'"):
        parse_listen("nohostport")


def test_vm_name_with_trailing_newline_is_rejected() -> None:
    """A VM name "web01\\n" is not a valid name."""
    data = valid_config_data()
    _vm(data)["name"] = "web01\n"
    _rule(data)["vms"] = ["*"]
    assert problem_paths(data) == ["vms[0].name"]


def test_empty_tls_cert_with_tls_key_is_rejected() -> None:
    """An empty tls_cert next to a tls_key is a problem, not a silently half-set TLS pair."""
    data = valid_config_data()
    data["public"]["tls_cert"] = ""
    data["public"]["tls_key"] = "tls/key.pem"
    assert "public.tls_cert" in problem_paths(data)


def test_bad_token_digest_is_not_echoed() -> None:
    """A value in users.tokens_sha256 that is not a digest (maybe a pasted token) is reported without its value."""
    from gateway.config import parse_config
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config({"users": [{"name": "alice", "tokens_sha256": ["my-secret-token"]}]})
    [(path, message)] = [p for p in err.value.problems if "tokens_sha256" in p[0]]
    assert path == "users[0].tokens_sha256[0]" and "my-secret-token" not in message


# --- session limits and the drain -------------------------------------------


def test_session_limit_defaults() -> None:
    """Without [sessions] every rule gets the documented defaults: bounded, with a warning first."""
    cfg = parse_config(valid_config_data())
    assert cfg.sessions == Limits(idle_timeout=1800.0, max_duration=43200.0, warn_before=60.0, half_close_timeout=30.0)
    assert cfg.rules[0].limits == cfg.sessions


def test_sessions_section_sets_every_rules_default_and_a_rule_overrides_it() -> None:
    """[sessions] sets the defaults; a key on a rule overrides only that key for that rule; "off" means no limit."""
    data = valid_config_data()
    data["sessions"] = {"idle_timeout": "15m", "max_duration": "8h", "warn_before": "2m", "half_close_timeout": "10s"}
    data["rules"].append({"users": ["alice"], "vms": ["web01"], "protocols": ["ssh-jump"], "idle_timeout": "off", "max_duration": "1h"})
    cfg = parse_config(data)
    assert cfg.rules[0].limits == Limits(900.0, 28800.0, 120.0, 10.0)
    assert cfg.rules[1].limits == Limits(None, 3600.0, 120.0, 10.0)


@pytest.mark.parametrize("key", ["idle_timeout", "max_duration", "warn_before", "half_close_timeout"])
def test_bad_limit_names_the_key_and_the_value(key: str) -> None:
    """A limit that is not a duration is reported at its key path with the value, in [sessions] and on a rule."""
    data = valid_config_data()
    data["sessions"] = {key: "soon"}
    _rule(data)[key] = "-1s"
    assert problem_paths(data) == [f"sessions.{key}", f"rules[0].{key}"]
    assert "'soon'" in problem_message(data, f"sessions.{key}")
    assert "'-1s'" in problem_message(data, f"rules[0].{key}")


def test_unknown_key_in_sessions() -> None:
    """A misspelt limit is an error, not a silent default."""
    data = valid_config_data()
    data["sessions"] = {"idle_timout": "5m"}
    assert problem_paths(data) == ["sessions.idle_timout"]


def test_most_permissive_rule_limits_win() -> None:
    """Two rules granting the same access add up: the longer limit (or none) applies, and the earlier warning."""
    a = Limits(idle_timeout=600, max_duration=None, warn_before=60, half_close_timeout=30)
    b = Limits(idle_timeout=1800, max_duration=3600, warn_before=120, half_close_timeout=None)
    assert a.most_permissive(b) == Limits(idle_timeout=1800, max_duration=None, warn_before=60, half_close_timeout=None)


def test_shutdown_grace_and_notice() -> None:
    """The drain's grace and notice are read, bounded, and bad values named."""
    data = valid_config_data()
    data["gateway"].update(shutdown_grace="45s", shutdown_notice="  The gateway is restarting:\n upgrade.  ")
    cfg = parse_config(data)
    assert (cfg.gateway.shutdown_grace, cfg.gateway.shutdown_notice) == (45.0, "The gateway is restarting: upgrade.")
    data["gateway"].update(shutdown_grace="2h", shutdown_notice="")
    assert sorted(problem_paths(data)) == ["gateway.shutdown_grace", "gateway.shutdown_notice"]
    assert "'2h'" in problem_message(data, "gateway.shutdown_grace")


def test_notice_prefix_defaults_to_bastion_and_may_be_empty() -> None:
    """`gateway.notice_prefix`: "[bastion]" by default, "" turns it off, two lines or 41 characters are named problems."""
    data = valid_config_data()
    assert parse_config(data).gateway.notice_prefix == "[bastion]"
    data["gateway"]["notice_prefix"] = ""
    assert parse_config(data).gateway.notice_prefix == ""
    data["gateway"]["notice_prefix"] = "(gw)"
    assert parse_config(data).gateway.notice_prefix == "(gw)"
    for bad in ("[a]\n[b]", "x" * 41, 7):
        data["gateway"]["notice_prefix"] = bad
        assert problem_paths(data) == ["gateway.notice_prefix"], bad


def test_keepalive_count_and_ping_interval() -> None:
    """SSH keepalive count and the tunnel ping interval are validated like every other key."""
    data = valid_config_data()
    data["ssh"]["keepalive_count"] = 0
    data["tunnel"] = {"ping_interval": "fast"}
    assert problem_paths(data) == ["ssh.keepalive_count", "tunnel.ping_interval"]


def test_session_caps() -> None:
    """Sessions per user and channels per SSH connection have defaults and are validated."""
    cfg = parse_config(valid_config_data())
    assert (cfg.max_sessions_per_user, cfg.ssh.max_sessions, cfg.ssh.max_forwards) == (50, 10, 100)
    data = valid_config_data()
    data["sessions"] = {"max_per_user": 0}
    data["ssh"]["max_sessions"] = "many"
    data["ssh"]["max_forwards"] = 0
    assert sorted(problem_paths(data)) == ["sessions.max_per_user", "ssh.max_forwards", "ssh.max_sessions"]


def test_max_startups_takes_sshd_syntax_and_a_per_source_cap() -> None:
    """max_startups is N or start:rate:full; a bad one is named with its value; per_source_max_startups is checked."""
    data = valid_config_data()
    data["ssh"].update(max_startups="5:20:50", per_source_max_startups=3)
    mp = parse_config(data).ssh.max_startups
    assert (mp.start, mp.rate, mp.full, mp.per_source) == (5, 20, 50, 3)
    data["ssh"].update(max_startups="50:20:5", per_source_max_startups=0)
    assert sorted(problem_paths(data)) == ["ssh.max_startups", "ssh.per_source_max_startups"]
    assert "'50:20:5'" in problem_message(data, "ssh.max_startups")


def test_pre_auth_defaults() -> None:
    """Connection caps, the TLS handshake cap and deadline, the SSH version deadline and penalties have defaults."""
    cfg = parse_config(valid_config_data())
    pub = cfg.public
    assert (pub.max_connections, pub.max_connections_per_source, pub.max_tls_handshakes, pub.tls_handshake_timeout) == (None, 200, 256, 5.0)
    assert cfg.ssh.version_timeout == 10.0
    pen = cfg.penalties
    assert (pen.enabled, pen.auth_failure, pen.grace_exceeded, pen.no_auth, pen.min, pen.max) == (True, 5.0, 10.0, 1.0, 15.0, 600.0)
    assert (pen.exempt, pen.max_sources) == ((), 65536)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_connections", 0),
        ("max_connections", 1_000_001),
        ("max_connections", "many"),
        ("max_connections_per_source", 0),
        ("max_tls_handshakes", 0),
        ("max_tls_handshakes", True),
        ("tls_handshake_timeout", "0s"),
        ("tls_handshake_timeout", "soon"),
    ],
)
def test_bad_public_cap_names_the_key_and_the_value(key: str, value: object) -> None:
    data = valid_config_data()
    data["public"][key] = value
    assert problem_paths(data) == [f"public.{key}"]
    assert repr(value) in problem_message(data, f"public.{key}")


def test_public_caps_and_version_timeout_are_read() -> None:
    data = valid_config_data()
    data["public"].update(max_connections=500, max_connections_per_source=20, max_tls_handshakes=64, tls_handshake_timeout="2s")
    data["ssh"]["version_timeout"] = "3s"
    cfg = parse_config(data)
    assert (cfg.public.max_connections, cfg.public.max_connections_per_source, cfg.public.max_tls_handshakes) == (500, 20, 64)
    assert (cfg.public.tls_handshake_timeout, cfg.ssh.version_timeout) == (2.0, 3.0)
    data["ssh"]["version_timeout"] = "-"
    assert problem_paths(data) == ["ssh.version_timeout"]


def test_penalties_section_is_read() -> None:
    data = valid_config_data()
    data["penalties"] = {
        "enabled": False, "auth_failure": "1s", "grace_exceeded": "2s", "no_auth": "0s", "min": "0s", "max": "1m",
        "exempt": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"], "max_sources": 10,
    }  # fmt: skip
    pen = parse_config(data).penalties
    assert (pen.enabled, pen.auth_failure, pen.grace_exceeded, pen.no_auth, pen.min, pen.max, pen.max_sources) == (
        False, 1.0, 2.0, 0.0, 0.0, 60.0, 10,
    )  # fmt: skip
    assert [str(n) for n in pen.exempt] == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("enabled", "yes", "'yes'"),
        ("auth_failure", "5 s", "'5 s'"),
        ("grace_exceeded", "-1s", "'-1s'"),
        ("no_auth", 1, "1"),
        ("max", "0s", "'0s'"),
        ("max", "10s", "'10s'"),  # not longer than min (15s)
        ("exempt", "10.0.0.0/8", "'10.0.0.0/8'"),
        ("max_sources", 0, "0"),
        ("max_sources", 10_000_001, "10000001"),
    ],
)
def test_bad_penalty_key_names_the_key_and_the_value(key: str, value: object, shown: str) -> None:
    data = valid_config_data()
    data["penalties"] = {key: value}
    assert problem_paths(data) == [f"penalties.{key}"]
    assert shown in problem_message(data, f"penalties.{key}")


def test_bad_exempt_network_is_named_by_index() -> None:
    """An exempt entry with host bits set (a typo for a network) or no address at all is named with its index."""
    data = valid_config_data()
    data["penalties"] = {"exempt": ["10.0.0.0/8", "10.0.0.1/8", "office"]}
    assert problem_paths(data) == ["penalties.exempt[1]", "penalties.exempt[2]"]
    assert "'office'" in problem_message(data, "penalties.exempt[2]")


def test_unknown_penalty_key() -> None:
    data = valid_config_data()
    data["penalties"] = {"authfail": "5s"}
    assert problem_paths(data) == ["penalties.authfail"]


def test_access_keys_have_defaults_and_are_validated() -> None:
    """New-session rate per user, tunnels per token, idle authenticated connections and what a reload does to revoked
    sessions: defaults, "off" where it makes sense, and each bad value named."""
    cfg = parse_config(valid_config_data())
    assert cfg.session_rate_per_user == (10.0, 50.0) and cfg.tunnel.max_per_token == 20
    assert cfg.ssh.idle_connection_timeout == 900.0 and cfg.on_revoke == "end"
    data = valid_config_data()
    data["sessions"] = {"rate_per_user": "off", "on_revoke": "continue"}
    data["ssh"]["idle_connection_timeout"] = "off"
    cfg = parse_config(data)
    assert cfg.session_rate_per_user is None and cfg.ssh.idle_connection_timeout is None and cfg.on_revoke == "continue"
    data = valid_config_data()
    data["sessions"] = {"rate_per_user": 0, "burst_per_user": 0, "on_revoke": "kill"}
    data["ssh"]["idle_connection_timeout"] = "soon"
    data["tunnel"] = {"max_per_token": 0}
    assert sorted(problem_paths(data)) == [
        "sessions.burst_per_user",
        "sessions.on_revoke",
        "sessions.rate_per_user",
        "ssh.idle_connection_timeout",
        "tunnel.max_per_token",
    ]


# --- [oidc] -----------------------------------------------------------------


def _with_oidc(**keys: Any) -> dict[str, Any]:
    data = valid_config_data()
    data["oidc"] = {"issuer": "https://idp.example.com/realms/corp", "client_id": "bastion", "client_secret_file": "oidc.secret", **keys}
    return data


def test_oidc_is_off_without_its_section() -> None:
    """No [oidc]: no sign-in with an identity provider."""
    assert parse_config(valid_config_data()).oidc is None


def test_oidc_minimal_section_takes_the_defaults() -> None:
    """issuer, client_id and client_secret_file alone: the standard scopes and claims, no group map, 8 h sessions."""
    oidc = parse_config(_with_oidc(), base_dir=Path("/cfg")).oidc
    assert oidc == OIDCSection(
        issuer="https://idp.example.com/realms/corp", client_id="bastion", client_secret_file=Path("/cfg/oidc.secret")
    )
    assert oidc.scopes == ("openid", "profile", "email") and oidc.user_claim == "preferred_username" and oidc.groups_claim == "groups"
    assert oidc.group_map == {} and oidc.redirect_base is None and oidc.session_lifetime == 8 * 3600 and not oidc.allowed_http_issuer


def test_oidc_every_key_is_read() -> None:
    """Every key of [oidc] set, as an operator would write it."""
    data = _with_oidc(
        scopes=["openid", "groups"],
        user_claim="email_local",
        groups_claim="https://example.com/claims/groups",
        group_map={"/corp/ops": ["ops", "operators"], "staff": ["users"]},
        redirect_base="https://gw.example.com/",
        session_lifetime="2h",
    )
    oidc = parse_config(data).oidc
    assert oidc is not None
    assert oidc.scopes == ("openid", "groups") and oidc.user_claim == "email_local"
    assert oidc.groups_claim == "https://example.com/claims/groups"
    assert oidc.group_map == {"/corp/ops": ("ops", "operators"), "staff": ("users",)}
    assert oidc.redirect_base == "https://gw.example.com" and oidc.session_lifetime == 7200


def test_oidc_required_keys_are_named() -> None:
    """An empty [oidc] names each of the three keys it needs."""
    data = valid_config_data()
    data["oidc"] = {}
    assert sorted(problem_paths(data)) == ["oidc.client_id", "oidc.client_secret_file", "oidc.issuer"]


def test_oidc_unknown_key_is_an_error() -> None:
    assert problem_paths(_with_oidc(client_secret="hunter2")) == ["oidc.client_secret"]


@pytest.mark.parametrize(
    "issuer",
    [
        "http://idp.example.com",
        "ftp://idp.example.com",
        "idp.example.com",
        "https://",
        "https://idp.example.com/?x=1",
        "https://u@idp.example.com",
    ],
)
def test_oidc_issuer_must_be_a_plain_https_url(issuer: str) -> None:
    """http://, another scheme, no host, a query or user info: refused, naming the value."""
    assert repr(issuer) in problem_message(_with_oidc(issuer=issuer), "oidc.issuer")


def test_oidc_http_issuer_only_for_tests_on_loopback() -> None:
    """allowed_http_issuer admits http:// on 127.0.0.1, ::1 or localhost, and nowhere else."""
    for issuer in ("http://127.0.0.1:9400", "http://[::1]:9400", "http://localhost:9400"):
        oidc = parse_config(_with_oidc(issuer=issuer, allowed_http_issuer=True)).oidc
        assert oidc is not None and oidc.issuer == issuer and oidc.allowed_http_issuer
    msg = problem_message(_with_oidc(issuer="http://10.0.0.1:9400", allowed_http_issuer=True), "oidc.issuer")
    assert "loopback" in msg and "'http://10.0.0.1:9400'" in msg
    assert "https://" in problem_message(_with_oidc(issuer="http://127.0.0.1:9400"), "oidc.issuer")


def test_oidc_client_secret_file_must_be_a_path() -> None:
    """A blank value or a non-string is refused; the key is named."""
    assert "file path" in problem_message(_with_oidc(client_secret_file="  "), "oidc.client_secret_file")
    assert "expected a string" in problem_message(_with_oidc(client_secret_file=42), "oidc.client_secret_file")


def test_oidc_bad_values_are_named() -> None:
    """Each bad value is reported at its own key path with the value."""
    data = _with_oidc(
        client_id="has space",
        scopes=["profile", "bad scope"],
        user_claim="",
        groups_claim=["groups"],
        allowed_http_issuer="yes",
        redirect_base="gw.example.com",
        session_lifetime="forever",
    )
    problems = dict(config_problems(data))
    assert sorted(problems) == [
        "oidc.allowed_http_issuer",
        "oidc.client_id",
        "oidc.groups_claim",
        "oidc.redirect_base",
        "oidc.scopes",
        "oidc.scopes[1]",
        "oidc.session_lifetime",
        "oidc.user_claim",
    ]
    assert "'has space'" in problems["oidc.client_id"] and '"openid"' in problems["oidc.scopes"]
    assert "'gw.example.com'" in problems["oidc.redirect_base"] and "'forever'" in problems["oidc.session_lifetime"]


def test_oidc_session_lifetime_is_bounded() -> None:
    assert "at most 7 days" in problem_message(_with_oidc(session_lifetime="200h"), "oidc.session_lifetime")


def test_oidc_group_map_targets_must_be_gateway_group_names() -> None:
    """A mapped-to group must be a valid gateway group name; the mapping must be a list of them."""
    data = _with_oidc(group_map={"ops": ["good", "bad name"], "staff": "users", "empty": []})
    problems = dict(config_problems(data))
    assert sorted(problems) == ["oidc.group_map.empty", "oidc.group_map.ops[1]", "oidc.group_map.staff"]
    assert "'bad name'" in problems["oidc.group_map.ops[1]"] and "'users'" in problems["oidc.group_map.staff"]


def test_oidc_group_map_idp_names_are_one_line() -> None:
    """An IdP group name with a control character cannot be matched safely: refused."""
    assert problem_paths(_with_oidc(group_map={"ops\x1b[2J": ["ops"]})) == ["oidc.group_map.ops\x1b[2J"]


def test_proxy_protocol_from_is_off_by_default_and_parses_cidrs() -> None:
    """`public.proxy_protocol_from`: [] by default (no PROXY headers read); CIDRs of both families, a bare address
    as its /32."""
    assert parse_config(valid_config_data()).public.proxy_protocol_from == ()
    data = valid_config_data()
    data["public"]["proxy_protocol_from"] = ["10.0.0.0/29", "2001:db8::/64", "192.0.2.7"]
    got = parse_config(data).public.proxy_protocol_from
    assert [str(n) for n in got] == ["10.0.0.0/29", "2001:db8::/64", "192.0.2.7/32"]


def test_bad_proxy_protocol_from_names_the_key_and_the_value() -> None:
    """A balancer entry with host bits set or no address is named with its index and value; a string is not a list."""
    data = valid_config_data()
    data["public"]["proxy_protocol_from"] = ["10.0.0.0/29", "10.0.0.1/29", "haproxy"]
    assert problem_paths(data) == ["public.proxy_protocol_from[1]", "public.proxy_protocol_from[2]"]
    assert "'haproxy'" in problem_message(data, "public.proxy_protocol_from[2]")
    assert "'10.0.0.1/29'" in problem_message(data, "public.proxy_protocol_from[1]")
    data["public"]["proxy_protocol_from"] = "10.0.0.0/8"
    assert problem_paths(data) == ["public.proxy_protocol_from"]
    assert "'10.0.0.0/8'" in problem_message(data, "public.proxy_protocol_from")


def test_a_previous_token_key_needs_the_new_one() -> None:
    """tunnel.previous_token_key_file alone is a mistake (a rollover names both keys)."""
    data = valid_config_data()
    data["tunnel"] = {"previous_token_key_file": "/etc/bastion/old.key"}
    assert problem_paths(data) == ["tunnel.previous_token_key_file"]
    data["tunnel"] = {"token_key_file": "/etc/bastion/new.key", "previous_token_key_file": "/etc/bastion/old.key"}
    cfg = parse_config(data)
    assert str(cfg.tunnel.token_key_file) == "/etc/bastion/new.key" and str(cfg.tunnel.previous_token_key_file) == "/etc/bastion/old.key"


def test_the_cluster_section() -> None:
    """[cluster] is optional; the URL must be redis:// or rediss:// without a password in it; node_ttl covers two beats."""
    assert parse_config(valid_config_data()).cluster is None
    data = valid_config_data()
    data["cluster"] = {"redis_url": "rediss://redis.internal:6380/0", "heartbeat": "1s", "node_ttl": "3s"}
    cfg = parse_config(data)
    assert cfg.cluster is not None and (cfg.cluster.heartbeat, cfg.cluster.node_ttl, cfg.cluster.timeout) == (1.0, 3.0, 1.0)
    data["cluster"] = {"backend": "etcd", "redis_url": "redis://u:secret@h:6379/0", "heartbeat": "2s", "node_ttl": "3s", "tls": True}
    assert sorted(problem_paths(data)) == ["cluster.backend", "cluster.node_ttl", "cluster.redis_url", "cluster.tls"]
    data["cluster"] = {"redis_url": "http://h"}
    assert problem_paths(data) == ["cluster.redis_url"]


def test_vm_ciphers_default_to_aes_gcm_first_and_refuse_weak_ones() -> None:
    """The VM leg offers AES-GCM before chacha20 unless configured; CBC, RC4 and unknown names are refused."""
    data = valid_config_data()
    assert parse_config(data).ssh.vm_ciphers == ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")
    data["ssh"]["vm_ciphers"] = ["chacha20-poly1305@openssh.com", "aes256-ctr"]
    assert parse_config(data).ssh.vm_ciphers == ("chacha20-poly1305@openssh.com", "aes256-ctr")
    data["ssh"]["vm_ciphers"] = ["aes128-gcm@openssh.com", "aes128-cbc", "arcfour"]
    assert problem_paths(data) == ["ssh.vm_ciphers[1]", "ssh.vm_ciphers[2]"]
    data["ssh"]["vm_ciphers"] = []
    assert problem_paths(data) == ["ssh.vm_ciphers"]
    data["ssh"]["vm_ciphers"] = ["aes128-gcm@openssh.com", "aes128-gcm@openssh.com"]
    assert problem_paths(data) == ["ssh.vm_ciphers"]


def test_every_allowed_ssh_algorithm_is_one_asyncssh_speaks() -> None:
    """What the config accepts and the doors offer is a subset of the pinned asyncssh's algorithms."""
    from asyncssh.encryption import get_encryption_algs
    from asyncssh.kex import get_kex_algs
    from asyncssh.mac import get_mac_algs

    from gateway.config import SSH_CIPHERS, SSH_KEX_ALGS, SSH_MAC_ALGS

    assert set(SSH_CIPHERS) <= {a.decode() for a in get_encryption_algs()}
    assert set(SSH_KEX_ALGS) <= {a.decode() for a in get_kex_algs()}
    assert set(SSH_MAC_ALGS) <= {a.decode() for a in get_mac_algs()}
    assert not [a for a in (*SSH_CIPHERS, *SSH_KEX_ALGS, *SSH_MAC_ALGS) if "cbc" in a or "sha1" in a or a.endswith("-sha")]
