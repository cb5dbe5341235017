"""`bastion login`: an identity-provider user with no key registered anywhere signs in once (the test drives the
browser step) and then uses plain OpenSSH `ssh`, `scp` and `ssh -W` (the jump path) with the gateway's short-lived
certificate, through the gateway to a real sshd; `bastion logout` removes it."""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import Gateway, GatewayFactory, wait_for
from tests.e2e.test_web_oidc import sign_in, with_oidc
from tests.support.oidc import OIDCProvider, running_oidc_provider


@pytest.fixture(scope="module")
def provider() -> Iterator[OIDCProvider]:
    with running_oidc_provider({"zoe-sub": {"preferred_username": "zoe", "groups": ["idp-ops"]}}) as p:
        yield p


@pytest.fixture
async def oidc_gw(make_gateway: GatewayFactory, provider: OIDCProvider, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with make_gateway(with_oidc(provider, tmp_path)) as gw:
        await wait_for(lambda: bool(gw.logs.events("oidc_ready")), gw.logs.changed, timeout=30)
        yield gw


async def bastion_login(gw: Gateway, home: Path) -> tuple[int, str, str]:
    """`bastion login --no-browser` as zoe, the browser step driven here (signed in at the provider, code approved)."""
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "login", "--gateway", f"127.0.0.1:{gw.port}", "--ca-file", str(gw.ca_file),
        "--no-browser", "--dir", str(home),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            first = (await proc.stdout.readline()).decode()
            second = (await proc.stdout.readline()).decode()
        url = first.removeprefix("Open ").strip()
        code = re.search(r"approve the code ([A-Z]{4}-[A-Z]{4})", second)
        assert url.startswith(f"https://127.0.0.1:{gw.port}/cli?id=") and code, (first, second)
        login_id = url.split("id=", 1)[1]
        base = f"https://127.0.0.1:{gw.port}"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await sign_in(gw, http, ctx, "zoe-sub")
            async with http.get(url, ssl=ctx) as page:
                assert page.status == 200 and "Approve" in await page.text()
            headers = {"Origin": base}
            async with http.post(base + "/api/cli/approve", json={"id": login_id, "code": "WRON-GCOD"}, headers=headers, ssl=ctx) as r:
                assert r.status == 403
            async with http.post(base + "/api/cli/approve", json={"id": login_id, "code": code.group(1)}, headers=headers, ssl=ctx) as r:
                assert r.status == 204, await r.text()
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


SSH_OPTS = ("-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes")
HOST = "bastion-127.0.0.1"  # the alias the snippet defines; known_hosts names the gateway as [127.0.0.1]:PORT


async def test_login_then_plain_ssh_scp_and_jump_with_the_certificate(oidc_gw: Gateway, tmp_path: Path) -> None:
    """zoe runs `bastion login --no-browser`, approves its code in a browser session signed in at the provider, and gets a
    certificate for `zoe`; with only the written ssh_config she runs a command on web01, copies a file there (scp),
    lists it (sftp), and reaches the VM's SSH port by the jump path; the audit says certificate; `bastion logout` removes the files."""
    gw = oidc_gw
    home = tmp_path / "zoe"
    rc, out, err = await bastion_login(gw, home)
    assert rc == 0, err
    assert "Signed in as zoe" in out
    cfg = home / "ssh_config"
    assert "-cert-v01@openssh.com" in (home / "id_ed25519-cert.pub").read_text()
    assert (home / "id_ed25519").stat().st_mode & 0o077 == 0
    opts = ("-o", f"UserKnownHostsFile={gw.tmp / 'known_hosts'}", *SSH_OPTS)
    host = HOST
    r = await gw.run("ssh", "-F", str(cfg), *opts, f"zoe+web01@{host}", "echo", "cert-ok")
    assert r.rc == 0 and r.text.strip() == "cert-ok", r.errtext
    src = tmp_path / "payload.txt"
    src.write_text("copied with a certificate\n")
    copied = tmp_path / "bastion-cert-copy.txt"  # the test VM is this machine: the copy lands in the test's own dir
    r = await gw.run("scp", "-F", str(cfg), *opts, str(src), f"zoe+web01@{host}:{copied}")
    assert r.rc == 0, r.errtext
    assert copied.read_text() == "copied with a certificate\n"
    r = await gw.run("sftp", "-F", str(cfg), *opts, "-b", "-", f"zoe+web01@{host}", stdin=f"ls {copied}\n".encode())
    assert r.rc == 0 and "bastion-cert-copy.txt" in r.text, r.errtext
    r = await gw.run("ssh", "-F", str(cfg), *opts, "-W", f"web01:{gw.vm.port}", f"zoe@{host}", stdin=b"", timeout=20)
    assert r.out.startswith(b"SSH-2.0-OpenSSH"), (r.out[:100], r.errtext)
    methods = {e["method"] for e in gw.logs.events("auth_succeeded") if e["user"] == "zoe"}
    assert methods == {"certificate"}
    [issued] = gw.logs.events("certificate_issued")
    assert (issued["user"], issued["method"]) == ("zoe", "oidc")
    r = await gw.run(sys.executable, "-m", "gateway", "logout", "--dir", str(home))
    assert r.rc == 0 and not (home / "id_ed25519-cert.pub").exists() and not cfg.exists()


async def test_a_login_nobody_approved_expires_and_a_stranger_gets_nothing(oidc_gw: Gateway) -> None:
    """Polling a made-up id is 404; starting needs a real public key; approving needs a signed-in browser."""
    gw = oidc_gw
    ctx = ssl.create_default_context(cafile=str(gw.ca_file))
    base = f"https://127.0.0.1:{gw.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/api/cli/poll", params={"id": "made-up"}, ssl=ctx) as r:
            assert r.status == 404
        async with http.post(base + "/api/cli/start", json={"public_key": "not a key"}, ssl=ctx) as r:
            assert r.status == 400 and "not an OpenSSH public key" in (await r.json())["message"]
        async with http.post(base + "/api/cli/approve", json={"id": "x", "code": "x"}, headers={"Origin": base}, ssl=ctx) as r:
            assert r.status == 401
    assert not gw.logs.events("certificate_issued")


async def test_an_expired_certificate_is_refused_with_what_to_do(
    make_gateway: GatewayFactory, provider: OIDCProvider, tmp_path: Path
) -> None:
    """With ca.certificate_lifetime = 2s, once the certificate has expired the gateway refuses it and ssh shows
    "run `bastion login --gateway ...`" (an SSH auth banner) instead of a bare "Permission denied"."""

    def edit(cfg: dict[str, Any]) -> None:
        with_oidc(provider, tmp_path)(cfg)
        cfg["ca"] = {"certificate_lifetime": "2s"}

    async with make_gateway(edit) as gw:
        await wait_for(lambda: bool(gw.logs.events("oidc_ready")), gw.logs.changed, timeout=30)
        home = tmp_path / "zoe"
        rc, _, err = await bastion_login(gw, home)
        assert rc == 0, err
        await asyncio.sleep(3)  # the certificate's own validity (wall-clock seconds) has to pass: nothing to wait on
        r = await gw.run("ssh", "-F", str(home / "ssh_config"), "-o", f"UserKnownHostsFile={gw.tmp / 'known_hosts'}", *SSH_OPTS,
                         f"zoe+web01@{HOST}", "true")  # fmt: skip
        assert r.rc == 255 and f"run `bastion login --gateway 127.0.0.1:{gw.port}`" in r.errtext, r.errtext
