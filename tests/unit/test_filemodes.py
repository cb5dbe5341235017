"""Secrets at rest: a state directory or private key that others may reach stops the start, naming the fix."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import asyncssh
import pytest

from gateway.app import ensure_state_dir, load_host_keys, load_tls
from gateway.config import Config, parse_config
from gateway.errors import StartupError
from gateway.filemodes import check_private_file, check_state_dir
from gateway.logs import make_logger
from gateway.net import tls
from gateway.protocols.upstream_ssh import Credentials
from gateway.tokens import load_or_create_key
from tests.support.peers import make_key
from tests.unit.helpers import valid_config_data


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _config(tmp_path: Path, **edits: dict[str, object]) -> Config:
    data = valid_config_data()
    data["gateway"]["state_dir"] = str(tmp_path / "state")
    data["vms"][0]["logins"] = {"deploy": {"key": str(tmp_path / "deploy")}}
    for section, values in edits.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data, base_dir=tmp_path)


def _private_file(tmp_path: Path, mode: int, name: str = "secret") -> Path:
    path = tmp_path / name
    path.write_bytes(b"x" * 32)
    path.chmod(mode)
    return path


# -- the state directory --


def test_new_state_dir_is_0700_and_accepted(tmp_path: Path) -> None:
    """A state dir the gateway creates itself is 0700 and passes its own check."""
    state = ensure_state_dir(tmp_path / "a" / "state")
    assert _mode(state) == 0o700


@pytest.mark.parametrize("mode", [0o700, 0o500])
def test_private_state_dir_is_accepted(tmp_path: Path, mode: int) -> None:
    """An existing state dir only its owner may enter passes."""
    state = tmp_path / "state"
    state.mkdir(mode=mode)
    state.chmod(mode)
    check_state_dir(state)


def test_state_dir_0755_is_refused_with_the_chmod_to_run(tmp_path: Path) -> None:
    """An existing 0755 state dir (the default of `mkdir` and of systemd's StateDirectory=) stops the start; the
    message names the key, the directory, its mode and the command that fixes it."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    with pytest.raises(StartupError) as info:
        ensure_state_dir(state)
    msg = info.value.message
    assert msg.startswith("gateway.state_dir: ")
    assert f"{str(state)!r} has mode 0755" in msg
    assert "group or others may list and enter it" in msg
    assert f"run `chmod 700 {state}`" in msg


@pytest.mark.parametrize(("mode", "words"), [(0o770, "list and write in and enter"), (0o701, "enter"), (0o720, "write in")])
def test_state_dir_with_any_group_or_other_bit_is_refused(tmp_path: Path, mode: int, words: str) -> None:
    """Any of the 0o077 bits is enough: a group that may write can swap the keys, one that may enter can read them."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(StartupError, match=f"has mode {mode:04o}, so group or others may {words} it"):
        check_state_dir(state)


def test_state_dir_owned_by_another_uid_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state dir that belongs to another user (seen as the gateway running under another uid) stops the start."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    owner = state.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(StartupError) as info:
        check_state_dir(state)
    msg = info.value.message
    assert msg.startswith(f"gateway.state_dir: state directory {str(state)!r} is owned by uid {owner}, not by uid {owner + 1}")
    assert f"run `chown {owner + 1} {state}`" in msg


def test_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    """A file where the state dir should be is named as not a directory."""
    path = _private_file(tmp_path, 0o600, "state")
    with pytest.raises(StartupError, match=r"gateway\.state_dir: not a directory"):
        check_state_dir(path)


# -- private key files --


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_key_only_its_owner_may_read_is_accepted(tmp_path: Path, mode: int) -> None:
    """0600 and 0400 pass, as they do for sshd."""
    check_private_file(_private_file(tmp_path, mode), "ssh.host_keys[0]")


@pytest.mark.parametrize(
    ("mode", "words"), [(0o644, "read"), (0o640, "read"), (0o604, "read"), (0o620, "write"), (0o660, "read and write"), (0o610, "run")]
)
def test_private_key_others_may_reach_is_refused(tmp_path: Path, mode: int, words: str) -> None:
    """Any group or other bit makes it an unprotected private key file; the message names key, file, mode and fix."""
    path = _private_file(tmp_path, mode)
    with pytest.raises(StartupError) as info:
        check_private_file(path, "ssh.host_keys[0]", "SSH host key")
    msg = info.value.message
    assert msg.startswith(f"ssh.host_keys[0]: UNPROTECTED PRIVATE KEY FILE: SSH host key {str(path)!r} has mode {mode:04o}")
    assert f"so group or others may {words} it: run `chmod 600 {path}`" in msg


def test_private_key_owned_by_another_uid_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0600 key that belongs to another user is refused: its owner could read or replace it."""
    path = _private_file(tmp_path, 0o600)
    owner = path.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(StartupError, match=f"is owned by uid {owner}, not by uid {owner + 1} that the gateway runs as"):
        check_private_file(path, "public.tls_key", "TLS key")


def test_symlink_to_an_open_key_is_refused(tmp_path: Path) -> None:
    """What counts is the file read: a 0777 symlink to a 0600 key passes, a link to a 0644 key does not."""
    good, bad = _private_file(tmp_path, 0o600, "good"), _private_file(tmp_path, 0o644, "bad")
    (tmp_path / "to-good").symlink_to(good)
    (tmp_path / "to-bad").symlink_to(bad)
    check_private_file(tmp_path / "to-good", "k")
    with pytest.raises(StartupError, match="has mode 0644"):
        check_private_file(tmp_path / "to-bad", "k")


def test_missing_key_is_file_not_found(tmp_path: Path) -> None:
    """A missing key is reported as before, with its key path."""
    with pytest.raises(StartupError, match=r"^ssh.host_keys\[0\]: file not found: "):
        check_private_file(tmp_path / "nope", "ssh.host_keys[0]")


# -- where the gateway reads its secrets --


def test_token_key_is_created_0600_and_an_open_one_is_refused(tmp_path: Path) -> None:
    """The token signing key is created 0600; an existing one others may read stops the start."""
    key = tmp_path / "token.key"
    load_or_create_key(key)
    assert _mode(key) == 0o600
    key.chmod(0o644)
    with pytest.raises(StartupError, match=r"^gateway.state_dir: UNPROTECTED PRIVATE KEY FILE: token signing key .* has mode 0644"):
        load_or_create_key(key)


def test_generated_host_key_is_0600_and_an_open_one_is_refused(tmp_path: Path) -> None:
    """The generated ed25519 host key is 0600 and accepted; loosened later, it is refused (its .pub is not checked)."""
    cfg = _config(tmp_path)
    state = ensure_state_dir(tmp_path / "state")
    log = make_logger(io.StringIO(), fmt="json")
    load_host_keys(cfg, state, log)
    assert _mode(state / "ssh_host_ed25519_key") == 0o600
    (state / "ssh_host_ed25519_key.pub").chmod(0o644)
    load_host_keys(cfg, state, log)
    (state / "ssh_host_ed25519_key").chmod(0o640)
    with pytest.raises(StartupError, match=r"gateway\.state_dir: UNPROTECTED PRIVATE KEY FILE: generated SSH host key"):
        load_host_keys(cfg, state, log)


def test_configured_host_key_others_may_read_is_refused(tmp_path: Path) -> None:
    """A host key from `ssh.host_keys` with mode 0640 is refused under its key path, before it is parsed."""
    pair = make_key(tmp_path / "host_key")
    pair.private.chmod(0o640)
    cfg = _config(tmp_path, ssh={"host_keys": [str(pair.private)]})
    with pytest.raises(StartupError, match=r"^ssh.host_keys\[0\]: UNPROTECTED PRIVATE KEY FILE: SSH host key .* mode 0640"):
        load_host_keys(cfg, tmp_path, make_logger(io.StringIO(), fmt="json"))


def test_tls_keys_generated_0600_and_a_configured_open_one_is_refused(tmp_path: Path) -> None:
    """The self-signed key is 0600 and accepted (the certificate may be 0644); a configured tls_key others may
    read is refused under `public.tls_key`."""
    cfg = _config(tmp_path)
    state = ensure_state_dir(tmp_path / "state")
    load_tls(cfg, state, make_logger(io.StringIO(), fmt="json"))
    assert _mode(state / "tls.key") == 0o600
    cert, key = tmp_path / "crt.pem", tmp_path / "key.pem"
    tls.write_self_signed(cert, key, ["localhost"])
    cert.chmod(0o644)
    key.chmod(0o644)
    cfg = _config(tmp_path, public={"tls_cert": str(cert), "tls_key": str(key)})
    with pytest.raises(StartupError, match=r"^public.tls_key: UNPROTECTED PRIVATE KEY FILE: TLS key .* mode 0644"):
        load_tls(cfg, state, make_logger(io.StringIO(), fmt="json"))
    key.chmod(0o600)
    load_tls(cfg, state, make_logger(io.StringIO(), fmt="json"))


def test_control_tls_key_is_checked_under_its_own_key(tmp_path: Path) -> None:
    """The control port's key goes through the same context builder and is named `control.tls_key`."""
    cert, key = tmp_path / "crt.pem", tmp_path / "key.pem"
    tls.write_self_signed(cert, key, ["localhost"])
    key.chmod(0o604)
    with pytest.raises(StartupError, match=r"^control.tls_key: UNPROTECTED PRIVATE KEY FILE"):
        tls.server_context(cert, key, label="control")


def test_vm_login_key_others_may_read_is_refused(tmp_path: Path) -> None:
    """A VM login key with group bits is refused like ssh refuses such an identity file, naming the inventory key."""
    make_key(tmp_path / "deploy")
    cfg = _config(tmp_path)
    assert Credentials.load(cfg.vms).get("web01", "deploy") is not None
    (tmp_path / "deploy").chmod(0o660)
    with pytest.raises(StartupError, match=r"^vms\[web01\].logins.deploy.key: UNPROTECTED PRIVATE KEY FILE: VM login key .* 0660"):
        Credentials.load(cfg.vms)


def test_test_helper_keys_are_private(tmp_path: Path) -> None:
    """`tests.support.peers.make_key` (the e2e keys) writes 0600 keys the gateway accepts, whatever the umask."""
    old = os.umask(0)
    try:
        pair = make_key(tmp_path / "k")
    finally:
        os.umask(old)
    assert _mode(pair.private) == 0o600
    asyncssh.read_private_key(pair.private)
