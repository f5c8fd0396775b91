"""A run is an artifact: every command reads the run's own config, the CSV log survives resume,
and mistakes are caught before anything is created. Fits run as real `mml` processes; the
commands that read a run go through main() in this process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image
from test_export import tiny_hf_text
from tiny import SHAPES_CLIP

from mmlightning.build import warn_about_cpu_processes

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def mml(cwd: Path, *args: str, code: int = 0) -> str:
    out = subprocess.run([sys.executable, "-m", "mmlightning.cli", *args], cwd=cwd, capture_output=True, text=True,
                         env=ENV, timeout=600)
    assert out.returncode == code, f"mml {' '.join(args)} -> {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr
    return out.stdout + out.stderr


def mml_here(capsys: pytest.CaptureFixture, *args: str, code: int = 0) -> str:
    """The same command through main() in this process (cwd set by the caller): no ~10 s of
    imports per command. The fits stay real processes, for what a terminal shows."""
    from mmlightning.cli import main

    assert main(list(args)) == code
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return out.out + out.err


def metric_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return sorted({int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")})


@pytest.mark.slow
def test_a_new_user_comes_back_to_a_run_by_its_directory_alone(tmp_path: Path, minilm_dir: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Train with two overrides the packaged recipe does not have (towers open_clip can hold),
    then test, eval, predict and export from the run directory alone; resume keeps the log,
    and a finished run is left alone."""
    run = "runs/mine"
    tower = "model.vision={name: 'timm:resnet18', img_size: 64, crop_pct: 1.0}"  # evaluated as open_clip does
    fitted = mml(tmp_path, "fit", "clip-shapes", *SHAPES_CLIP, tower,
                 *tiny_hf_text(minilm_dir), "run.name=mine", "logger.name=csv")
    # stdout is a pipe here, as in a log file: plain progress lines, and validation metrics per epoch
    assert "epoch 1/1 batch" in fitted and "samples/s" in fitted and "validation, epoch 1: i2t_R@1" in fitted
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    tested = mml_here(capsys, "test", run)
    assert "test/i2t_R@1" in tested
    # the packaged recipe builds another model: a recipe given with the run must match it
    refused = mml_here(capsys, "test", "clip-shapes", "--ckpt", run, code=2)
    assert "was built otherwise than recipe 'clip-shapes' (model.text." in refused and f"mml test {run}" in refused
    assert "Retrieval" in mml_here(capsys, "eval", run, "--shots", "1", "--seeds", "1")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), (200, 20, 20)).save(tmp_path / "images" / "red.png")
    predicted = mml_here(capsys, "predict", run, "--images", "images")
    assert predicted.startswith("red.png\t") or "\nred.png\t" in predicted
    assert "wrote" in mml_here(capsys, "export", run, "--format", "open_clip", "--out", "exported")
    assert "not an empty folder" in mml_here(capsys, "export", run, "--format", "hf", "--out", "exported", code=2)

    first = metric_steps(tmp_path / run)
    assert "finished already" in mml_here(capsys, "fit", "clip-shapes", "--resume", run)
    assert metric_steps(tmp_path / run) == first  # nothing trained again
    mml(tmp_path, "fit", "clip-shapes", "--resume", run, "trainer.max_epochs=2")
    steps = metric_steps(tmp_path / run)
    assert set(first) < set(steps) and max(steps) > max(first)  # the first epoch's steps are still there


def test_a_run_that_fails_before_training_leaves_nothing_behind(tmp_path: Path) -> None:
    out = mml(tmp_path, "fit", "clip-shapes", *SHAPES_CLIP, "data.num_train=10", "data.batch_size=64", "run.name=x",
              code=2)
    assert "makes no full batch of data.batch_size=64" in out
    assert not (tmp_path / "runs" / "x").exists()
    # a failure after the run directory was made (the Trainer refuses the strategy) removes it too
    mml(tmp_path, "fit", "clip-shapes", *SHAPES_CLIP, "trainer.accelerator=cpu", "trainer.strategy=fsdp",
        "run.name=x", code=2)
    assert not (tmp_path / "runs" / "x").exists()


def test_more_cpu_processes_than_cores_is_warned() -> None:
    cores = os.cpu_count() or 1
    with pytest.warns(UserWarning, match=f"starts {cores + 2} training processes on this machine's {cores} CPU"):
        warn_about_cpu_processes({"accelerator": "cpu", "devices": cores + 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_about_cpu_processes({"accelerator": "cpu", "devices": 1})


def test_data_inspect_exits_non_zero_on_a_damaged_shard_set(tmp_path: Path) -> None:
    mml(tmp_path, "data", "write", "shapes", "shards", "--num", "40", "--shard-size", "20")
    tar = sorted((tmp_path / "shards").glob("*.tar"))[-1]
    tar.write_bytes(tar.read_bytes()[:3000])
    out = mml(tmp_path, "data", "inspect", str(tmp_path / "shards"), code=1)
    assert json.loads(out[:out.rindex("}") + 1])["problems"] and "problem(s) found" in out
