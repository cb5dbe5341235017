"""bench/summary.py: one table from the benchmarks' own results files, naming what did not run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _summary() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "bench" / "summary.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_summary"] = module
    spec.loader.exec_module(module)
    return module


def test_the_table_reads_each_results_file_and_names_the_missing(tmp_path: Path) -> None:
    """A results dir with ssh_forward, floods, ssh_terminate and scale gives their rows and ratios; the others are 'not run';
    a file in another shape is reported as such, not guessed."""
    (tmp_path / "ssh_forward.json").write_text(
        json.dumps(
            {
                "timestamp": "T1",
                "median_mb_per_s": {"gateway": 300.0, "sshd": 400.0},
                "samples_mb_per_s": {"gateway": [250.0, 300.0, 350.0], "sshd": [390.0, 400.0, 410.0]},
            }
        )
    )
    phases = [{"name": "no flood", "login_seconds": [0.2, 0.2], "failed": 0}, {"name": "silent", "login_seconds": [0.3], "failed": 1}]
    (tmp_path / "floods.json").write_text(json.dumps({"timestamp": "T2", "phases": phases}))
    (tmp_path / "tunnel.json").write_text(json.dumps({"timestamp": "T3"}))
    side = {"up": [100.0], "down": [90.0], "cpu_up_ms_per_mb": [3.0], "cpu_down_ms_per_mb": [3.0], "p50_us": [200.0]}
    ratios = {"up": 1.25, "down": 0.9}
    hop = {**side, "up": [80.0], "down": [100.0], "p50_us": [100.0]}
    (tmp_path / "ssh_terminate.json").write_text(json.dumps({"gateway": {**side, "ratios_vs_hop": ratios}, "hop": hop}))
    two_trees = [{"n": 1000, "src": s, "list_p50_ms": v} for s, v in (("old", 50.0), ("new", 20.0), ("new", 24.0), ("old", 52.0))]
    (tmp_path / "scale.json").write_text(json.dumps({"when": "T4", "rows": two_trees}))
    out = _summary().table(tmp_path)
    assert "| ssh -L bulk, jump mode (MB/s)" in out and "300 (250-350)" in out and "sshd 400 (390-410)" in out and "| 0.75 " in out
    [flood] = [x for x in out.splitlines() if "flood 'silent'" in x]
    assert "0.30, 1/2 logged in" in flood and "no flood 0.20" in flood and "| 1.50 " in flood
    assert "tunnel: results not in the expected shape (KeyError" in out
    assert "| terminating SSH upload (MB/s)" in out and "OpenSSH hop 80" in out and "| 1.25 " in out
    assert "| terminating SSH echo RTT p50 (µs)" in out and "| 2.00 " in out
    [line] = [x for x in out.splitlines() if "at 1000 sessions: GET /v1/sessions p50 ms (new)" in x]
    assert line.split("|")[2].strip() == "22.0"  # the last --src tree, its median
    assert "not run: " in out and "cluster" in out.split("not run: ")[1]


def test_the_workers_rows_compare_each_count_with_the_baselines_and_with_one_worker(tmp_path: Path) -> None:
    """bench/workers.py's results give, per worker count, logins/s against sshd direct and the hop, upload and CPU per
    MB against the hop, and each count over one worker's, from the medians of the same rounds."""
    baselines = {
        "direct": {"logins_per_s": [30.0, 40.0, 50.0]},
        "hop": {"logins_per_s": [20.0], "mb_per_s": [100.0], "cpu_ms_per_mb": [8.0]},
    }
    gateway = {
        "1": {"logins_per_s": [20.0, 30.0, 40.0], "mb_per_s": [150.0], "cpu_ms_per_mb": [4.0]},
        "2": {"logins_per_s": [45.0], "mb_per_s": [120.0], "cpu_ms_per_mb": [6.0]},
    }
    doc = {"timestamp": "T5", "streams": 4, "baselines": baselines, "gateway": gateway}
    (tmp_path / "workers.json").write_text(json.dumps(doc))
    lines = _summary().table(tmp_path).splitlines()

    def row(path: str) -> list[str]:
        [line] = [x for x in lines if x.startswith(f"| {path} ")]
        return [c.strip() for c in line.split("|")[2:-1]]  # the cells after the path

    assert row("terminating SSH logins/s, 1 worker") == ["30 (20-40)", "sshd direct 40", "0.75", "T5"]
    assert row("terminating SSH upload, 4 streams, 2 workers (MB/s)")[:3] == ["120", "OpenSSH hop 100", "1.20"]
    assert row("  CPU ms per MB, 2 workers")[:3] == ["6.00", "OpenSSH hop 8.00", "0.75"]
    assert row("logins/s, 2 workers vs 1")[:3] == ["2 workers 45", "1 worker 30", "1.50"]
    assert row("upload MB/s, 2 workers vs 1")[2] == "0.80"
    assert not [x for x in lines if "logins/s, 1 workers vs 1" in x or "1 worker vs 1" in x]
