"""HF transformers' CLIP and SigLIP towers, each a component of its own, with their projections.

``hf_clip_vision:<dir | hub id>`` and ``hf_clip_text:<dir | hub id>`` take a folder that holds a
``CLIPModel`` or ``SiglipModel`` (SigLIP 2's fixed-resolution checkpoints are ``siglip`` too)
and load one tower of it through transformers' own tower classes, which read the whole
model's checkpoint: ``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection``
(pooled at [CLS] / the end-of-text token, then projected) and ``SiglipVisionModel`` /
``SiglipTextModel`` (attention-pooled / last token, then their heads). ``pooled`` is what
``get_image_features`` / ``get_text_features`` return, so both towers are ``projected``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmlightning.encoders.outputs import ImageConfig, TextOutput, VisionOutput
from mmlightning.encoders.weights import missing_folder
from mmlightning.errors import UserError
from mmlightning.registry import PRETRAINED_CLIPS, TEXT_ENCODERS, VISION_ENCODERS

SUPPORTED = ("clip", "siglip")


def tower_classes(model_type: str) -> tuple[type, type]:
    import transformers as tf

    return {"clip": (tf.CLIPVisionModelWithProjection, tf.CLIPTextModelWithProjection),
            "siglip": (tf.SiglipVisionModel, tf.SiglipTextModel)}[model_type]


def read_config(name_or_path: str, where: str) -> Any:
    """The whole model's config, refusing other model types and failing fast offline."""
    from transformers import AutoConfig

    missing_folder(name_or_path, where)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        offline = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(f"{where}: hf:{name_or_path}: cannot load{offline}: {str(err).splitlines()[0]} Give a local "
                        f"folder with the model's config.json, weights and tokenizer (save_pretrained writes one), "
                        f"e.g. hf:/path/to/clip-vit-base-patch32.") from None
    if config.model_type not in SUPPORTED:
        hint = (" SigLIP 2's NaFlex models (siglip2) take patch sequences of varying shape, which this tower does "
                "not feed; its fixed-resolution checkpoints are 'siglip'." if config.model_type == "siglip2" else "")
        raise UserError(f"{where}: hf:{name_or_path} holds a {config.model_type!r} model; supported: "
                        f"{', '.join(SUPPORTED)} (CLIPModel, SiglipModel).{hint}")
    return config


def load_tower(cls: type, name_or_path: str, config: Any, pretrained: bool, where: str) -> nn.Module:
    if not pretrained:
        return cls(config)
    model, info = cls.from_pretrained(name_or_path, config=config, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        raise UserError(f"{where}: hf:{name_or_path}: the checkpoint does not fit {cls.__name__}: "
                        + "; ".join(f"{k.replace('_', ' ')} {list(v)[:5]}" for k, v in problems.items()))
    return model


def image_config(name_or_path: str, model_type: str, size: int) -> ImageConfig:
    """The folder's image processor as the framework's ImageConfig (CLIP: resize the short
    side, centre-crop; SigLIP: squash to the square)."""
    from transformers import AutoImageProcessor
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):  # a folder without preprocessor_config.json: the model family's defaults
        processor = None
    family_mean, family_std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if model_type == "clip" else \
        (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)  # each image processor's own defaults
    mean = tuple(getattr(processor, "image_mean", None) or family_mean)
    std = tuple(getattr(processor, "image_std", None) or family_std)
    resample = getattr(processor, "resample", 3)
    interpolation = "bilinear" if int(resample) == 2 else "bicubic"
    resize = dict(getattr(processor, "size", None) or {})
    if "shortest_edge" in resize:
        crop = dict(getattr(processor, "crop_size", None) or {}).get("height", size) \
            if getattr(processor, "do_center_crop", True) else resize["shortest_edge"]
        return ImageConfig(size=int(crop), mean=mean, std=std, interpolation=interpolation,
                           crop_pct=float(crop) / float(resize["shortest_edge"]))
    return ImageConfig(size=int(resize.get("height", size)), mean=mean, std=std, interpolation=interpolation,
                       resize_mode="squash")


@VISION_ENCODERS.register("hf_clip_vision:")
class HFCLIPVision(nn.Module):
    """``hf_clip_vision:<dir | hub id>``: the image tower of an HF ``CLIPModel`` (with its
    visual projection) or ``SiglipModel`` (with its attention-pooling head), preprocessing
    from the folder's image processor. ``pretrained: true`` loads the weights (nothing loads unasked).
    ``token_layer`` picks the encoder layer whose outputs are the ``tokens`` (-1, the last, by
    default; LLaVA feeds its LM the penultimate layer, -2) and ``patch_tokens_only`` drops
    CLIP's [CLS] token from them (LLaVA's ``select_feature: patch``)."""

    projected = True

    def __init__(self, name_or_path: str, pretrained: bool = False, token_layer: int = -1,
                 patch_tokens_only: bool = False, where: str = "model.vision") -> None:
        super().__init__()
        config = read_config(name_or_path, f"{where}.name")
        self.source, self.model_type = name_or_path, config.model_type
        vision_config = config.vision_config
        if self.model_type == "clip":  # the projection's width lives on the whole model's config
            vision_config.projection_dim = config.projection_dim
        self.model = load_tower(tower_classes(self.model_type)[0], name_or_path, vision_config, pretrained, where)
        self.output_dim = config.projection_dim if self.model_type == "clip" else vision_config.hidden_size
        self.token_dim = vision_config.hidden_size
        self.image_config = image_config(name_or_path, self.model_type, vision_config.image_size)
        layers = vision_config.num_hidden_layers
        if isinstance(token_layer, bool) or not isinstance(token_layer, int) or not -layers <= token_layer < layers \
                or token_layer == 0:
            raise UserError(f"{where}.token_layer must be a layer of the tower's {layers}: 1..{layers - 1} or "
                              f"-{layers}..-1 (-1 the last, -2 the penultimate as LLaVA), got {token_layer!r}.")
        if patch_tokens_only and self.model_type != "clip":
            raise UserError(f"{where}.patch_tokens_only: a {self.model_type} tower has no [CLS] token to drop; "
                              f"leave it false.")
        self.token_layer, self.patch_tokens_only = token_layer, bool(patch_tokens_only)

    def forward(self, images: torch.Tensor) -> VisionOutput:
        last = self.token_layer == -1
        out = self.model(pixel_values=images, output_hidden_states=not last)
        pooled = out.image_embeds if self.model_type == "clip" else out.pooler_output
        # hidden_states[0] is the embeddings' output, so layer k (1-based) is hidden_states[k]
        tokens = out.last_hidden_state if last else out.hidden_states[self.token_layer]
        return VisionOutput(pooled=pooled, tokens=tokens[:, 1:] if self.patch_tokens_only else tokens)


@TEXT_ENCODERS.register("hf_clip_text:")
class HFCLIPText(nn.Module):
    """``hf_clip_text:<dir | hub id>``: the text tower of an HF ``CLIPModel`` (causal, pooled at
    the end-of-text token, projected) or ``SiglipModel`` (pooled at the last position, so texts
    are padded to the full ``max_length`` and no attention mask is passed, as SigLIP trained),
    with the folder's tokenizer. ``pretrained: true`` loads the weights (nothing loads unasked)."""

    projected = True

    def __init__(self, name_or_path: str, pretrained: bool = False, max_length: int | None = None,
                 where: str = "model.text") -> None:
        super().__init__()
        from transformers import AutoTokenizer

        config = read_config(name_or_path, f"{where}.name")
        self.source, self.model_type = name_or_path, config.model_type
        text_config = config.text_config
        if self.model_type == "clip":
            text_config.projection_dim = config.projection_dim
        self.model = load_tower(tower_classes(self.model_type)[1], name_or_path, text_config, pretrained, where)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise UserError(f"{where}.name: hf:{name_or_path}: no tokenizer there ({str(err).splitlines()[0]}); "
                            f"save the model's tokenizer into the folder.") from None
        positions = text_config.max_position_embeddings
        self.max_length = min(max_length or positions, positions)
        if self.model_type == "siglip":
            self.tokenizer.pads_to_max_length = True  # read by encoders.tokenizers.tokenize
        self.output_dim = config.projection_dim if self.model_type == "clip" else text_config.hidden_size
        self.token_dim = text_config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        if self.model_type == "siglip":
            out = self.model(input_ids=input_ids)
            pooled = out.pooler_output
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            pooled = out.text_embeds
        return TextOutput(pooled=pooled, tokens=out.last_hidden_state, mask=attention_mask.bool())

    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def position_table(self) -> torch.Tensor:
        """(positions, width): the text model's position embeddings."""
        return self.model.text_model.embeddings.position_embedding.weight


@PRETRAINED_CLIPS.register("hf:")
class HFCLIPPretrained:
    """``hf:<dir | hub id>``: both towers, their projections and the logit scale (and SigLIP's
    bias) of an HF ``CLIPModel`` or ``SiglipModel``."""

    def __init__(self, name_or_path: str, where: str = "model.pretrained") -> None:
        from safetensors import safe_open

        config = read_config(name_or_path, where)
        self.vision = {"name": f"hf_clip_vision:{name_or_path}", "pretrained": True}
        self.text = {"name": f"hf_clip_text:{name_or_path}", "pretrained": True}
        scale, bias = None, None
        folder = Path(name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
        files = sorted(folder.glob("*.safetensors"))
        for file in files:
            with safe_open(str(file), "pt") as f:
                keys = set(f.keys())
                if "logit_scale" in keys:
                    scale = float(f.get_tensor("logit_scale").reshape(()))
                if "logit_bias" in keys:
                    bias = float(f.get_tensor("logit_bias").reshape(()))
        if scale is None:
            raise UserError(f"{where}: hf:{name_or_path}: no logit_scale in {[f.name for f in files] or 'any .safetensors file'}"
                            f" (save the model with save_pretrained, which writes model.safetensors).")
        if config.model_type == "siglip" and bias is None:
            raise UserError(f"{where}: hf:{name_or_path}: a SigLIP model without logit_bias in its weights.")
        self.logit_scale, self.logit_bias = scale, bias
