"""mml export --format open_clip: open_clip.create_model loads the folder and gives the same
embeddings as the framework."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import SHAPES_CLIP

from mmlightning.cli import main
from mmlightning.export import load_task

TOWERS = ["model.vision={name: 'timm:resnet18', img_size: 64}", "model.text.pooling=mean"]


def tiny_hf_text(minilm: Path) -> list[str]:
    return [f"model.text={{name: 'hf:{minilm}', pretrained: false, pooling: mean, max_length: 16, "
            "config: {num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}"]


def test_export_round_trips_through_open_clip(tmp_path: Path, minilm_dir: Path) -> None:
    import open_clip

    assert main(["fit", "clip-shapes", *SHAPES_CLIP, "model.vision={name: 'timm:resnet18', img_size: 64}",
                 *tiny_hf_text(minilm_dir), "trainer.max_steps=3", "logger.name=none", "run.name=r"]) == 0
    assert main(["export", "runs/r", "--format", "open_clip", "--out", "exported"]) == 0
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'exported'}")
    model.eval()
    task, _ = load_task("runs/r")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = task.text.tokenizer(["a small red circle", "a large blue square left of a cross", "a cross"],
                                 padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        ours_image = task.encode_image(images)
        ours_text = task.encode_text(tokens["input_ids"], tokens["attention_mask"])
        theirs_image = model.encode_image(images, normalize=True)
        theirs_text = model.encode_text(tokens["input_ids"], normalize=True)
    assert (ours_image - theirs_image).abs().max() <= 1e-5
    assert (ours_text - theirs_text).abs().max() <= 1e-5
    assert torch.allclose(model.logit_scale, task.logit_scale)
    assert preprocess.transforms[0].size == 64  # the preprocessing config travels too


def test_export_refuses_what_open_clip_cannot_express(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", "clip-shapes", *SHAPES_CLIP, "trainer.max_steps=1", "logger.name=none", "run.name=s"]) == 0
    capsys.readouterr()
    assert main(["export", "runs/s", "--format", "open_clip", "--out", "exported"]) == 2
    err = capsys.readouterr().err
    assert "cannot export to open_clip: the image tower is 'shapes_cnn'" in err
    assert "the text tower is 'small_transformer'" in err
    assert not (tmp_path / "exported").exists()
