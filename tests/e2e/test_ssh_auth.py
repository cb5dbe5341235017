"""Who gets in: keys, certificates, unknown users, and the pre-auth limits."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Gateway, GatewayFactory
from tests.support.peers import KeyPair, make_key


def sign(ca: KeyPair, key: KeyPair, principal: str, workdir: Path) -> Path:
    """Copy `key` into workdir and sign it with `ca` for `principal`; returns the private key path
    (OpenSSH picks up PATH-cert.pub beside it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    dst = workdir / key.private.name
    shutil.copy(key.private, dst)
    dst.chmod(0o600)
    pub = workdir / (key.private.name + ".pub")
    pub.write_text(key.public + "\n")
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca.private), "-I", f"test-{principal}", "-n", principal, "-V", "-5m:+1h", str(pub)], check=True
    )
    assert (workdir / (key.private.name + "-cert.pub")).exists()
    return dst


async def test_unknown_user_is_denied_like_a_wrong_key(gw: Gateway) -> None:
    """A user not in the config gets the same 'Permission denied' as a wrong key, and it is logged."""
    r = await gw.ssh("mallory+web01", "true")
    assert r.rc == 255
    assert "Permission denied (publickey)" in r.errtext
    fails = gw.logs.events("auth_failed")
    assert fails and fails[0]["reason"] == "unknown_user"
    assert all("AAAA" not in str(e) for e in gw.logs.events())  # no key material in logs


async def test_wrong_key_is_denied(gw: Gateway) -> None:
    """alice presenting bob's key is refused."""
    r = await gw.run(*gw.ssh_argv_keys("alice+web01", gw.keys.bob.private), "true")
    assert r.rc == 255
    assert "Permission denied (publickey)" in r.errtext
    assert gw.logs.events("auth_failed")[0]["reason"] == "key_not_authorized"


async def test_certificate_from_trusted_ca_logs_in(gw: Gateway) -> None:
    """carol has no keys configured; a certificate for principal 'carol' from the trusted CA lets her in."""
    key = sign(gw.keys.ca, gw.keys.carol, "carol", gw.tmp / "certs")
    r = await gw.run(*gw.ssh_argv_keys("carol+web01", key), "echo cert-ok")
    assert r.rc == 0, r.errtext
    assert r.text == "cert-ok\n"
    ok = gw.logs.events("auth_succeeded")
    assert ok and ok[0]["method"] == "certificate" and ok[0]["user"] == "carol"


async def test_certificate_for_another_principal_is_refused(gw: Gateway) -> None:
    """A valid certificate naming 'alice' does not let its holder log in as carol."""
    key = sign(gw.keys.ca, gw.keys.carol, "alice", gw.tmp / "certs")
    r = await gw.run(*gw.ssh_argv_keys("carol+web01", key), "true")
    assert r.rc == 255
    assert "Permission denied" in r.errtext


async def test_certificate_from_untrusted_ca_is_refused(gw: Gateway) -> None:
    """A certificate signed by a CA the config does not trust is refused."""
    rogue = make_key(gw.tmp / "rogue_ca")
    key = sign(rogue, gw.keys.carol, "carol", gw.tmp / "certs")
    r = await gw.run(*gw.ssh_argv_keys("carol+web01", key), "true")
    assert r.rc == 255
    assert "Permission denied" in r.errtext


async def test_max_auth_tries_disconnects(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    """With max_auth_tries = 2, a client offering three wrong keys is cut off with a reason."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["ssh"]["max_auth_tries"] = 2

    wrong = [make_key(tmp_path / f"wrong{i}") for i in range(3)]
    async with make_gateway(edit) as gw:
        r = await gw.run(*gw.ssh_argv_keys("alice+web01", *(k.private for k in wrong)), "true")
        assert r.rc == 255
        assert "Too many authentication failures" in r.errtext
        assert len(gw.logs.events("auth_failed")) == 2
        assert gw.logs.events("auth_tries_exceeded")


async def hello(gw: Gateway, held: list[asyncio.StreamWriter]) -> bool:
    """Open an unauthenticated SSH connection that sends its version and then nothing; True if the gateway answered
    with its banner, False if it closed the connection at once (the writer is kept in `held` either way)."""
    r, w = await asyncio.open_connection("127.0.0.1", gw.port)
    w.write(b"SSH-2.0-held\r\n")
    held.append(w)
    async with asyncio.timeout(10):
        # Closed without a banner; with our hello unread the kernel may answer with a reset.
        with contextlib.suppress(ConnectionResetError):
            line = await r.readline()
            return line.startswith(b"SSH-2.0-Bastion")
    return False


async def test_max_startups_refuses_extra_unauthenticated_connections(make_gateway: GatewayFactory) -> None:
    """With max_startups = 2, two silent SSH clients are served and a third is closed at once."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["ssh"]["max_startups"] = 2

    async with make_gateway(edit) as gw:
        held: list[asyncio.StreamWriter] = []
        try:
            for _ in range(2):
                assert await hello(gw, held)
            assert not await hello(gw, held)
            assert [e for e in gw.logs.events("connection_refused") if e["reason"] == "max_startups"]
        finally:
            for w in held:
                w.close()


async def test_login_grace_time_closes_idle_unauthenticated_connections(make_gateway: GatewayFactory) -> None:
    """A client that never authenticates is dropped after login_grace_time."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["ssh"]["login_grace_time"] = "1s"

    async with make_gateway(edit) as gw:
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(b"SSH-2.0-idle\r\n")
        try:
            async with asyncio.timeout(15):
                assert (await r.readline()).startswith(b"SSH-2.0-Bastion")
                while await r.read(65536):
                    pass
        finally:
            w.close()


async def test_remote_forwarding_is_refused(gw: Gateway) -> None:
    """`ssh -R` asks the gateway to listen; no rule allows it, so it is refused."""
    r = await gw.run(*gw.ssh_argv("alice", "-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"), timeout=30)
    assert r.rc == 255
    assert "remote port forwarding failed" in r.errtext


async def test_one_source_cannot_hold_every_startup_slot(make_gateway: GatewayFactory) -> None:
    """per_source_max_startups = 2: a third silent connection from 127.0.0.1 is closed at once, while a real
    user from another loopback address still logs in; a flood of refusals is logged once, with a count."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["ssh"]["max_startups"] = "10:30:100"
        cfg["ssh"]["per_source_max_startups"] = 2

    async with make_gateway(edit) as gw:
        held: list[asyncio.StreamWriter] = []
        try:
            for _ in range(2):
                assert await hello(gw, held)
            for _ in range(5):
                assert not await hello(gw, held)
            ok = await gw.ssh("alice+web01", "echo from-elsewhere", opts=("-b", "127.0.0.2"))
            assert ok.rc == 0 and ok.text.strip() == "from-elsewhere", ok.errtext
            refused = [e for e in gw.logs.events("connection_refused") if e["reason"] == "per_source_max_startups"]
            assert 1 <= len(refused) < 5  # rate-limited: one line a second, saying how many it left out
        finally:
            for w in held:
                w.close()


async def test_ssh_offers_no_sha1_kex_or_mac_and_no_cbc(gw: Gateway) -> None:
    """Clients limited to SHA-1 key exchange, SHA-1 MACs or CBC ciphers find nothing in common; defaults log in."""
    for opt, words in (
        ("KexAlgorithms=diffie-hellman-group14-sha1", "no matching key exchange method"),
        ("MACs=hmac-sha1", "no matching MAC"),
        ("Ciphers=aes128-cbc", "no matching cipher"),
    ):
        r = await gw.ssh("alice+web01", "true", opts=("-o", opt, *(("-c", "aes128-ctr") if opt.startswith("MACs") else ())))
        assert r.rc == 255 and words in r.errtext, (opt, r.errtext)
    ok = await gw.ssh("alice+web01", "echo modern")
    assert ok.rc == 0 and ok.text.strip() == "modern"
