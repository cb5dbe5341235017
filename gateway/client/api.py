"""A small client for the control API, used by the operator commands (`bastion sessions`, `disconnect`, `notice`, ...)."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yarl


class ControlError(Exception):
    """The control API refused or could not be reached. `message` is for the operator."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def check_url(url: str) -> str:
    """The control URL, if it is `https://HOST[:PORT][/PATH]`. Raises ControlError saying what is wrong."""
    example = "e.g. https://127.0.0.1:4443"
    try:
        parsed = yarl.URL(url)
    except (ValueError, TypeError) as exc:
        raise ControlError(f"control URL {url!r} is not a URL ({exc}); {example}") from None
    if parsed.scheme != "https":
        raise ControlError(f"control URL {url!r} must start with https:// (the control port speaks only TLS); {example}")
    if not parsed.host:
        raise ControlError(f"control URL {url!r} has no host; {example}")
    if parsed.query_string or parsed.fragment or parsed.user is not None:
        raise ControlError(f"control URL {url!r} must not carry a query, a fragment or credentials (the token goes in --token); {example}")
    return url


def tls_context(ca_file: str | None, *, insecure: bool = False) -> ssl.SSLContext | bool:
    """The context that verifies the control port: the system's CAs, or only `ca_file`'s. Raises ControlError
    naming the file when it is missing, unreadable or holds no PEM certificate."""
    if insecure:
        return False
    if not ca_file:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise ControlError(f"CA file not found: {ca_file!r}") from None
    except IsADirectoryError:
        raise ControlError(f"CA file {ca_file!r} is a directory") from None
    except ssl.SSLError:  # before OSError, of which it is a subclass
        raise ControlError(f"CA file {ca_file!r} holds no PEM certificate") from None
    except OSError as exc:
        raise ControlError(f"cannot read CA file {ca_file!r}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ControlClient:
    """A client for one control URL. Construction checks the URL and the CA file (raises ControlError)."""

    url: str
    token: str = field(repr=False)
    ca_file: str | None = None
    insecure: bool = False
    timeout: float = 15.0
    _tls: ssl.SSLContext | bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_url(self.url)
        if not self.token.isprintable() or not self.token.isascii():  # it goes into a header
            raise ControlError("the token must be one line of printable text")
        object.__setattr__(self, "_tls", tls_context(self.ca_file, insecure=self.insecure))

    def _session(self, *, stream: bool = False) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(
            total=None if stream else self.timeout, connect=self.timeout, sock_read=None if stream else self.timeout
        )
        return aiohttp.ClientSession(
            base_url=self.url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=timeout,
            connector=aiohttp.TCPConnector(ssl=self._tls),
        )

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request; the answer's JSON object. Raises ControlError (refused, unreachable, not JSON)."""
        try:
            async with self._session() as http, http.request(method, path.lstrip("/"), json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status >= 400:
                    msg = data.get("message") if isinstance(data, dict) else None
                    raise ControlError(f"{resp.status}: {msg or resp.reason}", resp.status)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ControlError(
                f"cannot verify the control port's certificate ({exc.certificate_error}); pass --ca-file (or set BASTION_CA_FILE)"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ControlError(f"cannot reach {self.url}: {exc or type(exc).__name__}") from None
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            raise ControlError(f"{self.url} did not answer with JSON (is it the control port?)") from None
        if not isinstance(data, dict):
            raise ControlError(f"{self.url} did not answer with a JSON object (is it the control port?)")
        return data

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Follow /v1/events; yields (kind, data)."""
        try:
            async with self._session(stream=True) as http, http.get("v1/events") as resp:
                if resp.status >= 400:
                    raise ControlError(f"{resp.status}: {resp.reason}", resp.status)
                kind, data = "message", ""
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n")
                    if not line:
                        if data:
                            yield kind, json.loads(data)
                        kind, data = "message", ""
                    elif line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        data += line[6:]
        except aiohttp.ClientError as exc:
            raise ControlError(f"event stream from {self.url} ended: {exc}") from None
