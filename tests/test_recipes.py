"""Every shipped recipe builds, checks and fits on tiny data; runs resume; W&B records them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import LOGGED, SHAPES_CLIP, tiny_overrides
from wandb_offline import find_run_files, read_run

from mmlightning.cli import main
from mmlightning.config import list_recipes

RECIPES = [name for name, _ in list_recipes()]


def test_every_recipe_has_tiny_overrides(fixtures: dict[str, Path]) -> None:
    for name in RECIPES:
        assert tiny_overrides(name, fixtures)


@pytest.mark.parametrize("recipe", RECIPES)
def test_check(recipe: str, fixtures: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert main(["check", recipe, *tiny_overrides(recipe, fixtures)]) == 0
    assert "ok:" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", RECIPES)
def test_fit_few_steps(recipe: str, fixtures: dict[str, Path], tmp_path: Path) -> None:
    code = main(["fit", recipe, *tiny_overrides(recipe, fixtures), "run.name=tiny"])
    assert code == 0
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] > 0
    assert all(math.isfinite(v) for v in summary["test"].values())
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    # the W&B offline run holds the logged metrics and the resolved config
    (run_file,) = find_run_files(run_dir / "wandb")
    wandb_run = read_run(run_file)
    assert wandb_run.name == "tiny" and wandb_run.config["recipe"] == recipe
    assert wandb_run.config["model"] == json.loads(json.dumps(summary_config(run_dir)["model"]))
    expected, headline = LOGGED.get(recipe) or LOGGED[wandb_run.config["task"]]
    logged = {k for row in wandb_run.history for k in row}
    assert expected <= logged, expected - logged
    assert wandb_run.summary[headline] == pytest.approx(summary["test"][headline])


def summary_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_resume_continues_step_count(tmp_path: Path) -> None:
    base = [*SHAPES_CLIP, "trainer.max_epochs=-1", "logger.name=wandb"]
    assert main(["fit", "clip-shapes", *base, "trainer.max_steps=4", "run.name=r"]) == 0
    run_dir = tmp_path / "runs" / "r"
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["global_step"] == 4
    assert main(["fit", "clip-shapes", "--resume", str(run_dir), "trainer.max_steps=10"]) == 0
    second = json.loads((run_dir / "summary.json").read_text())
    assert second["global_step"] == 10
    # both legs are one W&B run (same id), and steps only grow
    runs = [read_run(p) for p in find_run_files(run_dir / "wandb")]
    assert len(runs) == 2 and runs[0].run_id == runs[1].run_id
    steps = [row["trainer/global_step"] for r in runs for row in r.history if "trainer/global_step" in row]
    assert steps == sorted(steps) and max(steps) >= 9
    # --resume auto finds the newest run of the recipe
    assert main(["fit", "clip-shapes", "--resume", "auto", "trainer.max_steps=12"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 12


def test_existing_run_is_never_overwritten(capsys: pytest.CaptureFixture) -> None:
    args = ["fit", "clip-shapes", *SHAPES_CLIP, "trainer.max_steps=1", "logger.name=none", "run.name=same"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists. Continue it with `--resume" in capsys.readouterr().err


def test_crashed_run_closes_its_wandb_run(tmp_path: Path) -> None:
    """A run that raises mid-fit marks its W&B run failed and closes it: the next run in the
    same process gets a W&B run of its own instead of writing into the crashed one."""
    (tmp_path / "flaky.py").write_text('''
from mmlightning.encoders.vision import SmallCNN
from mmlightning.registry import VISION_ENCODERS

@VISION_ENCODERS.register("flaky_cnn")
class FlakyCNN(SmallCNN):
    calls = 0

    def forward(self, images):
        FlakyCNN.calls += 1
        if FlakyCNN.calls == 3:
            raise RuntimeError("disk went away")
        return super().forward(images)
''')
    base = ["fit", "clip-shapes", *SHAPES_CLIP, "logger.name=wandb", "trainer.max_steps=4"]
    with pytest.raises(RuntimeError, match="disk went away"):
        main([*base, "imports=[flaky.py]", "model.vision.name=flaky_cnn", "run.name=crashed"])
    assert main([*base, "run.name=next"]) == 0
    crashed, = [read_run(p) for p in find_run_files(tmp_path / "runs" / "crashed" / "wandb")]
    following, = [read_run(p) for p in find_run_files(tmp_path / "runs" / "next" / "wandb")]
    assert following.name == "next" and following.run_id != crashed.run_id
    assert all(row.get("trainer/global_step", 0) <= 4 for row in following.history)


def test_validate_and_test_from_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", "clip-shapes", *SHAPES_CLIP, "logger.name=none", "run.name=e"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "e"
    assert main(["test", str(run_dir / "config.yaml"), "--ckpt", str(run_dir)]) == 0
    out = capsys.readouterr().out
    expected = json.loads((run_dir / "summary.json").read_text())["test"]["test/i2t_R@1"]
    assert f"test/i2t_R@1                 {expected:.4f}" in out


@pytest.mark.slow
def test_ddp_two_processes(tmp_path: Path) -> None:
    """Lightning launches the second rank by re-running the command: one run dir, one W&B run."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mmlightning.cli", "fit", "clip-shapes", *SHAPES_CLIP, "run.name=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["ddp"]
    assert len(find_run_files(runs[0] / "wandb")) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    # 256 samples, 2 ranks x 32 per step -> 4 steps in the epoch
    assert summary["global_step"] == 4


@pytest.mark.slow
def test_ddp_metrics_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    """2 ranks x 32 and 1 process x 64 see the same samples each step (the sampler deals the
    run's permutation out across ranks), the gathered contrastive loss gives the same
    gradients, and the evaluation metrics are reduced over every rank's share: the same
    weights and the same test metrics. (A tower without BatchNorm, whose statistics would
    be per rank.) The test split of 47 does not divide by 2: the sampler's repeat is counted once."""
    tower = ["data.num_test=47", "model.vision={name: 'timm:vit_base_patch16_224', img_size: 32, "
             "model_kwargs: {depth: 1, embed_dim: 32, num_heads: 2}}", "trainer.precision=32-true",
             "logger.name=none", "trainer.accelerator=cpu"]
    runs = {"ddp": ["data.batch_size=32", "trainer.devices=2", "trainer.strategy=ddp"],
            "single": ["data.batch_size=64", "trainer.devices=1"]}
    for name, extra in runs.items():
        cmd = [sys.executable, "-m", "mmlightning.cli", "fit", "clip-shapes", *SHAPES_CLIP, *tower, *extra,
               f"run.name={name}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
    summaries = {name: json.loads((tmp_path / "runs" / name / "summary.json").read_text()) for name in runs}
    assert summaries["ddp"]["global_step"] == summaries["single"]["global_step"] == 4
    assert summaries["ddp"]["test"].keys() == summaries["single"]["test"].keys()
    for metric, value in summaries["single"]["test"].items():
        assert summaries["ddp"]["test"][metric] == pytest.approx(value, abs=1e-4), metric
    import torch

    weights = {name: torch.load(tmp_path / "runs" / name / "checkpoints" / "last.ckpt", map_location="cpu",
                                weights_only=True)["state_dict"] for name in runs}
    for key, value in weights["single"].items():
        torch.testing.assert_close(weights["ddp"][key], value, atol=1e-5, rtol=1e-4, msg=key)
