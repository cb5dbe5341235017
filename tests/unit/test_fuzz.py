"""Hypothesis fuzzing of the pure parsers and byte probes: what a client or an operator types never crashes them.

Each property states the contract a caller relies on: the byte probe always answers with a `Door`, a parser
raises only its documented error, and what a parser accepts means the same when written back. Example counts
stay modest so the whole file runs in seconds on a shared machine; the regression tests at the end pin the
inputs Hypothesis found.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config import ListenAddress, StartupPolicy, parse_config, parse_duration, parse_listen
from gateway.control.api import MAX_GRACE, MAX_REASON, ApiError, ControlAPI
from gateway.doors.https import parse_port
from gateway.errors import AuthError, ConfigError
from gateway.net.detect import Door, classify
from gateway.policy import LoginTarget, parse_username
from gateway.protocols.tunnel import _control_kind, close_reason
from gateway.text import one_line
from gateway.tokens import TokenService
from tests.support.clock import FakeClock
from tests.unit.helpers import valid_config_data

# No example database: a run leaves no files in the working tree; the inputs that mattered are pinned below.
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_CONFIG = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Any code point, lone surrogates included: aiohttp decodes headers and paths with `surrogateescape`, and JSON
# `"\ud800"` escapes decode to lone surrogates, so a string from a client can hold any of them.
# Controls, format characters and surrogates are drawn often on purpose: they are rare among all code points.
ANY_TEXT = st.one_of(
    st.text(st.characters(categories=None), max_size=60),
    st.text(st.characters(categories=["Cc", "Cf", "Cs", "Zl", "Zp", "Zs", "Ll", "Nd", "Po"]), max_size=30),
)


# -- net.detect.classify --

SSH_BANNER = st.builds(
    lambda version, software, comment: f"SSH-{version}-{software}{comment}\r\n".encode(),
    st.sampled_from(["2.0", "1.99"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="-"), min_size=1, max_size=40),
    st.one_of(st.just(""), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20).map(lambda c: " " + c)),
)
# A TLS record carrying a ClientHello: type 0x16, record version 3.0-3.4 (clients send 3.1 or 3.3), a length,
# handshake type 1, then whatever the body is.
TLS_HELLO = st.builds(
    lambda minor, body: bytes([0x16, 0x03, minor]) + (len(body) + 4).to_bytes(2, "big") + b"\x01" + len(body).to_bytes(3, "big") + body,
    st.integers(0, 4),
    st.binary(min_size=0, max_size=200),
)


@FUZZ
@given(st.binary(max_size=64))
def test_classify_any_bytes_is_a_door(first: bytes) -> None:
    """Whatever a client sends first, the probe answers with a door and never raises."""
    assert isinstance(classify(first), Door)


@FUZZ
@given(st.binary(max_size=16), st.binary(min_size=1, max_size=16))
def test_classify_decided_bytes_stay_decided(first: bytes, more: bytes) -> None:
    """Once the probe decided, more bytes never change its answer (the listener may peek again at any length)."""
    door = classify(first)
    if door is not Door.NEED_MORE:
        assert classify(first + more) is door


@FUZZ
@given(SSH_BANNER, st.data())
def test_classify_prefixes_of_an_ssh_banner(banner: bytes, data: st.DataObject) -> None:
    """Any prefix of a real SSH version line is SSH or undecided, never TLS or unknown."""
    cut = data.draw(st.integers(0, len(banner)))
    assert classify(banner[:cut]) is (Door.SSH if cut >= 4 else Door.NEED_MORE)


@FUZZ
@given(TLS_HELLO, st.data())
def test_classify_prefixes_of_a_client_hello(hello: bytes, data: st.DataObject) -> None:
    """Any prefix of a real TLS ClientHello record is TLS or undecided, never SSH or unknown."""
    cut = data.draw(st.integers(0, len(hello)))
    assert classify(hello[:cut]) is (Door.TLS if cut >= 3 else Door.NEED_MORE)


# -- policy.parse_username --

NAME_CHARS = st.sampled_from("ab09._-+@")


def _canonical(target: LoginTarget) -> str:
    return "+".join(p for p in (target.user, target.vm, target.login) if p is not None)


@FUZZ
@given(st.one_of(ANY_TEXT, st.text(NAME_CHARS, max_size=20)))
def test_parse_username_raises_only_value_error_and_round_trips(raw: str) -> None:
    """A user name either parses, and its `USER+VM+LOGIN` spelling parses to the same target, or raises ValueError."""
    try:
        target = parse_username(raw)
    except ValueError:
        return
    assert parse_username(_canonical(target)) == target
    parts = [p for p in (target.user, target.vm, target.login) if p is not None]
    assert all(p and "+" not in p and "@" not in p for p in parts)
    if "@" not in raw:
        assert _canonical(target) == raw


# -- config: durations, listen addresses, MaxStartups --


@FUZZ
@given(st.one_of(ANY_TEXT, st.from_regex(r"\A[0-9]{1,6}(\.[0-9]{1,3})?(ms|s|m|h)\Z"), st.integers(), st.none(), st.floats()))
def test_parse_duration_raises_only_value_error(text: Any) -> None:
    """A duration is a non-negative number of seconds, or a ValueError."""
    try:
        value = parse_duration(text)
    except ValueError:
        return
    assert value >= 0
    assert isinstance(text, str) and text.strip()[0] in "0123456789"


@FUZZ
@given(
    st.one_of(
        ANY_TEXT,
        st.from_regex(r"\A(127\.0\.0\.1|0\.0\.0\.0|localhost|\[::1?\]|::1|[0-9a-f:.]{1,20}):[0-9\u0660-\u0669]{1,7}\Z"),
        st.integers(),
        st.none(),
    )
)
@example("127.0.0.1:\u0664\u0664\u0663")
def test_parse_listen_raises_only_value_error_and_round_trips(text: Any) -> None:
    """A listen address parses to a port 0-65535 whose printed form parses back to itself, or raises ValueError."""
    try:
        addr = parse_listen(text)
    except ValueError:
        return
    assert isinstance(addr, ListenAddress) and 0 <= addr.port <= 65535
    assert text.rpartition(":")[2].isascii()
    assert parse_listen(str(addr)) == addr


@FUZZ
@given(
    st.one_of(ANY_TEXT, st.from_regex(r"\A[0-9]{1,4}(:[0-9]{1,4}:[0-9]{1,4})?\Z"), st.integers(), st.booleans(), st.none(), st.floats()),
    st.integers(1, 100),
)
def test_startup_policy_parse_raises_only_value_error(spec: Any, per_source: int) -> None:
    """MaxStartups parses to start >= 1, 1 <= rate <= 100, full >= start, or raises ValueError."""
    try:
        policy = StartupPolicy.parse(spec, per_source)
    except ValueError:
        return
    assert policy.start >= 1 and 1 <= policy.rate <= 100 and policy.full >= policy.start
    assert str(spec).isascii()
    assert StartupPolicy.parse(f"{policy.start}:{policy.rate}:{policy.full}", per_source) == policy


# -- config: whole documents --

# Every key the config knows, so generated tables reach the validators rather than only the unknown-key check.
CONFIG_KEYS = sorted(
    {
        *("gateway", "public", "ssh", "vms", "users", "rules", "control", "operators", "tunnel", "sessions"),
        *("node", "state_dir", "connect_timeout", "shutdown_grace", "shutdown_notice", "max_per_user"),
        *("idle_timeout", "max_duration", "warn_before", "half_close_timeout"),
        *("listen", "tls_cert", "tls_key", "detect_timeout", "header_timeout", "metrics_public"),
        *("host_keys", "user_ca_keys", "login_grace_time", "max_auth_tries", "max_startups", "keepalive_interval"),
        *("keepalive_count", "max_sessions", "max_forwards", "per_source_max_startups"),
        *("name", "address", "ssh_port", "rdp_port", "host_key", "known_hosts", "trust_on_first_use"),
        *("default_login", "logins", "key", "keys", "groups", "tokens_sha256", "users", "vms", "protocols", "ports", "env"),
        *("role", "token_sha256", "token_lifetime", "max_message", "ping_interval", "max_per_token"),
        *("penalties", "enabled", "auth_failure", "grace_exceeded", "no_auth", "min", "max", "exempt", "max_sources"),
        *("rate_per_user", "burst_per_user", "on_revoke", "version_timeout", "idle_connection_timeout"),
        *("max_connections", "max_connections_per_source", "max_tls_handshakes", "tls_handshake_timeout", "proxy_protocol_from"),
    }
)
# Strings that get past the type checks and into the value checks (and paths that need expanding).
CONFIG_STRINGS = st.sampled_from(
    [
        "30s", "0s", "500ms", "1.5h", "off", "10m", "601s", "9" * 400 + "h", "10:30:100", "0:0:0",
        "127.0.0.1:0", "[::1]:443", "localhost:99999", "web01", "alice", "*", "ssh", "ssh-jump", "rdp", "tcp",
        "operator", "viewer", "a" * 64, "0" * 64, "LC_*", "10.0.0.5", "not a host!",
        "~", "~/key", "~nosuchuser-bastion/key", "~\x00", "rel/key", "/abs/key", "", " ", "\x1b[2J", "ssh-ed25519 AAAA",
    ]
)  # fmt: skip
# TOML integers: tomllib has no 64-bit bound, but a literal of more than 4300 digits fails to parse.
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True), st.text(max_size=20), CONFIG_STRINGS
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(CONFIG_KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=25,
)


@st.composite
def mutated_config(draw: st.DrawFn) -> dict[str, Any]:
    """A valid document with a few values (at any depth) replaced by arbitrary JSON-like values or deleted."""
    doc = valid_config_data()
    for _ in range(draw(st.integers(1, 4))):
        node: Any = doc
        while True:
            keys: list[Any] = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, dict | list) and child and draw(st.booleans()):
                node = child
                continue
            if isinstance(node, dict) and draw(st.integers(0, 5)) == 0:
                del node[key]
            else:
                node[key] = draw(st.one_of(CONFIG_STRINGS, JSONISH))
            break
        if isinstance(node, dict) and draw(st.booleans()):
            node[draw(st.sampled_from(CONFIG_KEYS))] = draw(JSONISH)
    return doc


def _parses_or_config_error(doc: Any) -> None:
    try:
        parse_config(doc, base_dir=Path("/cfg"))
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(path, str) and isinstance(msg, str) for path, msg in exc.problems)


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(CONFIG_KEYS), st.text(max_size=8)), JSONISH, max_size=6))
def test_parse_config_of_any_document_raises_only_config_error(doc: dict[str, Any]) -> None:
    """Any JSON-like document is a Config or a ConfigError naming problems; nothing else escapes."""
    _parses_or_config_error(doc)


@FUZZ_CONFIG
@given(mutated_config())
@example({**valid_config_data(), "gateway": {"node": "gw1", "state_dir": "~nosuchuser-bastion/key"}})  # found at 3000 examples
@example({**valid_config_data(), "gateway": {"node": "gw1", "state_dir": "~\x00"}})
def test_parse_config_of_a_damaged_valid_document_raises_only_config_error(doc: dict[str, Any]) -> None:
    """A valid document with values swapped for junk at any depth is a Config or a ConfigError."""
    _parses_or_config_error(doc)


# -- text.one_line --

DROPPED = frozenset({"Cc", "Cf", "Co", "Cs", "Cn"})


@FUZZ
@given(st.one_of(ANY_TEXT, st.text(st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\u2028\u2029\xa0\u200b\u202e\x1b\x9bab"), max_size=30)))
@example("a \u200b b")
def test_one_line_is_one_printable_line_and_idempotent(text: str) -> None:
    """The output has no control, format, private-use, surrogate or unassigned characters, no line breaks, no
    runs of spaces, and cleaning it again changes nothing."""
    out = one_line(text)
    assert not any(unicodedata.category(ch) in DROPPED for ch in out)
    assert len(out.splitlines()) <= 1
    assert out == out.strip() and "  " not in out
    assert all(ch == " " or not ch.isspace() for ch in out)
    assert one_line(out) == out


# -- the tunnel: ?port= on the HTTPS door, control frames, close reasons --


@FUZZ
@given(st.one_of(ANY_TEXT, st.from_regex(r"\A[0-9²\u0663]{1,7}\Z"), st.integers(0, 70000).map(str)))
@example("²")
@example("9" * 5000)
def test_tunnel_port_is_1_to_65535_or_none(text: str) -> None:
    """`?port=` is an ASCII decimal 1-65535 or refused; it never raises (the door answers 400)."""
    port = parse_port(text)
    if port is None:
        return
    assert 1 <= port <= 65535 and text.isascii() and int(text) == port


@FUZZ
@given(
    st.one_of(
        ANY_TEXT,
        JSONISH.map(json.dumps),
        st.integers(1, 300).map(lambda n: "[" * n + "]" * n),
        st.integers(1, 300).map(lambda n: '{"a":' * n + "1" + "}" * n),
    )
)
def test_control_frame_kind_never_raises(data: str) -> None:
    """A text frame from the helper is a control message with a string type, or None; nesting cannot recurse."""
    kind = _control_kind(data)
    assert kind is None or isinstance(kind, str)


def test_control_frame_eof_is_recognised() -> None:
    """The helper's EOF message is read as `eof`."""
    assert _control_kind(json.dumps({"type": "eof"})) == "eof"


@FUZZ
@given(st.text(max_size=300))
def test_close_reason_fits_a_close_frame(text: str) -> None:
    """A WebSocket close reason is at most 123 bytes of valid UTF-8, whatever the notice was."""
    raw = close_reason(text)
    assert len(raw) <= 123
    raw.decode()


# -- tokens.verify --


TOKENS = TokenService(b"k" * 32, FakeClock(), lifetime=600, static={b"\x00" * 32: "robot"})
TOKEN_PARTS = st.one_of(st.text(st.sampled_from("v1.AZaz09-_="), max_size=40), ANY_TEXT)


@FUZZ
@given(st.one_of(ANY_TEXT, st.lists(TOKEN_PARTS, min_size=1, max_size=4).map(".".join), TOKEN_PARTS.map(lambda p: f"v1.{p}.{p}")))
@example("\udcff")
@example("v1.\udcff.x")
def test_token_verify_raises_only_auth_error(token: str) -> None:
    """Any string a client presents as a token verifies or raises AuthError (a 401), never anything else."""
    try:
        TOKENS.verify(token)
    except AuthError as exc:
        assert exc.reason in ("token_invalid", "token_expired")


# -- control API: reason and grace of a disconnect --


@FUZZ
@given(st.dictionaries(st.sampled_from(["reason", "grace_s", "x"]), st.one_of(JSONISH, ANY_TEXT), max_size=3))
def test_control_reason_raises_only_api_error(body: dict[str, Any]) -> None:
    """`reason` becomes one clean line of at most MAX_REASON characters, or a 400."""
    try:
        reason = ControlAPI._reason(body)
    except ApiError as exc:
        assert exc.status == 400
        return
    assert reason == one_line(reason) and len(reason) <= MAX_REASON


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["grace_s", "reason"]),
        st.one_of(JSONISH, st.integers(), st.floats(), st.integers(-(10**400), 10**400)),
        max_size=2,
    )
)
@example({"grace_s": 10**400})
def test_control_grace_raises_only_api_error(body: dict[str, Any]) -> None:
    """`grace_s` is a finite number of seconds from 0 to MAX_GRACE, or a 400."""
    try:
        grace = ControlAPI._grace(body)
    except ApiError as exc:
        assert exc.status == 400
        return
    assert isinstance(grace, float) and 0 <= grace <= MAX_GRACE


# -- regressions: inputs the properties above found, pinned as plain tests --


@pytest.mark.parametrize("state_dir", ["~nosuchuser-bastion/state", "~\x00"])
def test_config_path_that_cannot_be_expanded_is_a_problem(state_dir: str) -> None:
    """A `~user` path for a user that does not exist (or with a NUL) is a config problem at its key, not a crash."""
    doc = valid_config_data()
    doc["gateway"]["state_dir"] = state_dir
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=Path("/cfg"))
    assert [path for path, _ in info.value.problems] == ["gateway.state_dir"]


def test_config_login_key_that_cannot_be_expanded_is_a_problem() -> None:
    """The same for a VM login key path, reported at its own key."""
    doc = valid_config_data()
    doc["vms"][0]["logins"]["deploy"]["key"] = "~nosuchuser-bastion/key"
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=Path("/cfg"))
    assert [path for path, _ in info.value.problems] == ["vms[0].logins.deploy.key"]


@pytest.mark.parametrize("text", ["127.0.0.1:\u0664\u0664\u0663", "127.0.0.1:" + "9" * 5000])
def test_listen_port_is_ascii_digits(text: str) -> None:
    """Arabic-Indic digits are not a port (int() would read them), and a 5000-digit port is refused plainly."""
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(text)


@pytest.mark.parametrize("text", ["\u0663s", "\u0661\u0660m"])
def test_duration_is_ascii_digits(text: str) -> None:
    """A duration is written with ASCII digits."""
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_one_line_drops_a_word_made_only_of_format_characters() -> None:
    """A zero-width space standing alone between spaces leaves one space, not two (so cleaning is idempotent)."""
    assert one_line("a \u200b b") == "a b"


@pytest.mark.parametrize("token", ["\udcff", "v1.\udcff.x", "v1.e30.\udcff"])
def test_token_with_undecodable_bytes_is_invalid(token: str) -> None:
    """aiohttp hands header bytes that are not UTF-8 over as lone surrogates: such a token is a 401, not a 500."""
    with pytest.raises(AuthError) as info:
        TOKENS.verify(token)
    assert info.value.reason == "token_invalid"


def test_token_with_deeply_nested_payload_is_invalid() -> None:
    """An unsigned payload of 100000 nested arrays is refused by its signature before any JSON is parsed."""
    import base64

    payload = base64.urlsafe_b64encode(b"[" * 100_000).rstrip(b"=").decode()
    with pytest.raises(AuthError) as info:
        TOKENS.verify(f"v1.{payload}.AAAA")
    assert info.value.reason == "token_invalid"


def test_control_grace_of_a_huge_integer_is_a_400() -> None:
    """`{"grace_s": 1e400 written as an integer}` is refused as out of range, not an OverflowError (a 500)."""
    with pytest.raises(ApiError) as info:
        ControlAPI._grace({"grace_s": 10**400})
    assert info.value.status == 400


def test_control_token_with_undecodable_bytes_is_no_operator() -> None:
    """The control port's bearer check hashes a header with non-UTF-8 bytes (a 401), it does not raise (a 500)."""
    from types import SimpleNamespace

    api = ControlAPI(None, [], FakeClock(), None)  # type: ignore[arg-type]  # _who reads only the operators
    request = SimpleNamespace(headers={"Authorization": "Bearer \udcff"})  # aiohttp's test request cannot carry one
    assert api._who(request) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["x = " + "9" * 5000, "x = " + "[" * 100_000 + "]" * 100_000])
def test_config_file_of_a_huge_integer_or_deep_nesting_is_a_config_error(tmp_path: Path, text: str) -> None:
    """tomllib raises ValueError (not TOMLDecodeError) for a 5000-digit integer and RecursionError for deep
    nesting: both are an invalid file, not a traceback from `bastion check-config`."""
    from gateway.config import load_config

    cfg = tmp_path / "bastion.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert [path for path, _ in info.value.problems] == ["(file)"]
