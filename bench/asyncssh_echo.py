"""asyncssh's own cost per packet, with the gateway's patch (`gateway.protocols.asyncssh_fast`) of one source tree.

An asyncssh client and an echo server in one process (uvloop, `--cipher`, AES-GCM by default, 127.0.0.1), so that the figure is only
asyncssh and the patch, with no relay and no OpenSSH. One echo is four packets: the client sends, the server
receives and sends, the client receives. After a warm-up the bench measures the user and system CPU per one-byte
echo, and the user CPU per MB for 1 MiB writes echoed back. Each tree runs in its own process, alternating
(this tree, then every `--tree`, again and again). Compare the ratios from the same run.

Run: .venv/bin/python bench/asyncssh_echo.py [--rounds 3] [--echoes 10000] --tree base=/tmp/base
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "asyncssh_echo.json"


async def _measure(echoes: int, mb: int, cipher: str) -> dict[str, float]:
    import asyncssh  # in the child: the tree is first on its path

    from gateway.protocols import asyncssh_fast

    if not asyncssh_fast.apply():
        raise RuntimeError("asyncssh_fast did not apply")

    class Echo(asyncssh.SSHServerSession[bytes]):
        def connection_made(self, chan: Any) -> None:
            self._chan = chan

        def shell_requested(self) -> bool:
            return True

        def data_received(self, data: bytes, datatype: Any) -> None:
            self._chan.write(data)

        def eof_received(self) -> bool:
            self._chan.exit(0)
            return False

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return False

        def session_requested(self) -> Echo:
            return Echo()

    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(Server, "127.0.0.1", 0, server_host_keys=[key], encoding=None, keepalive_interval=30)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, known_hosts=None, username="u", client_keys=None, agent_path=None, config=None,
            encryption_algs=[cipher], preferred_auth="none", keepalive_interval=30,
        ) as conn:  # fmt: skip
            proc = await conn.create_process(encoding=None)
            async with asyncio.timeout(300):
                for _ in range(200):
                    proc.stdin.write(b"x")
                    await proc.stdout.readexactly(1)
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                for _ in range(echoes):
                    proc.stdin.write(b"x")
                    await proc.stdout.readexactly(1)
                r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                chunk = os.urandom(1 << 20)
                for _ in range(mb):
                    proc.stdin.write(chunk)
                    await proc.stdout.readexactly(len(chunk))
                r2 = resource.getrusage(resource.RUSAGE_SELF)
            proc.stdin.write_eof()
            await proc.wait()
    finally:
        server.close()
        await server.wait_closed()
    return {
        "echo_user_us": (r1.ru_utime - r0.ru_utime) / echoes * 1e6,
        "echo_sys_us": (r1.ru_stime - r0.ru_stime) / echoes * 1e6,
        "echo_wall_us": (t1 - t0) / echoes * 1e6,
        "bulk_user_ms_per_mb": (r2.ru_utime - r1.ru_utime) / (mb * 1.048576) * 1e3,
    }


def child(echoes: int, mb: int, cipher: str) -> int:
    import uvloop

    print(json.dumps(uvloop.run(_measure(echoes, mb, cipher))))
    return 0


def run_tree(tree: Path, echoes: int, mb: int, cipher: str) -> dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--echoes", str(echoes), "--mb", str(mb), "--cipher", cipher]
    out = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {out.stderr[-600:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="asyncssh CPU per echo and per MB with this tree's patch vs other trees.")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--echoes", type=int, default=10000)
    p.add_argument("--mb", type=int, default=50, help="MiB echoed back in 1 MiB writes")
    p.add_argument("--cipher", default="aes128-gcm@openssh.com", help="the connection's cipher (default aes128-gcm)")
    p.add_argument("--tree", action="append", default=[], help="NAME=PATH: another source tree to measure")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 50 or not 100 <= args.echoes <= 1_000_000 or not 1 <= args.mb <= 10_000:
        p.error("need 1 <= --rounds <= 50, 100 <= --echoes <= 1000000, 1 <= --mb <= 10000")
    if args.child:
        return child(args.echoes, args.mb, args.cipher)
    trees = [("gateway", REPO)] + [(n, Path(t).resolve()) for n, _, t in (x.partition("=") for x in args.tree)]
    results: dict[str, list[dict[str, float]]] = {n: [] for n, _ in trees}
    load = os.getloadavg()[0]
    print(f"asyncssh_echo: {args.cipher}, {args.echoes} echoes and {args.mb} MiB per round, {args.rounds} rounds, load {load:.2f}")
    for r in range(1, args.rounds + 1):
        for name, tree in trees:
            res = run_tree(tree, args.echoes, args.mb, args.cipher)
            results[name].append(res)
            print(f"  round {r} {name:<8} echo {res['echo_user_us']:6.1f} µs user {res['echo_sys_us']:5.1f} sys"
                  f" {res['echo_wall_us']:6.1f} wall | bulk {res['bulk_user_ms_per_mb']:.2f} ms user/MB")  # fmt: skip
    med = {n: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for n, rs in results.items()}
    print()
    for name, m in med.items():
        line = f"{name:<8} echo {m['echo_user_us']:.1f} µs user, {m['echo_wall_us']:.1f} µs wall"
        line += f" | bulk {m['bulk_user_ms_per_mb']:.2f} ms user/MB"
        if name != "gateway":
            g = med["gateway"]
            line += (
                f" | gateway/{name}: echo user {g['echo_user_us'] / m['echo_user_us']:.2f}x,"
                f" bulk user {g['bulk_user_ms_per_mb'] / m['bulk_user_ms_per_mb']:.2f}x"
            )
        print(line)
    print(f"load at end {os.getloadavg()[0]:.2f}")
    g = med["gateway"]
    others = [n for n in med if n != "gateway"]
    base = f"tree {others[0]} " if others else "no baseline (a diagnostic)"
    rows = [
        {"path": "asyncssh alone, user CPU per echo (µs)", "gateway": f"{g['echo_user_us']:.1f}",
         "baseline": base + (f"{med[others[0]]['echo_user_us']:.1f}" if others else ""),
         "ratio": f"{g['echo_user_us'] / med[others[0]]['echo_user_us']:.2f}" if others else "-"},
        {"path": "asyncssh alone, user CPU per MB (ms)", "gateway": f"{g['bulk_user_ms_per_mb']:.2f}",
         "baseline": base + (f"{med[others[0]]['bulk_user_ms_per_mb']:.2f}" if others else ""),
         "ratio": f"{g['bulk_user_ms_per_mb'] / med[others[0]]['bulk_user_ms_per_mb']:.2f}" if others else "-"},
    ]  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"timestamp": datetime.now(UTC).isoformat(timespec="seconds"), "medians": med, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
