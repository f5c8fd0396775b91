"""Whole pretrained CLIPs (model.pretrained) against the libraries that saved them: open_clip's
encode_image / encode_text and HF's get_image_features / get_text_features give the same
embeddings, logit scale and bias; the eval transform gives open_clip's and HF's pixels on real
photos; fine-tuned models go back out in each library's own layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_sources import OPEN_CLIP_CFG

from mmlightning.build import build_task
from mmlightning.config import load_recipe, resolve
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.errors import UserError
from mmlightning.registry import VISION_ENCODERS
from mmlightning.export import to_hf, to_open_clip

TEXTS = ["a red square", "two small blue circles left of a large green triangle, and more words than fit in"]


def task_for(*overrides: str):
    return build_task(resolve(load_recipe("clip-finetune-shapes", list(overrides)))).eval()


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def sources(pretrained_clips: dict[str, Path]) -> dict[str, Path]:
    return {"clip": pretrained_clips["hf_clip"], "siglip": pretrained_clips["hf_siglip"], **pretrained_clips}


def open_clip_embeddings(folder: Path, pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, ...]:
    import open_clip

    model = open_clip.create_model(f"local-dir:{folder}").eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(texts)
    with torch.no_grad():
        return model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True), model


def hf_embeddings(folder: Path, pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, ...]:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder).eval()
    siglip = model.config.model_type == "siglip"
    tokens = AutoTokenizer.from_pretrained(folder)(texts, padding="max_length" if siglip else "longest",
                                                   truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=tokens["input_ids"],
                                       **({} if siglip else {"attention_mask": tokens["attention_mask"]}))
    pooled = [getattr(x, "pooler_output", x) for x in (image, text)]  # a tensor in transformers 4, an output in 5
    return F.normalize(pooled[0], dim=-1), F.normalize(pooled[1], dim=-1), model


def ours(task, pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = tokenize(task.text.tokenizer, texts, task.text.max_length)
    with torch.no_grad():
        return task.encode_image(pixels), task.encode_text(**tokens)


@pytest.mark.parametrize("kind", ["open_clip", "open_clip_bias", "clip", "siglip"])
def test_a_pretrained_clip_embeds_as_its_library(kind: str, sources: dict[str, Path]) -> None:
    folder = sources[kind]
    prefix = "open_clip:local-dir:" if kind.startswith("open_clip") else "hf:"
    task = task_for(f"model.pretrained={prefix}{folder}")
    reference = open_clip_embeddings if kind.startswith("open_clip") else hf_embeddings
    their_image, their_text, model = reference(folder, images(), TEXTS)
    our_image, our_text = ours(task, images(), TEXTS)
    assert (our_image - their_image).abs().max() <= 1e-5
    assert (our_text - their_text).abs().max() <= 1e-5
    assert task.logit_scale.item() == pytest.approx(float(model.logit_scale.reshape(())), abs=1e-6)
    has_bias = kind in ("open_clip_bias", "siglip")
    assert (task.logit_bias is not None) == has_bias
    assert type(task.loss_fn).__name__ == ("SigLipLoss" if has_bias else "ClipLoss")  # the loss follows the source
    if has_bias:
        assert task.logit_bias.item() == pytest.approx(float(model.logit_bias.reshape(())), abs=1e-6)
    # the towers keep their own projections: none is added on top
    assert isinstance(task.vision_proj, torch.nn.Identity) and isinstance(task.text_proj, torch.nn.Identity)
    # SigLIP and open_clip pool a fixed position: every text is padded to the context length
    padded = tokenize(task.text.tokenizer, ["a"], task.text.max_length)["input_ids"].shape[1]
    assert (padded == task.text.max_length) == (kind != "clip")


def test_open_clip_architecture_with_a_weights_file(tmp_path: Path) -> None:
    """open_clip:<arch>@<file>: an architecture open_clip knows (a config registered the way
    open_clip documents for custom models) with a state dict saved by open_clip."""
    import open_clip

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny-test-ViT.json").write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(configs)
    torch.manual_seed(3)
    model = open_clip.create_model("tiny-test-ViT").eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    task = task_for(f"model.pretrained=open_clip:tiny-test-ViT@{tmp_path / 'weights.pt'}")
    with torch.no_grad():
        tokens = open_clip.get_tokenizer("tiny-test-ViT")(TEXTS)
        their = model.encode_image(images(), normalize=True), model.encode_text(tokens, normalize=True)
    for mine, theirs in zip(ours(task, images(), TEXTS), their):
        assert (mine - theirs).abs().max() <= 1e-5
    torch.save({k: v for k, v in model.state_dict().items() if k != "ln_final.weight"}, tmp_path / "short.pt")
    with pytest.raises(UserError, match=r"short.pt: does not fit open_clip's tiny-test-ViT: missing \['ln_final.weight'\]"):
        task_for(f"model.pretrained=open_clip:tiny-test-ViT@{tmp_path / 'short.pt'}")


def test_towers_are_components_of_their_own(sources: dict[str, Path]) -> None:
    """LiT on a CLIP image tower, or a CLIP text tower beside another image tower: one override."""
    lit = task_for(f"model.pretrained=open_clip:local-dir:{sources['open_clip']}",
                   "model.text={name: small_transformer, width: 32, layers: 1, heads: 2}",
                   "model.freeze_vision=true", "model.unfrozen_vision_groups=1")
    assert isinstance(lit.vision_proj, torch.nn.Identity)  # the CLIP tower's own projection, to its 24 dims
    assert lit.text_proj.in_features == 32 and lit.text_proj.out_features == 24
    trainable = sorted(n for n, p in lit.vision.named_parameters() if p.requires_grad)
    assert trainable == ["model.ln_post.bias", "model.ln_post.weight", "model.proj"]  # the last group: norm + projection
    mixed = build_task(resolve(load_recipe("clip-shapes", [
        f"model.text={{name: 'hf_clip_text:{sources['clip']}', pretrained: true}}", "model.embed_dim=24"])))
    assert type(mixed.vision_proj).__name__ == "Linear" and isinstance(mixed.text_proj, torch.nn.Identity)
    _, their_text, _ = hf_embeddings(sources["clip"], images(), TEXTS)
    tokens = tokenize(mixed.text.tokenizer, TEXTS, mixed.text.max_length)
    with torch.no_grad():
        assert (mixed.eval().encode_text(**tokens) - their_text).abs().max() <= 1e-5


def test_vision_tokens_from_the_layer_llava_reads(sources: dict[str, Path]) -> None:
    """model.vision.token_layer=-2 and patch_tokens_only: the penultimate layer's patch tokens,
    what LLaVA feeds its LM, as transformers' own CLIPModel gives them; a layer the tower does
    not have, or a [CLS] to drop from SigLIP, is refused naming the key."""
    from transformers import CLIPModel

    tower = VISION_ENCODERS.build({"name": f"hf_clip_vision:{sources['clip']}", "pretrained": True, "token_layer": -2,
                                   "patch_tokens_only": True}, "model.vision").eval()
    pixels = images(2, tower.image_config.size)
    with torch.no_grad():
        theirs = CLIPModel.from_pretrained(sources["clip"]).vision_model(pixel_values=pixels, output_hidden_states=True)
        ours = tower(pixels)
    torch.testing.assert_close(ours.tokens, theirs.hidden_states[-2][:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(ours.tokens, theirs.last_hidden_state[:, 1:])
    for bad, message in (({"token_layer": 0}, "token_layer must be a layer of the tower's"),
                         ({"token_layer": 99}, "token_layer must be a layer"),
                         ({"patch_tokens_only": True, "name": f"hf_clip_vision:{sources['siglip']}"}, "no .CLS. token")):
        with pytest.raises(UserError, match=message):
            VISION_ENCODERS.build({"name": f"hf_clip_vision:{sources['clip']}", **bad}, "model.vision")


def test_fresh_weights_keep_the_architecture(sources: dict[str, Path]) -> None:
    task = task_for(f"model.pretrained=hf:{sources['siglip']}", "model.vision.pretrained=false")
    their_image, their_text, _ = hf_embeddings(sources["siglip"], images(), TEXTS)
    our_image, our_text = ours(task, images(), TEXTS)
    assert (our_text - their_text).abs().max() <= 1e-5  # the text tower still loaded
    assert (our_image - their_image).abs().max() > 1e-2  # the image tower did not


def fine_tune_a_little(task) -> None:
    """A few optimizer steps on random pairs: the weights move away from the source's."""
    task.train()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    size = task.vision.image_config.size
    batch = {"image": images(4, size), **tokenize(task.text.tokenizer, ["a", "b c", "d e f", "g"], task.text.max_length)}
    for _ in range(3):
        optimizer.zero_grad()
        task.batch_loss(batch).backward()
        optimizer.step()
    task.eval()


@pytest.mark.parametrize("kind", ["open_clip", "clip", "siglip"])
def test_fine_tuned_models_go_back_out_in_their_own_layout(kind: str, sources: dict[str, Path], tmp_path: Path) -> None:
    folder = sources[kind]
    task = task_for(f"model.pretrained={'open_clip:local-dir:' if kind == 'open_clip' else 'hf:'}{folder}")
    before = ours(task, images(), TEXTS)[0]
    fine_tune_a_little(task)
    our_image, our_text = ours(task, images(), TEXTS)
    assert (our_image - before).abs().max() > 1e-3
    out, how_to_load = (to_open_clip if kind == "open_clip" else to_hf)(task, tmp_path / "out")
    if kind == "open_clip":
        their_image, their_text, model = open_clip_embeddings(out, images(), TEXTS)
    else:
        their_image, their_text, model = hf_embeddings(out, images(), TEXTS)
        assert type(model).__name__ == {"clip": "CLIPModel", "siglip": "SiglipModel"}[kind]  # stock, no remote code
        assert not (out / "hf_dual_encoder.py").exists()
    assert (our_image - their_image).abs().max() <= 1e-5
    assert (our_text - their_text).abs().max() <= 1e-5
    assert float(model.logit_scale.reshape(())) == pytest.approx(task.logit_scale.item(), abs=1e-6)


def photos() -> list:
    from PIL import Image
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "coffee", "chelsea", "rocket")]


def test_eval_transform_gives_open_clips_pixels_on_real_photos(sources: dict[str, Path]) -> None:
    import open_clip

    from mmlightning.data_modules.transforms import eval_transform

    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{sources['open_clip']}")
    task = task_for(f"model.pretrained=open_clip:local-dir:{sources['open_clip']}")
    mine = eval_transform(task.vision.image_config)
    for photo in photos():  # resized from 300-512 px to 32 by the same PIL call
        assert (mine(photo) - preprocess(photo)).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_eval_transform_gives_hfs_pixels_on_real_photos(kind: str, sources: dict[str, Path]) -> None:
    from transformers import AutoImageProcessor

    from mmlightning.data_modules.transforms import eval_transform

    processor = AutoImageProcessor.from_pretrained(sources[kind])
    config = task_for(f"model.pretrained=hf:{sources[kind]}").vision.image_config
    assert config.resize_mode == ("shortest" if kind == "clip" else "squash")
    for photo in photos():
        # after the same resize: HF's resize rounds and resamples in its own way, so both get a
        # photo already at the size each pipeline resizes to; then crop, scale and normalize agree
        if kind == "clip":
            w, h = photo.size
            short = min(w, h)
            photo = photo.resize((round(w * 32 / short), round(h * 32 / short)), resample=3)
        else:
            photo = photo.resize((32, 32), resample=3)
        theirs = torch.as_tensor(np.asarray(processor(images=photo, return_tensors="np")["pixel_values"][0]))
        assert (eval_transform(config)(photo) - theirs).abs().max() <= 1e-5


def test_bad_sources_say_what_is_valid(sources: dict[str, Path], minilm_dir: Path) -> None:
    with pytest.raises(UserError, match=r"model.pretrained: open_clip has no architecture 'ViT-B-23'. Did you mean "
                                        r"'ViT-B-32'.*Valid: .*RN50"):
        task_for("model.pretrained=open_clip:ViT-B-23@openai")
    with pytest.raises(UserError, match=r"no pretrained tag 'laion2b_s34b_b78k' for ViT-B-32. Did you mean "
                                        r"'laion2b_s34b_b79k'.*Valid tags: .*openai"):
        task_for("model.pretrained=open_clip:ViT-B-32@laion2b_s34b_b78k")
    with pytest.raises(UserError, match=r"names an architecture without weights: add @<tag> \(.*openai"):
        task_for("model.pretrained=open_clip:ViT-B-32")
    with pytest.raises(UserError, match=r"ViT-B-32@/no/such.pt': no such file"):
        task_for("model.pretrained=open_clip:ViT-B-32@/no/such.pt")
    with pytest.raises(UserError, match=r"hf:.*holds a 'bert' model; supported: clip, siglip"):
        task_for(f"model.pretrained=hf:{minilm_dir}")
    with pytest.raises(UserError, match=r"hf:openai/clip-vit-base-patch32: cannot load \(HF_HUB_OFFLINE=1\).*local "
                                        r"folder"):
        task_for("model.pretrained=hf:openai/clip-vit-base-patch32")
    with pytest.raises(UserError, match=r"model.pretrained \(.*\) fills the towers, and the recipe names both"):
        build_task(resolve(load_recipe("clip-shapes", [f"+model.pretrained=hf:{sources['clip']}"])))


def test_fine_tune_then_wise_ft_and_export_from_the_command_line(fixtures: dict[str, Path], tmp_path: Path) -> None:
    """mml fit from a pretrained open_clip model; mml eval --wise-ft measures the curve;
    mml wise-ft writes a point that mml eval takes and that holds the interpolated weights;
    mml export writes the fine-tuned model back as open_clip's."""
    import open_clip
    from tiny import tiny_overrides

    from mmlightning.cli import main

    source = fixtures["open_clip"]
    assert main(["fit", "clip-finetune-shapes", *tiny_overrides("clip-finetune-shapes", fixtures),
                 "trainer.max_steps=4", "logger.name=csv", "run.name=ft"]) == 0
    assert main(["eval", "runs/ft", "--wise-ft", "1", "0", "0.5", "--shots", "1", "--seeds", "1"]) == 0
    (report_file,) = (tmp_path / "runs/ft/checkpoints").glob("*.report.json")
    report = json.loads(report_file.read_text())
    assert [p["alpha"] for p in report["wise_ft"]] == [0.0, 0.5, 1.0]
    end = report["wise_ft"][-1]
    assert end["mean_recall"] == pytest.approx(report["test_metrics"]["test/mean_recall"])  # alpha 1: the checkpoint
    assert report_file.with_name(report_file.name.replace(".report.json", ".wise-ft.png")).stat().st_size > 0
    assert any(s["title"].startswith("WiSE-FT") for s in report["sections"])

    assert main(["wise-ft", "runs/ft", "--alpha", "0"]) == 0
    written = tmp_path / "runs/ft/checkpoints/wise-ft-0.ckpt"
    state = torch.load(written, map_location="cpu", weights_only=True)["state_dict"]
    source_model = open_clip.create_model(f"local-dir:{source}")
    for key, value in source_model.visual.state_dict().items():  # alpha 0 is the source's weights exactly
        torch.testing.assert_close(state[f"vision.model.{key}"], value, rtol=0, atol=0)
    assert main(["eval", str(written), "--shots", "1", "--seeds", "1"]) == 0
    start_report = json.loads(written.with_name("wise-ft-0.report.json").read_text())
    start = report["wise_ft"][0]
    assert start_report["test_metrics"]["test/mean_recall"] == pytest.approx(start["mean_recall"])

    assert main(["export", "runs/ft", "--format", "open_clip", "--out", "exported"]) == 0
    from mmlightning.export import load_task

    task, _ = load_task("runs/ft")
    their_image, their_text, _ = open_clip_embeddings(tmp_path / "exported", images(), TEXTS)
    our_image, our_text = ours(task, images(), TEXTS)
    assert (our_image - their_image).abs().max() <= 1e-5 and (our_text - their_text).abs().max() <= 1e-5


def test_wise_ft_needs_a_run_that_started_from_weights() -> None:
    from mmlightning import wise_ft

    with pytest.raises(UserError, match="recipe 'clip-shapes' starts from fresh weights"):
        wise_ft.starting_weights(resolve(load_recipe("clip-shapes")))
    with pytest.raises(UserError, match=r"must lie in \[0, 1\]"):
        wise_ft.check_alphas([0.5, 1.5])
