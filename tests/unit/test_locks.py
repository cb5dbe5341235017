"""Locks as pure logic on the fake clock: targets, expiry, the file that survives a restart, token revocation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.errors import StartupError
from gateway.locks import LockError, LockStore, clean_reason, parse_expires, parse_target
from tests.support.clock import FakeClock


def test_targets_are_validated_and_normalised() -> None:
    """Users and VMs must be valid names; sources are addresses or networks, stored as CIDR; an IPv4-mapped address is IPv4."""
    assert parse_target("user", "alice") == ("user", "alice")
    assert parse_target("vm", "web01") == ("vm", "web01")
    assert parse_target("source", "192.0.2.7") == ("source", "192.0.2.7/32")
    assert parse_target("source", "192.0.2.7/24") == ("source", "192.0.2.0/24")
    assert parse_target("source", "::ffff:192.0.2.7") == ("source", "192.0.2.7/32")
    assert parse_target("source", "2001:db8::1/64") == ("source", "2001:db8::/64")
    for kind, target, words in (
        ("user", "Alice", "not a valid user name"),
        ("vm", "web 01", "not a valid VM name"),
        ("source", "300.1.1.1", "not an IP address or CIDR"),
        ("source", 5, "must be a non-empty string"),
        ("group", "ops", "exactly one of"),
    ):
        with pytest.raises(LockError, match=words):
            parse_target(kind, target)


def test_expiry_is_a_duration_or_a_future_time() -> None:
    now = 1_000_000.0
    assert parse_expires(None, now) is None
    assert parse_expires("30m", now) == now + 1800
    assert parse_expires("1970-01-12T14:00:00Z", now) == 1_000_800.0
    for value, words in (("0s", "in the future"), ("1970-01-01T00:00:00Z", "in the future"), ("soon", "not a duration"), (3, "a duration")):
        with pytest.raises(LockError, match=words):
            parse_expires(value, now)
    with pytest.raises(LockError, match="time zone"):
        parse_expires("1970-01-12T14:00:00", now)


def test_reasons_lose_control_characters() -> None:
    assert clean_reason("stolen\x1b[2J laptop\u202e") == "stolen[2J laptop"  # no ESC: the rest is harmless text
    with pytest.raises(LockError):
        clean_reason(["x"])


def test_a_lock_matches_its_target_until_it_expires(tmp_path: Path) -> None:
    clock = FakeClock()
    store = LockStore(tmp_path / "locks.json", clock)
    now = clock.now().timestamp()
    user = store.add("user", "alice", "stolen", now + 60, "noc")
    net = store.add("source", "10.0.0.0/8", "", None, "noc")
    assert store.match(user="alice") == user
    assert store.match(user="bob", source="10.1.2.3") == net
    assert store.match(user="bob", source="192.0.2.1") is None
    assert store.refusal(user="alice", vm="web01", source="192.0.2.1") == "access to your account is locked by an operator: stolen"
    clock.mono += 61
    assert store.match(user="alice") is None
    assert [lk.id for lk in store.list()] == [net.id]


def test_locks_and_revocations_survive_a_restart_in_a_private_file(tmp_path: Path) -> None:
    """The file is mode 0600 and written atomically; a new store reads the same locks and the token floor."""
    clock = FakeClock()
    path = tmp_path / "locks.json"
    store = LockStore(path, clock)
    lock = store.add("user", "alice", "audit", None, "noc")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert not (tmp_path / "locks.json.tmp").exists()
    again = LockStore(path, clock)
    again.load()
    assert again.list() == [lock]
    issued_before = clock.now().timestamp() - 0.001
    assert again.token_revoked("alice", issued_before)
    assert again.remove(lock.id) == lock
    third = LockStore(path, clock)
    third.load()
    assert third.list() == [] and third.token_revoked("alice", issued_before)  # lifting a lock does not revive old tokens
    assert not third.token_revoked("alice", clock.now().timestamp() + 1)
    assert not third.token_revoked("bob", issued_before)


@pytest.mark.parametrize("content", ["{", json.dumps({"version": 9}), json.dumps({"version": 1, "locks": [{"kind": "user"}]})])
def test_an_unusable_locks_file_stops_the_start(tmp_path: Path, content: str) -> None:
    """Starting without the locks would let locked users in: a broken file is a startup error naming it."""
    path = tmp_path / "locks.json"
    path.write_text(content)
    with pytest.raises(StartupError, match=r"locks\.json"):
        LockStore(path, FakeClock()).load()


def test_a_failed_save_changes_nothing(tmp_path: Path) -> None:
    """When the state dir cannot be written the lock is not in force either: the operator is told, nothing half-applies."""
    store = LockStore(tmp_path / "missing-dir" / "locks.json", FakeClock())
    with pytest.raises(OSError):
        store.add("user", "alice", "", None, "noc")
    assert store.list() == [] and store.match(user="alice") is None
