"""The benchmark scripts run end to end (few steps; the figures themselves live in
benchmarks/README.md, never in asserts)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
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
def test_gpu_report_runs_on_cpu_at_tiny_size() -> None:
    """The GPU report is known to work before a GPU is lent: every side on a CPU-sized CLIP
    (the plain variant: inductor on a CPU takes a minute per process, and gradient
    checkpointing of these towers is tested in test_components)."""
    out = run("gpu_report.py", "--tiny", "--device", "cpu", "--precision", "32-true", "--steps", "6", "--warmup", "2",
              "--variants", "plain")
    for side in ("mmlightning", "open_clip"):
        assert re.search(rf"mml-tiny-clip\s+plain\s+{side}\s+\d+\.\d\s+\d+\.\d\s+n/a\s+\d+", out), out
    assert re.search(r"forward \d+\.\d\d GFLOPs per sample", out)
    assert re.search(r"overhead ratio \(mmlightning / hand-written loop\), mml-tiny-clip plain: \d+\.\d{3}", out)
    assert "set_sync_debug_mode needs CUDA" in out


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
    assert re.search(r"parquet ratio \(parquet / shards, goal >= 0.9\) \d+\.\d{3}", out)
    assert re.search(r"csv ratio \(csv / shards, goal >= 0.9\) \d+\.\d{3}", out)


@pytest.mark.slow
def test_vqa_directions_splits_the_summary_families(tmp_path: Path) -> None:
    from tiny import SHAPES_VQA

    from mmlightning.build import build_datamodule, build_task
    from mmlightning.cli import main
    from mmlightning.config import load_recipe, resolve

    run_dir = tmp_path / "runs" / "v"
    assert main(["fit", "vqa-shapes", *SHAPES_VQA, "trainer.max_epochs=2", "logger.name=none", "run.name=v"]) == 0
    out = run("vqa_directions.py", str(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    # the checkpoint the run's own test used
    assert Path(re.search(r"checkpoint: (\S+)", out).group(1)).resolve() == Path(summary["best_checkpoint"]).resolve()
    rows = [line.strip("|").split("|") for line in out.splitlines() if re.match(r"\| \w+ \| (left|right|-) \|", line)]
    table = {(r[0].strip(), r[1].strip()): (float(r[2]), int(r[3])) for r in rows}
    # counted from the test split itself: each family and direction word, nothing mixed up
    cfg = resolve(load_recipe(run_dir / "config.yaml"))
    data = build_datamodule(cfg, build_task(cfg, load_pretrained=False))
    data.setup("test")
    test = data.datasets["test"]
    expected = Counter()
    for question, family in zip(test.questions, test.family.tolist()):
        words = question.split()
        expected[data.question_types[family], "left" if "left" in words else "right" if "right" in words else "-"] += 1
    assert {key: n for key, (_, n) in table.items()} == dict(expected)
    assert {d for (f, d) in table if f in ("relative_position", "neighbour_colour")} == {"left", "right"}
    # the directions add up to the family accuracy the run's own test reported (same batches, same precision)
    for family in ("relative_position", "neighbour_colour", "colour"):
        parts = [table[f, d] for f, d in table if f == family]
        n = sum(count for _, count in parts)
        assert sum(acc * count for acc, count in parts) / n == pytest.approx(summary["test"][f"test/acc_{family}"],
                                                                              abs=1e-3)


def test_few_shot_table(clip_checkpoint: Path) -> None:
    out = run("few_shot.py", "--data", "shapes", "--clip", str(clip_checkpoint), "--shots", "1", "2", "--draws", "2",
              "--steps", "2", "--cocoop-steps", "1", "--methods", "zero-shot", "linear probe", "CoOp", "--overrides",
              "data.num_train=480", "data.num_val=48", "data.num_test=96", "data.eval_batch_size=96")
    header, rule, *rows = [line for line in out.splitlines() if line.startswith("|")][:5]
    assert header == "| method | 1-shot | 2-shot |" and [r.split(" |")[0] for r in rows] == \
        ["| zero-shot", "| linear probe", "| CoOp"]
    assert all(" ± " in cell for cell in rows[2].split("|")[2:4])  # two draws: a mean and a spread
    assert "| CoCoOp |" in out and "harmonic mean" in out  # base-to-new runs CoOp and CoCoOp


@pytest.mark.slow
def test_formats_table(tmp_path: Path) -> None:
    out = run("formats.py", "--num-train", "96", "--num-val", "16", "--num-test", "16", "--epochs", "1",
              "--batch-size", "16", "--workers", "0", "--out", str(tmp_path), "--formats", "shapes", "parquet", "coco",
              "--overrides", "model.text.layers=1")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-3:]}
    assert set(rows) == {"shapes", "parquet", "coco"}
    assert rows["parquet"][3] == "6" and int(rows["coco"][3]) > 6  # coco's epoch is every caption


@pytest.mark.slow
def test_vlm_memory_table() -> None:
    out = run("vlm_memory.py", "--width", "64", "--layers", "1", "--batch-size", "2", "--steps", "2")
    rows = {line.split("  ")[0]: line for line in out.splitlines()
            if line.startswith(("full LM", "LoRA r=", "projector"))}
    assert len(rows) == 3 and all(row.count("MiB") == 2 for row in rows.values())
    assert re.search(r"LoRA / full: trained params 0\.\d{4}, optimizer state 0\.\d{4}, peak memory \d+\.\d{3}", out)
