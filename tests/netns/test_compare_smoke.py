"""The comparison benchmark runs end to end (a small version: this checks it works, not its
numbers): every mode answers, the table and the PNG plots are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns


def test_compare_benchmark_small(tmp_path: Path, topo):  # topo: skips/fails like the other netns tests
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--sizes", "1,20", "--requests", "60", "--concurrency", "4",
         "--bulk-seconds", "1", "--seconds", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert {(r["mode"], r["services"]) for r in rows} == {
        (m, n) for m in ("nftables", "iptables", "userspace") for n in (1, 20)}
    for r in rows:
        assert r["errors"] == 0 and r["requests"] > 0, r
        assert r["rps"] > 0 and r["mb_per_s"] > 0
    userspace = [r for r in rows if r["mode"] == "userspace"]
    assert all(r["cpu_s"] > 0 for r in userspace)  # it copies the bytes itself
    for name in ("compare-rps.png", "compare-latency-p99.png", "compare-throughput.png", "compare-cpu.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert "| userspace |" in (tmp_path / "compare.md").read_text()
