"""The benchmark scripts run end to end (few steps; the figures themselves live in
benchmarks/README.md, never in asserts)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                         timeout=600, cwd=BENCHMARKS)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_overhead_prints_ratio_and_memory() -> None:
    out = run("overhead.py", "--steps", "4", "--warmup", "1", "--repeats", "1")
    assert re.search(r"overhead ratio\s+\d+\.\d{3}", out)
    assert out.count("peak RSS") == 2


@pytest.mark.slow
def test_vs_open_clip_prints_ratio() -> None:
    out = run("vs_open_clip.py", "--batch-size", "8", "--steps", "4", "--warmup", "1", "--repeats", "1")
    assert re.search(r"open_clip\s+\d+\.\d samples/s", out) and re.search(r"mmlightning\s+\d+\.\d samples/s", out)
    assert re.search(r"throughput ratio \(mmlightning / open_clip\) \d+\.\d{3}", out)


@pytest.mark.slow
def test_loss_scaling_table() -> None:
    out = run("loss_scaling.py", "--batch-sizes", "64", "--world-sizes", "1", "2", "--steps", "2")
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+64\s", line)]
    assert [(r[0], r[3], r[4]) for r in rows] == [("1", "True", "64x64"), ("2", "True", "64x128"),
                                                   ("2", "False", "128x128")]


@pytest.mark.slow
def test_decode_prints_ratio_and_paths() -> None:
    out = run("decode.py", "--images", "128", "--per-shard", "64", "--batch-size", "16", "--repeats", "1")
    assert re.search(r"open_clip\s+\d+\.\d images/s per worker", out)
    assert re.search(r"decode ratio \(mmlightning / open_clip\) \d+\.\d{3}", out)
    assert "PIL, draft (reduced DCT)" in out and "torchvision decode_jpeg" in out
