"""systemd's readiness and watchdog protocol (sd_notify(3)), without libsystemd.

Contract:

- `Notifier.from_env(env)` reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the mapping
  it is given, once; it never reads or changes `os.environ` itself. `NOTIFY_SOCKET` is an absolute path,
  or an abstract socket name when it starts with `@`. Unset or empty means "not under systemd": then
  every method is a no-op that returns False and counts nothing.
- Each call of `ready`, `stopping`, `status` or `watchdog` sends exactly one AF_UNIX SOCK_DGRAM datagram
  from a fresh non-blocking socket that is closed before the call returns. Nothing is kept open
  between calls, so a `Notifier` owns no resource and needs no closing.
- They return True when the datagram was handed to the kernel and False otherwise. A failure (the socket
  is missing, the receiver's queue is full, `NOTIFY_SOCKET` is not an address we can use) is never
  raised: it is counted in `send_failures`, and the last error is kept in `last_error`, for the caller
  to log. The calls never block and never raise, so they are safe on the event loop and in shutdown.
- Status text is sent as one line: line breaks and tabs become spaces, other control characters are
  dropped, and it is cut to `MAX_STATUS_CHARS` characters.
- `watchdog_interval` is half of `WATCHDOG_USEC`, in seconds (systemd's advice), or None when the
  watchdog is not enabled for this process: `WATCHDOG_USEC` unset, not a positive integer, or
  `WATCHDOG_PID` set to some other process. The caller owns the task that sends `watchdog()` at that
  interval.
- Not thread-safe: the failure counter belongs to the event loop's thread.
"""

from __future__ import annotations

import os
import socket
import time
import unicodedata
from collections.abc import Mapping
from typing import Protocol

MAX_STATUS_CHARS = 200
"""Longest STATUS= text sent; `systemctl status` shows one line and the journal keeps no more."""

_LINE_BREAKS = frozenset("\t\n\v\f\r\x1c\x1d\x1e\x85\u2028\u2029")


class ServiceNotifier(Protocol):
    """What the daemon needs from a service manager; `Notifier` is the systemd one, tests pass a fake."""

    def ready(self, status: str | None = None) -> bool: ...

    def stopping(self, status: str | None = None) -> bool: ...

    def reloading(self, status: str | None = None) -> bool: ...

    def status(self, text: str) -> bool: ...

    def watchdog(self) -> bool: ...

    @property
    def watchdog_interval(self) -> float | None: ...


def one_line(text: str, limit: int = MAX_STATUS_CHARS) -> str:
    """`text` as a single line of at most `limit` characters, with no control characters."""
    out = "".join(" " if ch in _LINE_BREAKS else ch for ch in text if ch in _LINE_BREAKS or unicodedata.category(ch) != "Cc")
    out = out.strip()
    return out if len(out) <= limit else out[: max(limit - 1, 0)] + "…"


def _parse_address(value: str) -> bytes | None:
    """The sockaddr for NOTIFY_SOCKET, or None when it is neither an absolute path nor `@name`."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def _parse_watchdog(usec: str | None, watchdog_pid: str | None, pid: int) -> float | None:
    if usec is None:
        return None
    if watchdog_pid is not None:
        try:
            if int(watchdog_pid) != pid:
                return None
        except ValueError:
            return None
    try:
        micros = int(usec)
    except ValueError:
        return None
    if micros <= 0:
        return None
    return micros / 2_000_000


class Notifier:
    """Sends readiness, status, stopping and watchdog notifications to systemd (see the module docstring)."""

    __slots__ = ("_address", "_configured", "_last_error", "_send_failures", "_watchdog_interval")

    def __init__(self, notify_socket: str | None = None, watchdog_interval: float | None = None) -> None:
        """`notify_socket` as in NOTIFY_SOCKET (None or "" disables); `watchdog_interval` in seconds."""
        self._configured = bool(notify_socket)
        self._address = _parse_address(notify_socket) if notify_socket else None
        self._watchdog_interval = watchdog_interval
        self._send_failures = 0
        self._last_error: OSError | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, pid: int | None = None) -> Notifier:
        """Build from an environment mapping (usually `os.environ`); `pid` defaults to this process's."""
        me = os.getpid() if pid is None else pid
        interval = _parse_watchdog(env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"), me)
        return cls(env.get("NOTIFY_SOCKET") or None, interval)

    @property
    def enabled(self) -> bool:
        """True when NOTIFY_SOCKET was given, i.e. the methods try to send."""
        return self._configured

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between `watchdog()` calls, or None when systemd does not watch this process."""
        return self._watchdog_interval

    @property
    def send_failures(self) -> int:
        """How many notifications could not be sent so far."""
        return self._send_failures

    @property
    def last_error(self) -> OSError | None:
        """The error of the most recent failed send, if any."""
        return self._last_error

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is finished (with an optional status line)."""
        return self._send("READY=1", status)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: the drain has begun (with an optional status line)."""
        return self._send("STOPPING=1", status)

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (what systemd 253+ asks for): a reload began; READY=1 ends it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}", status)

    def status(self, text: str) -> bool:
        """STATUS=...: a one-line, human-readable state for `systemctl status`."""
        return self._send(None, text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the keep-alive ping; call it every `watchdog_interval` seconds."""
        return self._send("WATCHDOG=1", None)

    def __repr__(self) -> str:
        return f"Notifier(enabled={self._configured}, watchdog_interval={self._watchdog_interval}, send_failures={self._send_failures})"

    def _send(self, state: str | None, status: str | None) -> bool:
        if not self._configured:
            return False
        lines = [state] if state is not None else []
        if status is not None:
            lines.append("STATUS=" + one_line(status))
        payload = "\n".join(lines).encode("utf-8", "replace")
        if self._address is None:
            return self._failed(OSError("NOTIFY_SOCKET is neither an absolute path nor an @abstract name"))
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            return self._failed(exc)
        return True

    def _failed(self, exc: OSError) -> bool:
        self._send_failures += 1
        self._last_error = exc
        return False
