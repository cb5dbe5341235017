"""VM host keys from a known_hosts file, and trust on first use only where asked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.protocols import upstream_ssh
from tests.e2e.conftest import GatewayFactory


def add_known_hosts_vm(kh: Path, key_of_vm: int) -> Callable[[dict[str, Any]], None]:
    """Add VM `khvm` (web01's sshd) verified by `kh`, which holds the inventory key of vms[key_of_vm]."""

    def edit(cfg: dict[str, Any]) -> None:
        vm0 = cfg["vms"][0]
        kh.write_text(f"[{vm0['address']}]:{vm0['ssh_port']} {cfg['vms'][key_of_vm]['host_key']}\n")
        entry = {k: v for k, v in vm0.items() if k != "host_key"} | {"name": "khvm", "known_hosts": str(kh)}
        cfg["vms"].append(entry)
        cfg["rules"][0]["vms"].append("khvm")

    return edit


async def test_known_hosts_file_verifies_the_vm(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    """A VM whose key is in the configured known_hosts file (by address and port) is reached."""
    kh = tmp_path / "vm_known_hosts"

    async with make_gateway(add_known_hosts_vm(kh, key_of_vm=0)) as gw:
        r = await gw.ssh("alice+khvm", "echo verified-by-known-hosts")
        assert r.rc == 0, r.errtext
        assert r.text == "verified-by-known-hosts\n"


async def test_known_hosts_file_with_another_key_refuses(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    """A known_hosts entry with a different key for the VM refuses the session."""
    kh = tmp_path / "vm_known_hosts"

    async with make_gateway(add_known_hosts_vm(kh, key_of_vm=2)) as gw:  # bad01's key is not the VM's
        r = await gw.ssh("alice+khvm", "echo should-not-run")
        assert r.rc == 255
        assert "identity of VM 'khvm' could not be verified" in r.errtext


async def test_trust_on_first_use_keeps_the_first_key_and_refuses_a_change(make_gateway: GatewayFactory) -> None:
    """With trust_on_first_use the first key is learned (and logged); a different key later is refused."""

    def edit(cfg: dict[str, Any]) -> None:
        vm0 = cfg["vms"][0]
        entry = {k: v for k, v in vm0.items() if k != "host_key"} | {"name": "tofu01", "trust_on_first_use": True}
        cfg["vms"].append(entry)
        cfg["rules"][0]["vms"].append("tofu01")

    async with make_gateway(edit) as gw:
        first = await gw.ssh("alice+tofu01", "echo first-use")
        assert first.rc == 0, first.errtext
        learned = gw.logs.events("upstream_host_key_trusted_first_use")
        assert learned and learned[0]["vm"] == "tofu01" and learned[0]["level"] == "warning"
        tofu_file = gw.tmp / "state" / "known_hosts_tofu"
        assert tofu_file.read_text().split()[1:3] == gw.vm.host_key.public.split()[:2]
        again = await gw.ssh("alice+tofu01", "echo second-use")
        assert again.rc == 0, again.errtext
        # Pretend the VM's key changed: the learned key no longer matches.
        tofu_file.write_text(f"tofu01 {gw.keys.stranger.public}\n")

    async with make_gateway(edit) as gw:
        r = await gw.ssh("alice+tofu01", "echo should-not-run")
        assert r.rc == 255
        assert "identity of VM 'tofu01' could not be verified" in r.errtext


async def test_a_known_hosts_change_applies_to_the_next_session(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    """The prepared VM login options are shared by that login's sessions, but only for the same trusted keys: once
    the known_hosts file holds another key, the next session to the same VM is refused."""
    kh = tmp_path / "vm_known_hosts"

    async with make_gateway(add_known_hosts_vm(kh, key_of_vm=0)) as gw:
        for _ in range(2):
            r = await gw.ssh("alice+khvm", "echo verified-by-known-hosts")
            assert r.rc == 0, r.errtext
        host = kh.read_text().split(" ", 1)[0]
        kh.write_text(f"{host} {gw.keys.stranger.public}\n")
        r = await gw.ssh("alice+khvm", "echo should-not-run")
        assert r.rc == 255
        assert "identity of VM 'khvm' could not be verified" in r.errtext


async def test_a_known_hosts_file_edited_in_place_counts_from_the_next_login(
    make_gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway keeps a parsed known_hosts file between logins; an edit in place to the same size (another key,
    then the right one back) decides the very next login, with no reload."""
    monkeypatch.setattr(upstream_ssh, "_SETTLED_NS", 0)  # keep even a file written a moment ago
    kh = tmp_path / "vm_known_hosts"

    async with make_gateway(add_known_hosts_vm(kh, key_of_vm=0)) as gw:
        vm0 = gw.raw["vms"][0]
        good, old = (f"[{vm0['address']}]:{vm0['ssh_port']} {' '.join(gw.raw['vms'][i]['host_key'].split()[:2])}\n" for i in (0, 2))
        assert len(old) == len(good) and old != good
        kh.write_text(good)
        assert (await gw.ssh("alice+khvm", "echo one")).rc == 0
        assert (await gw.ssh("alice+khvm", "echo two")).text == "two\n"  # a login that read the file as it was
        kh.write_text(old)
        r = await gw.ssh("alice+khvm", "echo should-not-run")
        assert r.rc == 255
        assert "identity of VM 'khvm' could not be verified" in r.errtext
        kh.write_text(good)
        r = await gw.ssh("alice+khvm", "echo back")
        assert r.rc == 0, r.errtext
        assert r.text == "back\n"
