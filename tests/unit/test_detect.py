"""gateway.net.detect.classify: which door do the first bytes belong to?"""

from __future__ import annotations

import pytest

from gateway.net.detect import Door, classify

# The first bytes of a real TLS 1.2/1.3 ClientHello record: handshake, version 0x0301, length, ClientHello.
CLIENT_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03])


def test_ssh_banner_is_ssh() -> None:
    """A full OpenSSH banner goes to the SSH door."""
    assert classify(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3\r\n") is Door.SSH


def test_ssh_prefix_alone_is_ssh() -> None:
    """Exactly the four bytes `SSH-` are enough to pick SSH."""
    assert classify(b"SSH-") is Door.SSH


@pytest.mark.parametrize("partial", [b"S", b"SS", b"SSH"])
def test_partial_ssh_prefix_needs_more(partial: bytes) -> None:
    """A prefix of `SSH-` cannot be decided yet."""
    assert classify(partial) is Door.NEED_MORE


def test_empty_input_needs_more() -> None:
    """No bytes yet means wait (the listener falls back to SSH on a deadline)."""
    assert classify(b"") is Door.NEED_MORE


def test_client_hello_is_tls() -> None:
    """A ClientHello record header goes to the TLS door."""
    assert classify(CLIENT_HELLO) is Door.TLS


@pytest.mark.parametrize("minor", [0x00, 0x01, 0x02, 0x03, 0x04])
def test_every_tls_record_version_is_tls(minor: int) -> None:
    """Record versions 0x0300 through 0x0304 are all TLS."""
    assert classify(bytes([0x16, 0x03, minor])) is Door.TLS


@pytest.mark.parametrize("partial", [b"\x16", b"\x16\x03"])
def test_partial_tls_header_needs_more(partial: bytes) -> None:
    """A handshake byte without the full record version cannot be decided yet."""
    assert classify(partial) is Door.NEED_MORE


def test_tls_record_with_unknown_minor_version_is_unknown() -> None:
    """0x16 0x03 0x09 is not a TLS version this gateway accepts."""
    assert classify(b"\x16\x03\x09") is Door.UNKNOWN


def test_handshake_byte_with_wrong_major_version_is_unknown() -> None:
    """0x16 followed by a non-0x03 major version is not TLS."""
    assert classify(b"\x16\x02\x01") is Door.UNKNOWN


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", b"POST /v1 HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1"])
def test_plain_http_request_is_http(line: bytes) -> None:
    """A plain-HTTP request line is told apart (it gets a one-line hint, not a silent close)."""
    assert classify(line) is Door.HTTP


@pytest.mark.parametrize(
    ("first", "door"), [(b"GE", Door.NEED_MORE), (b"GET", Door.NEED_MORE), (b"GETX", Door.UNKNOWN), (b"get ", Door.UNKNOWN)]
)
def test_http_methods_are_exact_with_a_space(first: bytes, door: Door) -> None:
    """A method prefix waits for more; another word or a lower-case method is not HTTP."""
    assert classify(first) is door


def test_lowercase_ssh_is_unknown() -> None:
    """The SSH identification string is case-sensitive."""
    assert classify(b"ssh-2.0-client") is Door.UNKNOWN


def test_ssh_lookalike_diverging_late_is_unknown() -> None:
    """`SSH_` matches three bytes of the prefix but is not SSH."""
    assert classify(b"SSH_2.0") is Door.UNKNOWN


@pytest.mark.parametrize("garbage", [b"\x00", b"\xff\xfe\xfd\xfc", b"\x80\x16\x03\x01", b"hello world", b" SSH-2.0-x"])
def test_garbage_is_unknown(garbage: bytes) -> None:
    """Bytes that start like neither protocol are unknown."""
    assert classify(garbage) is Door.UNKNOWN
