"""A real OpenID Connect provider for tests: `oidc-provider-mock` (PyPI) as a child process on loopback.

It is a real OP (discovery, an RS256 JWKS, the authorization code flow, the token endpoint) with two quirks
the tests rely on: any client id and secret is accepted while registration is not required (its default), and
its authorize page is a plain form whose POST of `sub=USER` to the same URL answers 302 to the redirect URI
with `code` and `state`, so a test drives the flow with aiohttp and no browser. It ignores PKCE (it accepts a
`code_challenge` and never checks the verifier), so PKCE is checked on the URL the gateway builds.

The process is ended by its PID (terminate, then kill) and its temp dir removed, whatever the test did.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp

from tests.support.peers import free_port

START_TIMEOUT = 30.0  # its first start imports flask, authlib and pydantic: about 3 s on this machine's 2 cores
STOP_TIMEOUT = 5.0


def _mock_command() -> list[str]:
    script = Path(sys.executable).with_name("oidc-provider-mock")
    return [str(script)] if script.exists() else [sys.executable, "-m", "oidc_provider_mock"]


@dataclass
class OIDCProvider:
    """A running provider: `url` is its issuer (`http://127.0.0.1:PORT`, no trailing slash)."""

    url: str
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)
    log: Path = field(repr=False)

    def stop(self) -> None:
        """End the process by its PID: SIGTERM, then SIGKILL after `STOP_TIMEOUT`. Idempotent."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@contextlib.contextmanager
def running_oidc_provider(
    users: Mapping[str, Mapping[str, Any]], *, token_max_age: int | None = None, require_nonce: bool = True
) -> Iterator[OIDCProvider]:
    """Start `oidc-provider-mock` on 127.0.0.1 with one `--user-claims` per user (sub -> its other claims), wait
    until its discovery document answers (bounded by `START_TIMEOUT`), yield it, and stop it."""
    tmp = Path(tempfile.mkdtemp(prefix="bastion-oidc-"))
    port = free_port()
    cmd = [*_mock_command(), "-p", str(port), "-H", "127.0.0.1", "--require-nonce", "true" if require_nonce else "false"]
    if token_max_age is not None:
        cmd += ["--token-max-age", str(token_max_age)]
    for sub, claims in users.items():
        cmd += ["--user-claims", json.dumps({**claims, "sub": sub})]
    log = tmp / "provider.log"
    provider: OIDCProvider | None = None
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp)
        provider = OIDCProvider(url=f"http://127.0.0.1:{port}", port=port, process=proc, log=log)
        _wait_for_discovery(provider)
        yield provider
    finally:
        if provider is not None:
            provider.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_discovery(provider: OIDCProvider) -> None:
    """The one polling wait here: the provider is another process that signals nothing when it is up."""
    deadline = time.monotonic() + START_TIMEOUT
    url = provider.url + "/.well-known/openid-configuration"
    while True:
        if provider.process.poll() is not None:
            raise RuntimeError(f"oidc-provider-mock exited with {provider.process.returncode}:\n{provider.output()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200 and json.loads(resp.read()).get("issuer") == provider.url:
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"oidc-provider-mock did not answer discovery within {START_TIMEOUT:g}s:\n{provider.output()}")
        time.sleep(0.1)


async def authorize(authorization_url: str, sub: str, *, timeout: float = 10.0) -> tuple[str, str]:
    """Sign in as `sub` on the provider's own authorize form, as a browser would: GET the page, POST the form's
    `sub` field to the same URL, and read `code` and `state` from the redirect (not followed). Returns them."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async with http.get(authorization_url) as page:
            text = await page.text()
            assert page.status == 200, f"authorize page answered {page.status}: {text[:500]}"
            assert 'name="sub"' in text, "the authorize page has no sub field"
        async with http.post(authorization_url, data={"sub": sub}, allow_redirects=False) as resp:
            body = await resp.text()
            assert resp.status == 302, f"authorize form answered {resp.status}: {body[:500]}"
            location = resp.headers["Location"]
    query = parse_qs(urlsplit(location).query)
    assert "code" in query, f"no code in the redirect: {location}"
    return query["code"][0], query["state"][0]


async def redeem(provider: OIDCProvider, code: str, redirect_uri: str, *, client_id: str, secret: str = "s3cret") -> dict[str, Any]:
    """The token endpoint's answer for `code`, fetched by the test itself (to get a raw ID token to tamper with)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.post(
            provider.url + "/oauth2/token",
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri},
            headers={"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()},
        ) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body
