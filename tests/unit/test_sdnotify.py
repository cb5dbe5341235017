"""The systemd notifier: real AF_UNIX datagram sockets receive exactly what systemd would read."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.sdnotify import MAX_STATUS_CHARS, Notifier, ServiceNotifier


@pytest.fixture
def receiver() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound to a path, as systemd's NOTIFY_SOCKET; a short dir keeps it under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        path = os.path.join(tmp, "notify")
        sock.bind(path)
        sock.settimeout(5)
        yield path, sock


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound to a fresh abstract name; NOTIFY_SOCKET spells it with a leading @."""
    name = f"bastion-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield "@" + name, sock


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.ready("serving on :443"), b"READY=1\nSTATUS=serving on :443"),
        (lambda n: n.stopping("draining 3 sessions"), b"STOPPING=1\nSTATUS=draining 3 sessions"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.status("12 sessions"), b"STATUS=12 sessions"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
    ],
)
def test_path_socket_receives_exactly_one_datagram(
    receiver: tuple[str, socket.socket], call: Callable[[Notifier], bool], expected: bytes
) -> None:
    """Each method sends one datagram with exactly systemd's KEY=VALUE lines, and reports success."""
    path, sock = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert call(notifier) is True
    assert sock.recv(4096) == expected
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)
    assert notifier.send_failures == 0


def test_abstract_socket_receives_the_datagram(abstract_receiver: tuple[str, socket.socket]) -> None:
    """NOTIFY_SOCKET=@name reaches the abstract socket `\\0name`."""
    address, sock = abstract_receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert notifier.ready("up") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_status_is_one_line_without_control_characters(receiver: tuple[str, socket.socket]) -> None:
    """Line breaks and tabs become spaces and other control characters vanish, so a status cannot inject READY=1."""
    path, sock = receiver
    Notifier.from_env({"NOTIFY_SOCKET": path}).status("ok\nREADY=1\r\n\x00x\x1b[2J\ty\u2028z ")
    assert sock.recv(4096) == b"STATUS=ok READY=1  x[2J y z"


def test_status_length_is_bounded(receiver: tuple[str, socket.socket]) -> None:
    """A long status is cut to MAX_STATUS_CHARS characters, ending in an ellipsis."""
    path, sock = receiver
    Notifier.from_env({"NOTIFY_SOCKET": path}).status("é" * 5000)
    text = sock.recv(65536).decode().removeprefix("STATUS=")
    assert len(text) == MAX_STATUS_CHARS and text.endswith("…")


def test_without_notify_socket_everything_is_a_no_op() -> None:
    """Outside systemd every method returns False and nothing counts as a failure."""
    for env in ({}, {"NOTIFY_SOCKET": ""}):
        notifier = Notifier.from_env(env)
        assert not notifier.enabled
        assert [notifier.ready("x"), notifier.stopping("x"), notifier.status("x"), notifier.watchdog()] == [False] * 4
        assert notifier.send_failures == 0 and notifier.last_error is None


def test_missing_socket_path_returns_false_and_counts() -> None:
    """A NOTIFY_SOCKET that does not exist makes each call return False, never raise, and count the failure."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as tmp:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": os.path.join(tmp, "gone")})
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.send_failures == 2
        assert isinstance(notifier.last_error, FileNotFoundError)


@pytest.mark.parametrize("value", ["relative/notify", "@", "vsock:2:1234"])
def test_unusable_address_is_a_counted_failure(value: str) -> None:
    """A NOTIFY_SOCKET that is neither an absolute path nor @name fails each call without raising."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.send_failures == 1 and isinstance(notifier.last_error, OSError)


def test_full_receiver_queue_does_not_block(receiver: tuple[str, socket.socket]) -> None:
    """When systemd does not read, the sends fail with EAGAIN instead of blocking the event loop."""
    path, _ = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    results = [notifier.watchdog() for _ in range(100_000) if notifier.send_failures == 0]
    assert results[0] is True and results[-1] is False
    assert isinstance(notifier.last_error, BlockingIOError)


def test_a_socket_that_was_removed_later_is_survived(receiver: tuple[str, socket.socket]) -> None:
    """The first call works; after the socket file is gone the next one returns False."""
    path, sock = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.ready() is True
    assert sock.recv(4096) == b"READY=1"
    Path(path).unlink()
    assert notifier.stopping() is False
    assert notifier.send_failures == 1


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1"}, 0.0000005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "junk"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-30000000"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(env: dict[str, str], interval: float | None) -> None:
    """WATCHDOG_USEC (a positive integer) gives half its value in seconds, unless WATCHDOG_PID names another process."""
    assert Notifier.from_env(env, pid=4242).watchdog_interval == interval


def test_watchdog_pid_defaults_to_this_process() -> None:
    """Without an injected pid, WATCHDOG_PID is compared with os.getpid()."""
    assert Notifier.from_env({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 1.0
    assert Notifier.from_env({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None


def test_from_env_leaves_the_mapping_alone() -> None:
    """Reading the environment does not unset NOTIFY_SOCKET: whether children inherit it is the caller's choice."""
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
    Notifier.from_env(env)
    assert env == {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}


def test_notifier_satisfies_the_protocol() -> None:
    """Notifier is a ServiceNotifier, so the composition root can pass it where a fake goes in tests."""
    notifier: ServiceNotifier = Notifier.from_env({})
    assert notifier.watchdog_interval is None
