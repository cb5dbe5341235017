"""One table from every benchmark's results (bench/results/*.json): each path against its baseline, from the
same run of that benchmark, with medians, the spread of the samples and the ratio; and the load average before
and after the whole `make bench` run (bench/results/load.json, written by the Makefile around it).

Run: .venv/bin/python bench/summary.py [--results DIR] [--load-start] [--load-end]

It only reads what the benchmarks wrote: a benchmark that did not run is named as missing, never guessed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
Row = tuple[str, str, str, str, str]  # path, gateway, baseline (name: value), ratio, when


def _spread(samples: list[float]) -> str:
    return f" ({min(samples):.0f}-{max(samples):.0f})" if len(samples) > 1 else ""


def _ssh_forward(d: dict[str, Any]) -> list[Row]:
    med, s = d["median_mb_per_s"], d["samples_mb_per_s"]
    return [
        (
            "ssh -L bulk, jump mode (MB/s)",
            f"{med['gateway']:.0f}{_spread(s['gateway'])}",
            f"sshd {med['sshd']:.0f}{_spread(s['sshd'])}",
            f"{med['gateway'] / med['sshd']:.2f}",
            d["timestamp"],
        )
    ]


def _tunnel(d: dict[str, Any]) -> list[Row]:
    med, s = d["median_mb_per_s"], d["samples_mb_per_s"]
    rows = [
        (
            "bastion tunnel bulk (MB/s)",
            f"{med['tunnel']:.0f}{_spread(s['tunnel'])}",
            f"direct TCP {med['direct']:.0f}{_spread(s['direct'])}",
            f"{med['tunnel'] / med['direct']:.2f}",
            d["timestamp"],
        )
    ]
    for other, label in (("ssh-L", "ssh -L"), ("haproxy", "haproxy TCP"), ("haproxy-tls", "haproxy TLS hop")):
        if other in med:
            rows.append(("  same", "", f"{label} {med[other]:.0f}{_spread(s[other])}", f"{med['tunnel'] / med[other]:.2f}", ""))
    conns = d.get("median_conns_per_s") or {}
    for other, label in (("haproxy", "haproxy TCP"), ("haproxy-tls", "haproxy TLS hop")):
        if "tunnel" in conns and other in conns:
            rows.append(
                (
                    "bastion tunnel new connections (/s)",
                    f"{conns['tunnel']:.0f}",
                    f"{label} {conns[other]:.0f}",
                    f"{conns['tunnel'] / conns[other]:.2f}",
                    "",
                )
            )
    return rows


def _rdg(d: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for r in d["table"]:
        if r["path"] in ("rdg-ws", "rdg-http"):
            what = f"RD Gateway {r['path'][4:]} {r['direction']} (MB/s)"  # echo: bulk both ways at once
            rows.append((what, f"{r['median_mb_s']:.0f}", "bastion tunnel", f"{r['x_tunnel']:.2f}", d["timestamp"]))
    return rows


def _cluster(d: dict[str, Any]) -> list[Row]:
    a, b = d["a"], d["b"]
    return [
        (
            f"GET /v1/sessions, {a['sessions']} sessions (ms)",
            f"3 nodes {b['list_median_s'] * 1000:.1f}",
            f"1 node {a['list_median_s'] * 1000:.1f}",
            f"{b['list_median_s'] / a['list_median_s']:.2f}",
            d["timestamp"],
        ),
        (
            f"bulk disconnect of {a['sessions']} (s)",
            f"3 nodes {b['disconnect']['seconds']:.2f}",
            f"1 node {a['disconnect']['seconds']:.2f}",
            f"{b['disconnect']['seconds'] / a['disconnect']['seconds']:.2f}",
            "",
        ),
    ]


def _ssh_terminate(d: dict[str, Any]) -> list[Row]:
    gw, hop = d["gateway"], d["hop"]
    when = d.get("timestamp", "")
    rows: list[Row] = []
    for key, label, unit in (("up", "upload", "MB/s"), ("down", "download", "MB/s")):
        g, h = gw[key], hop[key]
        rows.append(
            (
                f"terminating SSH {label} ({unit})",
                f"{statistics.median(g):.0f}{_spread(g)}",
                f"OpenSSH hop {statistics.median(h):.0f}{_spread(h)}",
                f"{gw['ratios_vs_hop'][key]:.2f}",
                when,
            )
        )
        when = ""
    for key, label in (("cpu_up_ms_per_mb", "CPU ms per MB up"), ("cpu_down_ms_per_mb", "CPU ms per MB down")):
        g, h = statistics.median(gw[key]), statistics.median(hop[key])
        rows.append((f"terminating SSH {label}", f"{g:.2f}", f"OpenSSH hop {h:.2f}", f"{g / h:.2f}", ""))
    g50, h50 = statistics.median(gw["p50_us"]), statistics.median(hop["p50_us"])
    rows.append(
        ("terminating SSH echo RTT p50 (µs)", f"{g50:.0f}{_spread(gw['p50_us'])}", f"OpenSSH hop {h50:.0f}", f"{g50 / h50:.2f}", "")
    )
    return rows


def _scale(d: dict[str, Any]) -> list[Row]:
    """bench/scale.py: one row per size and measure of the last tree (no baseline but its targets: a ratio of '-')."""
    rows: list[Row] = []
    by_n: dict[int, list[dict[str, Any]]] = {}
    labels = list(dict.fromkeys(r["src"] for r in d["rows"]))  # in --src order (rounds alternate it)
    last = labels[-1]
    for r in d["rows"]:
        if r["src"] == last:
            by_n.setdefault(int(r["n"]), []).append(r)
    for n, mine in sorted(by_n.items()):
        for key, label, goal in (
            ("jump_kib_per_session", "KiB per idle jump session", "goal 16"),
            ("ws_kib_per_session", "KiB per idle tunnel", "goal 8"),
            ("term_kib_per_session", "KiB per idle terminating session", "goal 64"),
            ("list_p50_ms", "GET /v1/sessions p50 ms", "goal 50 at 9,000"),
            ("rtt_during_lists_max_ms", "relay RTT max during lists ms", "goal 20"),
            ("bulk_disconnect_s", "bulk disconnect of 1,000 s", "goal 2"),
        ):
            values = [float(r[key]) for r in mine if key in r]
            if values:
                tree = f" ({last})" if len(labels) > 1 else ""
                rows.append((f"at {n} sessions: {label}{tree}", f"{statistics.median(values):.1f}", goal, "-", d.get("when", "")[:19]))
    return rows


def _floods(d: dict[str, Any]) -> list[Row]:
    """bench/floods.py: logins during each flood against logins with none, in the same run."""
    phases = d["phases"]
    base = statistics.median(phases[0]["login_seconds"])
    rows: list[Row] = []
    for ph in phases[1:]:
        n, ok = len(ph["login_seconds"]) + ph["failed"], len(ph["login_seconds"])
        med = statistics.median(ph["login_seconds"]) if ph["login_seconds"] else float("nan")
        rows.append(
            (
                f"SSH login during flood '{ph['name']}' (s)",
                f"{med:.2f}, {ok}/{n} logged in",
                f"no flood {base:.2f}",
                f"{med / base:.2f}",
                "",
            )
        )
    if rows:
        rows[0] = (*rows[0][:4], d.get("timestamp", ""))
    return rows


def _workers(d: dict[str, Any]) -> list[Row]:
    """bench/workers.py: per worker count, logins/s against sshd direct and the hop, aggregate upload and CPU per MB
    against the hop; and each count against one worker, all from the same rounds."""
    direct, hop = d["baselines"]["direct"], d["baselines"]["hop"]
    gws = {int(n): g for n, g in d["gateway"].items()}
    m = statistics.median
    streams = d.get("streams", "")
    rows: list[Row] = []
    for n, g in sorted(gws.items()):
        w = f"{n} worker{'s' if n != 1 else ''}"
        lps, up, cpu = g["logins_per_s"], g["mb_per_s"], g["cpu_ms_per_mb"]
        rows += [
            (f"terminating SSH logins/s, {w}", f"{m(lps):.0f}{_spread(lps)}", f"sshd direct {m(direct['logins_per_s']):.0f}",
             f"{m(lps) / m(direct['logins_per_s']):.2f}", ""),
            ("  same", "", f"OpenSSH hop {m(hop['logins_per_s']):.0f}", f"{m(lps) / m(hop['logins_per_s']):.2f}", ""),
            (f"terminating SSH upload, {streams} streams, {w} (MB/s)", f"{m(up):.0f}{_spread(up)}",
             f"OpenSSH hop {m(hop['mb_per_s']):.0f}", f"{m(up) / m(hop['mb_per_s']):.2f}", ""),
            (f"  CPU ms per MB, {w}", f"{m(cpu):.2f}", f"OpenSSH hop {m(hop['cpu_ms_per_mb']):.2f}",
             f"{m(cpu) / m(hop['cpu_ms_per_mb']):.2f}", ""),
        ]  # fmt: skip
    if 1 in gws:
        one = gws[1]
        for n, g in sorted(gws.items()):
            for key, what in (("logins_per_s", "logins/s"), ("mb_per_s", "upload MB/s")):
                if n != 1:
                    mine, base = m(g[key]), m(one[key])
                    rows.append((f"{what}, {n} workers vs 1", f"{n} workers {mine:.0f}", f"1 worker {base:.0f}", f"{mine / base:.2f}", ""))
    if rows:
        rows[0] = (*rows[0][:4], d.get("timestamp", ""))
    return rows


def _generic(d: dict[str, Any]) -> list[Row]:
    """A benchmark that writes its own `rows`: [{path, gateway, baseline, ratio}]."""
    return [(str(r["path"]), str(r["gateway"]), str(r["baseline"]), str(r["ratio"]), d.get("timestamp", "")) for r in d.get("rows", [])]


EXTRACT: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "ssh_forward": _ssh_forward,
    "tunnel": _tunnel,
    "rdg": _rdg,
    "cluster": _cluster,
    "ssh_terminate": _ssh_terminate,
    "scale": _scale,
    "floods": _floods,
    "workers": _workers,
}


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def table(results: Path) -> str:
    rows: list[Row] = []
    missing: list[str] = []
    for bench in sorted(p.stem for p in Path(__file__).resolve().parent.glob("*.py") if p.stem != "summary"):
        f = results / f"{bench}.json"
        if not f.exists():
            missing.append(bench)
            continue
        d = json.loads(f.read_text())
        try:
            rows.extend(EXTRACT.get(bench, _generic)(d))
        except (KeyError, TypeError, ZeroDivisionError) as exc:
            rows.append((f"{bench}: results not in the expected shape ({type(exc).__name__}: {exc})", "", "", "", ""))
    header: Row = ("path", "gateway", "baseline (same run)", "ratio", "measured at")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    load = results / "load.json"
    if load.exists():
        ld = json.loads(load.read_text())
        lines.append(f"\nload average (1, 5, 15 min): before {ld.get('start')}, after {ld.get('end')}; {os.cpu_count()} cores")
    if missing:
        lines.append(f"not run: {', '.join(missing)}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--load-start", action="store_true", help="record the load average before a run (the Makefile does)")
    ap.add_argument("--load-end", action="store_true", help="record the load average after a run")
    args = ap.parse_args()
    load = args.results / "load.json"
    if args.load_start or args.load_end:
        args.results.mkdir(parents=True, exist_ok=True)
        data = json.loads(load.read_text()) if load.exists() and args.load_end else {}
        data["start" if args.load_start else "end"] = _loadavg()
        load.write_text(json.dumps(data) + "\n")
        return 0
    print(table(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
