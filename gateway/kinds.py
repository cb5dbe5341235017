"""Closed sets as types: the protocols a session can speak and the reasons a session ends.

These sit at the bottom layer. Metric labels, the OpenAPI enums, config
validation and log fields are derived from them, never retyped. A value
never changes once released: dashboards and audits key on it.
"""

from __future__ import annotations

from enum import StrEnum


class Protocol(StrEnum):
    """How a session reaches its VM (the `protocol` of a session and of a rule)."""

    SSH = "ssh"  # terminating SSH: the gateway logs in to the VM
    SSH_JUMP = "ssh-jump"  # ssh -J / -W / -L: a TCP stream inside the user's SSH connection
    RDP = "rdp"  # a TCP stream to the VM's rdp_port (WebSocket tunnel or ssh -L)
    TCP = "tcp"  # a WebSocket tunnel to any other granted port
    RDP_GATEWAY = "rdp-gateway"  # RDP through the RD Gateway protocol (mstsc, xfreerdp /g:); granted by `rdp` rules
    SSH_WEB = "ssh-web"  # a terminal in the browser (the gateway logs in to the VM); granted by `ssh` rules


class Reason(StrEnum):
    """Why a session ended: the `reason` of `session_closed`, metrics and API answers."""

    CLIENT_CLOSED = "client_closed"  # the user's side closed (FIN, channel close, WebSocket close)
    CLIENT_LOST = "client_lost"  # the user's connection dropped without closing the session (killed, FIN or RST mid-session)
    CLIENT_ERROR = "client_error"  # the user's side broke the protocol (oversized message, bad frame)
    CLIENT_SILENT = "client_silent"  # keepalives went unanswered
    VM_CLOSED = "vm_closed"  # the VM closed (exit, FIN)
    VM_RESET = "vm_reset"  # the VM's connection broke (RST, error)
    VM_SILENT = "vm_silent"  # the VM stopped answering keepalives
    IDLE_TIMEOUT = "idle_timeout"  # no input from the user for the rule's idle_timeout
    MAX_DURATION = "max_duration"  # the rule's max_duration passed
    HALF_CLOSE_TIMEOUT = "half_close_timeout"  # one side sent EOF and the other did not finish in time
    TERMINATED_BY_OPERATOR = "terminated_by_operator"
    GATEWAY_SHUTDOWN = "gateway_shutdown"  # the gateway drained and this session outlived the grace
    LOCKED = "locked"  # an operator locked the user, the VM or the source network
    ACCESS_REVOKED = "access_revoked"  # a config reload no longer grants this session
    UPSTREAM_REFUSED = "upstream_refused"  # the VM refused the session after the dial (channel open failed)
    UPSTREAM_FAILED = "upstream_failed"
    INTERNAL_ERROR = "internal_error"  # a bug: logged with a traceback field

    @property
    def operator_initiated(self) -> bool:
        return self in (Reason.TERMINATED_BY_OPERATOR, Reason.GATEWAY_SHUTDOWN, Reason.LOCKED)


class Refusal(StrEnum):
    """Why a connection was closed before any protocol ran: the `reason` of `connection_refused` and its metric."""

    MAX_CONNECTIONS = "max_connections"  # the listener holds public.max_connections already
    MAX_CONNECTIONS_PER_SOURCE = "max_connections_per_source"  # this source (IPv4 address, IPv6 /64) holds its share
    PENALTY = "penalty"  # this source is serving a penalty (auth failures, grace exceeded, no auth)
    MAX_TLS_HANDSHAKES = "max_tls_handshakes"  # too many TLS handshakes in progress
    VERSION_TIMEOUT = "version_timeout"  # an SSH client sent no identification string within ssh.version_timeout
    PROXY_HEADER = "proxy_header"  # a configured load balancer's connection did not start with a valid PROXY header in time
    PROXY_UNTRUSTED = "proxy_untrusted"  # a PROXY header from an address not in public.proxy_protocol_from (not parsed)
    PLAIN_HTTP = "plain_http"  # an http:// request: answered with one line saying the port speaks SSH and HTTPS
    UNKNOWN_PROTOCOL = "unknown_protocol"  # the first bytes are neither SSH, TLS nor HTTP


class PenaltyEvent(StrEnum):
    """What a source did to earn a penalty (like OpenSSH's PerSourcePenalties)."""

    AUTH_FAILURE = "auth_failure"  # the connection ended unauthenticated after failed attempts
    GRACE_EXCEEDED = "grace_exceeded"  # no SSH version in time, or no login within login_grace_time
    NO_AUTH = "no_auth"  # the connection ended without ever attempting authentication
