"""A small client for the control API, used by `bastion sessions` and `bastion disconnect`."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp


class ControlError(Exception):
    """The control API refused or could not be reached. `message` is for the operator."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ControlClient:
    url: str
    token: str = field(repr=False)
    ca_file: str | None = None
    insecure: bool = False
    timeout: float = 15.0

    def _ssl(self) -> ssl.SSLContext | bool:
        if self.insecure:
            return False
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else ssl.create_default_context()

    def _session(self, *, stream: bool = False) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(
            total=None if stream else self.timeout, connect=self.timeout, sock_read=None if stream else self.timeout
        )
        return aiohttp.ClientSession(
            base_url=self.url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=timeout,
            connector=aiohttp.TCPConnector(ssl=self._ssl()),
        )

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            async with self._session() as http, http.request(method, path.lstrip("/"), json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status >= 400:
                    msg = data.get("message") if isinstance(data, dict) else None
                    raise ControlError(f"{resp.status}: {msg or resp.reason}", resp.status)
                return data
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ControlError(f"cannot verify the control port's certificate ({exc.certificate_error}); pass --ca-file") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ControlError(f"cannot reach {self.url}: {exc or type(exc).__name__}") from None
        except json.JSONDecodeError:
            raise ControlError(f"{self.url} did not answer with JSON") from None

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
