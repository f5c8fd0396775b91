"""The training step makes no host-device sync except on logging steps.

On a GPU, turning a tensor into a Python number (``.item()``, ``float()``, ``bool()``,
``.tolist()``, ``.cpu()``) waits for every queued kernel. This CPU test records each such
call made during training, outside the optimizer's own, and checks they fall only on the
steps that write logs: the same code on a GPU then syncs once per ``log_every_n_steps``.
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny import tiny_overrides

from mmlightning.build import build_datamodule, build_task, build_trainer
from mmlightning.config import load_recipe, resolve
from mmlightning.loggers import finish_loggers

CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu")
# Where a sync is not ours to remove, matched against the innermost frames only (the whole
# training step runs inside optimizer.step(closure), so an outer frame would excuse all):
# the optimizer's step counter, and transformers' attention-mask building, which asks
# whether the batch holds padding or packed sequences on every forward of an HF model. The
# non-finite guard is not excused: it decides on the device and reads back at logging steps.
EXCUSED = ("torch/optim/", "transformers/masking_utils.py")
LOG_EVERY = 4


class StepRecorder(L.Callback):
    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.step = trainer.global_step

    def on_train_epoch_end(self, *args) -> None:
        self.step = None


@pytest.mark.parametrize("recipe", ["clip-shapes", "vqa-shapes", "caption-shapes"])
def test_conversions_only_on_logging_steps(recipe: str, fixtures: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = [*tiny_overrides(recipe, fixtures), "data.num_train=384", f"trainer.log_every_n_steps={LOG_EVERY}",
                 "trainer.limit_val_batches=0", "trainer.max_epochs=1"]
    cfg = resolve(load_recipe(recipe, overrides))
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    trainer = build_trainer(cfg, tmp_path / "run", task=task)  # real loggers, progress bar, checkpointing
    recorder = StepRecorder()
    trainer.callbacks.append(recorder)

    calls: dict[int, list[str]] = defaultdict(list)

    def recording(name: str):
        original = getattr(torch.Tensor, name)

        def conversion(self, *args, **kwargs):
            if recorder.step is not None:
                stack = traceback.extract_stack()[:-1]
                if not any(place in frame.filename for frame in stack[-3:] for place in EXCUSED):
                    calls[recorder.step].append(f"{name} from {stack[-1].filename}:{stack[-1].lineno}")
            return original(self, *args, **kwargs)

        return conversion

    for name in CONVERSIONS:
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    try:
        trainer.fit(task, datamodule=datamodule)
    finally:
        monkeypatch.undo()
        finish_loggers(trainer)  # else the next test's W&B run would write into this one

    last = trainer.global_step - 1
    assert last >= 2 * LOG_EVERY
    logging_steps = {s for s in range(last + 1) if (s + 1) % LOG_EVERY == 0} | {last}
    off_beat = {step: where for step, where in calls.items() if step not in logging_steps}
    assert off_beat == {}, f"host syncs on non-logging steps: {off_beat}"
    assert calls, "the recorder saw no logging step at all"
