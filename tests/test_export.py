"""mml export: open_clip.create_model (--format open_clip) and transformers' AutoModel
(--format hf) load the folder and give the same embeddings as the framework."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import SHAPES_CLIP

from mmlightning.cli import main
from mmlightning.export import load_task

TOWERS = ["model.vision={name: 'timm:resnet18', img_size: 64}", "model.text.pooling=mean"]


def tiny_hf_text(minilm: Path) -> list[str]:
    return [f"model.text={{name: 'hf:{minilm}', pretrained: false, pooling: mean, max_length: 16, "
            "config: {num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}"]


def test_export_round_trips_through_open_clip(tmp_path: Path, minilm_dir: Path, capsys: pytest.CaptureFixture) -> None:
    import open_clip
    from PIL import Image
    from skimage import data

    from mmlightning.data_modules.transforms import eval_transform

    tower = "model.vision={name: 'timm:resnet18', img_size: 64, crop_pct: 1.0}"
    assert main(["fit", "clip-shapes", *SHAPES_CLIP, tower, *tiny_hf_text(minilm_dir), "trainer.max_steps=3",
                 "logger.name=none", "run.name=r"]) == 0
    assert main(["export", "runs/r", "--format", "open_clip", "--out", "exported"]) == 0
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'exported'}")
    model.eval()
    task, _ = load_task("runs/r")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    captions = ["a small red circle", "a large blue square left of a cross", "a cross"]
    tokens = task.text.tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt")
    # open_clip's own tokenizer for the folder gives the same ids
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'exported'}")(captions), tokens["input_ids"])
    with torch.no_grad():
        ours_image = task.encode_image(images)
        ours_text = task.encode_text(tokens["input_ids"], tokens["attention_mask"])
        theirs_image = model.encode_image(images, normalize=True)
        theirs_text = model.encode_text(tokens["input_ids"], normalize=True)
    assert (ours_image - theirs_image).abs().max() <= 1e-5
    assert (ours_text - theirs_text).abs().max() <= 1e-5
    assert torch.allclose(model.logit_scale, task.logit_scale)
    # real non-square photos through each side's own preprocessing: the same embeddings
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("coffee", "chelsea", "rocket")]
    ours_transform = eval_transform(task.vision.image_config)
    with torch.no_grad():
        ours_photos = task.encode_image(torch.stack([ours_transform(p) for p in photos]))
        theirs_photos = model.encode_image(torch.stack([preprocess(p) for p in photos]), normalize=True)
    assert (ours_photos - theirs_photos).abs().max() <= 1e-5
    # timm's default evaluation crop (resnet18: 0.95) is what open_clip's preprocessing cannot say
    assert main(["fit", "clip-shapes", *SHAPES_CLIP, "model.vision={name: 'timm:resnet18', img_size: 64}",
                 *tiny_hf_text(minilm_dir), "trainer.max_steps=1", "logger.name=none", "run.name=cropped"]) == 0
    capsys.readouterr()
    assert main(["export", "runs/cropped", "--format", "open_clip", "--out", "exported-cropped"]) == 2
    assert "evaluates at crop_pct 0.95 (resize to 67, crop 64)" in capsys.readouterr().err


TINY_VIT = ("model.vision={name: 'timm:vit_tiny_patch16_224', img_size: 32, "
            "model_kwargs: {depth: 1, embed_dim: 32, num_heads: 2}}")


@pytest.mark.parametrize("variant", [
    pytest.param(["model.vision={name: 'timm:resnet18', img_size: 64}"], id="resnet-mean"),
    # a transformer rebuilt at another size from model_args, [CLS] pooling, SigLIP's logit bias
    pytest.param([TINY_VIT, "model.text.pooling=cls", "loss={name: siglip}"], id="vit-cls-siglip"),
])
def test_export_round_trips_through_transformers(tmp_path: Path, minilm_dir: Path, capsys: pytest.CaptureFixture,
                                                 variant: list[str]) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer, pipeline
    from transformers.image_utils import PILImageResampling

    assert main(["fit", "clip-shapes", *SHAPES_CLIP, *tiny_hf_text(minilm_dir), *variant, "trainer.max_steps=3",
                 "logger.name=none", "run.name=r"]) == 0
    capsys.readouterr()
    assert main(["export", "runs/r", "--format", "hf", "--out", "exported"]) == 0
    assert "AutoModel.from_pretrained('exported', trust_remote_code=True)" in capsys.readouterr().out
    out = tmp_path / "exported"
    model, loading = AutoModel.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    task, _ = load_task("runs/r")
    size = task.vision.image_config.size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    captions = ["a small red circle", "a large blue square left of a cross", "a cross " * 20]
    tokens = tokenizer(captions, padding="longest", truncation=True, return_tensors="pt")
    ours = task.text.tokenizer(captions, padding="longest", truncation=True, max_length=task.text.max_length,
                               return_tensors="pt")
    assert torch.equal(tokens["input_ids"], ours["input_ids"])  # truncated where training truncates
    with torch.no_grad():
        ours_image = task.encode_image(images)
        ours_text = task.encode_text(tokens["input_ids"], tokens["attention_mask"])
        theirs_image = model.get_image_features(pixel_values=images)
        assert "token_type_ids" in tokens  # a BERT-style tokenizer's: the standard call passes them on
        theirs_text = model.get_text_features(**tokens)
        logits = model(pixel_values=images, **tokens).logits_per_image
    assert (ours_image - theirs_image).abs().max() <= 1e-5
    assert (ours_text - theirs_text).abs().max() <= 1e-5
    bias = 0.0 if task.logit_bias is None else task.logit_bias
    assert torch.allclose(logits, task.temperature_scale() * ours_image @ ours_text.T + bias, atol=1e-4)

    image_config = task.vision.image_config
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.crop_size == {"height": size, "width": size}
    assert tuple(processor.image_mean) == image_config.mean and tuple(processor.image_std) == image_config.std
    assert processor.resample == PILImageResampling.BICUBIC  # as the framework resizes
    picture = Image.fromarray(np.zeros((80, 96, 3), np.uint8))
    assert processor(images=picture, return_tensors="pt")["pixel_values"].shape == (1, 3, size, size)
    assert type(AutoProcessor.from_pretrained(out, trust_remote_code=True)).__name__ == "VisionTextDualEncoderProcessor"
    classify = pipeline("zero-shot-image-classification", model=str(out), trust_remote_code=True)
    labels = {"a circle", "a square"}
    assert {s["label"] for s in classify(picture, candidate_labels=sorted(labels))} == labels


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_export_refuses_what_a_format_cannot_express(fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", "clip-shapes", *SHAPES_CLIP, "trainer.max_steps=1", "logger.name=none", "run.name=s"]) == 0
    capsys.readouterr()
    assert main(["export", "runs/s", "--format", fmt, "--out", "exported"]) == 2
    err = capsys.readouterr().err
    assert f"cannot export to {fmt}: the image tower is 'shapes_cnn'" in err
    assert "the text tower is 'small_transformer'" in err
    if fmt == "hf":
        assert "projection" not in err  # clip-shapes' is linear without bias
    assert not (tmp_path / "exported").exists()
