"""Contrastive accumulation keeps the negatives: k batches of B give the loss and the
gradients of one batch of k x B (feature caching, as open_clip's --accum-freq)."""

from __future__ import annotations

import pytest
import torch
from tiny import SHAPES_CLIP

from mmlightning.build import build_datamodule, build_task, build_trainer
from mmlightning.config import load_recipe, resolve
from mmlightning.errors import UserError

# no BatchNorm (it would see 32 samples instead of 128), plain SGD so that weights move by -grad
TOWERS = ["model.vision={name: 'timm:vit_base_patch16_224', img_size: 32, "
          "model_kwargs: {depth: 1, embed_dim: 32, num_heads: 2}}",
          "optimizer={name: sgd, lr: 1.0, momentum: 0.0, weight_decay: 0.0}", "scheduler={name: constant}",
          "trainer.precision=32-true", "trainer.max_steps=1", "logger.name=none", "data.num_train=256"]


def one_step(*overrides: str) -> tuple[dict[str, torch.Tensor], float]:
    cfg = resolve(load_recipe("clip-shapes", [*SHAPES_CLIP, *TOWERS, *overrides]))
    torch.manual_seed(0)
    task = build_task(cfg)
    trainer = build_trainer(cfg, None, task=task)
    trainer.fit(task, datamodule=build_datamodule(cfg, task))
    assert trainer.global_step == 1
    return {k: v.detach().clone() for k, v in task.state_dict().items()}, float(trainer.callback_metrics["train/loss"])


def test_accumulating_four_batches_equals_one_four_times_larger() -> None:
    big_weights, big_loss = one_step("data.batch_size=128")
    small_weights, small_loss = one_step("data.batch_size=32", "model.accumulate_batches=4")
    assert small_loss == pytest.approx(big_loss, abs=1e-5)
    moved = 0
    for name, value in big_weights.items():
        torch.testing.assert_close(small_weights[name], value, atol=1e-5, rtol=0, msg=name)
        moved += 1
    assert moved > 10
    # plain accumulation would compare each batch only with itself: a different loss altogether
    lone_weights, lone_loss = one_step("data.batch_size=32")
    assert abs(lone_loss - big_loss) > 1e-2


def test_lightning_accumulation_on_a_contrastive_task_is_refused() -> None:
    cfg = resolve(load_recipe("clip-shapes", [*SHAPES_CLIP, "trainer.accumulate_grad_batches=4", "logger.name=none"]))
    with pytest.raises(UserError, match="Use model.accumulate_batches instead"):
        build_trainer(cfg, None, task=build_task(cfg))


@pytest.mark.slow
def test_accumulation_under_two_process_ddp(tmp_path) -> None:
    """Every parameter, the temperature included, is in the one gradient reduction of the last
    pass (the others run without DDP's sync): plain `ddp` accepts it."""
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mmlightning.cli", "fit", "clip-shapes", *SHAPES_CLIP, "model.accumulate_batches=2",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "logger.name=none", "run.name=a"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    # 256 samples / 2 ranks / 32 a batch = 4 batches a rank, 2 per step
    assert json.loads((tmp_path / "runs" / "a" / "summary.json").read_text())["global_step"] == 2
