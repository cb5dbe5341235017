"""One error hierarchy. Every error carries a stable reason slug.

The slug is used alike in logs, metrics, API answers and close codes, so it
never changes once released. The message is for humans and may change.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    reason: str = "internal_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class ConfigError(GatewayError):
    """The configuration is invalid. `problems` lists every (key path, message)."""

    reason = "config_invalid"

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        text = "; ".join(f"{path}: {msg}" for path, msg in self.problems)
        super().__init__(f"invalid configuration: {text}")


class StartupError(GatewayError):
    """The daemon cannot start: a port in use, a missing certificate, an unreadable key.

    `problems` lists each problem on its own (one, unless a check found several at once); the message joins them.
    """

    reason = "startup_failed"

    def __init__(self, message: str, *, reason: str | None = None, problems: list[str] | None = None) -> None:
        super().__init__(message, reason=reason)
        self.problems = list(problems) if problems else [message]


class AuthError(GatewayError):
    reason = "auth_failed"


class PolicyDenied(GatewayError):
    """The principal may not reach this target. The message never says whether it exists."""

    reason = "policy_denied"


class BadRequest(GatewayError):
    """A request a door could parse but no handler can serve as asked (e.g. a tunnel without the upgrade)."""

    reason = "bad_request"


class TargetRefused(GatewayError):
    """The client asked for a target that is not an inventory name (IP literal, localhost, ...)."""

    reason = "target_refused"


class UpstreamError(GatewayError):
    reason = "upstream_failed"


class UpstreamTimeout(UpstreamError):
    reason = "upstream_timeout"


class UpstreamRefused(UpstreamError):
    reason = "upstream_refused"


class UpstreamHostKeyMismatch(UpstreamError):
    reason = "upstream_host_key_mismatch"


class UpstreamAuthFailed(UpstreamError):
    reason = "upstream_auth_failed"
