"""open_clip's CLIP towers, each a component of its own, with their projections.

A *source* names an open_clip model the way open_clip does:

- ``ViT-B-32`` (the architecture, fresh weights), ``ViT-B-32@laion2b_s34b_b79k`` (a pretrained
  tag, through open_clip's download cache) or ``ViT-B-32@/path/weights.safetensors`` (a file);
- ``local-dir:/folder`` (``open_clip_config.json`` + weights, what ``mml export --format
  open_clip`` writes) or ``hf-hub:org/repo``.

``open_clip_vision:<source>`` is the model's ``visual`` module, ``open_clip_text:<source>`` its
text transformer (or its custom text tower), each ending in the source's own projection, so
their ``pooled`` output is what ``encode_image`` / ``encode_text`` return. Both mark
themselves ``projected``: the CLIP task then adds no projection of its own.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmlightning.encoders.outputs import ImageConfig, TextOutput, VisionOutput
from mmlightning.encoders.weights import block_groups
from mmlightning.errors import UserError
from mmlightning.registry import PRETRAINED_CLIPS, TEXT_ENCODERS, VISION_ENCODERS, did_you_mean

SCHEMAS = ("local-dir:", "hf-hub:")


@dataclass(frozen=True)
class OpenCLIPSource:
    """A parsed source: ``model_name`` and ``pretrained`` as open_clip.create_model takes them."""

    text: str
    model_name: str
    pretrained: str | None

    @property
    def has_weights(self) -> bool:
        return self.pretrained is not None or self.model_name.startswith(SCHEMAS)


def parse_source(text: str, where: str) -> OpenCLIPSource:
    """Check the architecture, tag, file or folder now, naming the valid ones."""
    import open_clip

    if text.startswith("local-dir:"):
        folder = Path(text.removeprefix("local-dir:")).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"{where}: {text!r}: {folder} holds no open_clip_config.json (an open_clip model folder "
                            f"has it next to its weights, as `mml export --format open_clip` writes).")
        return OpenCLIPSource(text, f"local-dir:{folder}", None)
    if text.startswith("hf-hub:"):
        return OpenCLIPSource(text, text, None)
    arch, _, weights = text.partition("@")
    if arch not in open_clip.list_models():
        raise UserError(f"{where}: open_clip has no architecture {arch!r}.{did_you_mean(arch, open_clip.list_models())} "
                        f"Valid: {', '.join(open_clip.list_models())}.")
    if not weights:
        return OpenCLIPSource(text, arch, None)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if weights in tags:
        tag_cfg = open_clip.get_pretrained_cfg(arch, weights)
        if os.environ.get("HF_HUB_OFFLINE") == "1" and not tag_cfg.get("hf_hub") and not tag_cfg.get("file"):
            raise UserError(f"{where}: {text!r}: HF_HUB_OFFLINE=1 and these weights come by URL; give the file "
                            f"instead: open_clip:{arch}@/path/to/weights.")
        return OpenCLIPSource(text, arch, weights)
    path = Path(weights).expanduser()
    if path.is_file():
        return OpenCLIPSource(text, arch, str(path))
    looks_like_path = "/" in weights or path.suffix in (".pt", ".pth", ".bin", ".safetensors", ".npz")
    raise UserError(f"{where}: {text!r}: " + (f"no such file {weights!r}." if looks_like_path else
                    f"open_clip has no pretrained tag {weights!r} for {arch}.{did_you_mean(weights, tags)} "
                    f"Valid tags: {', '.join(tags) or '(none)'}; or give a weights file after the @."))


def load_model(source: OpenCLIPSource, load_weights: bool, where: str) -> tuple[nn.Module, dict[str, Any]]:
    """The whole open_clip model (fp32, CPU, eval) and its model config; errors name ``where``."""
    try:
        return _load_model(source, load_weights)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


@functools.lru_cache(maxsize=1)
def _load_model(source: OpenCLIPSource, load_weights: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Cached, as each tower and the task's logit scale read the same model: callers copy
    what they keep."""
    import open_clip

    weights_file = source.pretrained if source.pretrained and Path(source.pretrained).is_file() else None
    if not load_weights:  # else open_clip warns, on the root logger, that the weights it was told to skip are absent
        logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(source.model_name, pretrained=None if weights_file else source.pretrained,
                                       load_weights=load_weights, pretrained_text=False)
    except (RuntimeError, OSError, ValueError) as err:
        offline = " (HF_HUB_OFFLINE=1: only weights already in the cache load)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(f"open_clip:{source.text}: cannot load{offline}: {str(err).splitlines()[0]} "
                        f"Give a local file (open_clip:<arch>@/path/to/weights) or folder (open_clip:local-dir:/path).") from None
    finally:
        logging.disable(logging.NOTSET)
    if weights_file and load_weights:
        try:
            incompatible = open_clip.load_checkpoint(model, weights_file, strict=False)
        except RuntimeError as err:  # a tensor of another shape
            raise UserError(f"{weights_file}: does not fit open_clip's {source.model_name}: "
                            f"{str(err).splitlines()[-1].strip()}") from None
        # big_vision .npz files load through open_clip's converter, which reports nothing
        missing = list(getattr(incompatible, "missing_keys", []))
        unexpected = list(getattr(incompatible, "unexpected_keys", []))
        if missing or unexpected:
            raise UserError(f"{weights_file}: does not fit open_clip's {source.model_name}: missing "
                            f"{missing[:5]}, unexpected {unexpected[:5]} ({len(missing)} missing, "
                            f"{len(unexpected)} unexpected keys).")
    return model.float().eval(), model_config(source)


def model_config(source: OpenCLIPSource) -> dict[str, Any]:
    import open_clip

    if source.model_name.startswith("local-dir:"):
        folder = Path(source.model_name.removeprefix("local-dir:"))
        return json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    if source.model_name.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        return _get_hf_config(source.model_name.removeprefix("hf-hub:"))["model_cfg"]
    return open_clip.get_model_config(source.model_name)


def loaded(source_text: str, pretrained: bool, where: str) -> tuple[OpenCLIPSource, nn.Module, dict[str, Any]]:
    source = parse_source(source_text, where)
    model, cfg = load_model(source, pretrained and source.has_weights, where)
    return source, model, cfg


def image_config(model: nn.Module) -> ImageConfig:
    """open_clip's eval preprocessing as the framework's ImageConfig."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = pre.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    resize_mode = pre.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash"):
        raise UserError(f"open_clip preprocess resize_mode {resize_mode!r}: only 'shortest' and 'squash' are supported.")
    return ImageConfig(size=int(size), mean=tuple(pre.get("mean", OPENAI_DATASET_MEAN)),
                       std=tuple(pre.get("std", OPENAI_DATASET_STD)),
                       interpolation=pre.get("interpolation", "bicubic"), resize_mode=resize_mode)


@VISION_ENCODERS.register("open_clip_vision:")
class OpenCLIPVision(nn.Module):
    """``open_clip_vision:<source>``: an open_clip model's image tower with its projection
    (ViT, ResNet or timm trunk); ``pretrained: true`` loads the source's weights (as for every tower, nothing loads unasked);
    ``grad_checkpointing: true`` recomputes activations in the backward pass (open_clip's own switch)."""

    projected = True

    def __init__(self, source: str, pretrained: bool = False, grad_checkpointing: bool = False,
                 where: str = "model.vision") -> None:
        super().__init__()
        self.source, model, cfg = loaded(source, pretrained, f"{where}.name")
        self.model_config = cfg  # what export writes back as open_clip_config.json
        self.model = copy.deepcopy(model.visual)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if hasattr(self.model, "output_tokens"):
            self.model.output_tokens = True
        self.output_dim = int(cfg["embed_dim"])
        self.token_dim = int(cfg["vision_cfg"].get("width", self.output_dim)) if hasattr(self.model, "output_tokens") \
            else self.output_dim
        self.image_config = image_config(model)

    def forward(self, images: torch.Tensor) -> VisionOutput:
        out = self.model(images)
        pooled, tokens = out if isinstance(out, tuple) else (out, out.unsqueeze(1))
        return VisionOutput(pooled=pooled, tokens=tokens)

    def layer_groups(self) -> list[list[str]]:
        trunk = getattr(self.model, "trunk", None)
        if trunk is not None and hasattr(trunk, "group_matcher"):  # a timm trunk: timm's own groups, then the head
            from timm.models import group_parameters

            groups = group_parameters(trunk, trunk.group_matcher())
            named = [["model.trunk." + n for n in groups[i]] for i in sorted(groups)]
            rest = [f"model.{n}" for n, _ in self.model.named_parameters() if not n.startswith("trunk.")]
            return named + ([rest] if rest else [])
        return block_groups(self.model, "model.")


class OpenCLIPTokenizer:
    """open_clip's tokenizer (CLIP's BPE, or the HF tokenizer it wraps) behind the call the
    data modules make of an HF tokenizer. open_clip pads every text to the context length
    and ends a truncated text with the end-of-text token, as its models were trained."""

    pads_to_max_length = True

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length
        inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer
        self.pad_token_id = getattr(inner, "pad_token_id", None) if inner is not None else 0
        self.eot_token_id = getattr(tokenizer, "eot_token_id", None)  # CLIP's BPE: pads with 0, a real token too

    def __call__(self, texts: list[str], padding: str = "max_length", truncation: bool = True,
                 max_length: int | None = None, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(texts), context_length=max_length or self.context_length)
        if self.eot_token_id is not None:
            ends = (ids == self.eot_token_id).int().argmax(-1)
            mask = torch.arange(ids.shape[1])[None, :] <= ends[:, None]
        else:
            mask = ids != self.pad_token_id
        return {"input_ids": ids, "attention_mask": mask.long()}

    def __len__(self) -> int:
        inner = getattr(self.tokenizer, "tokenizer", None)
        return len(inner) if inner is not None else self.tokenizer.vocab_size

    def save_pretrained(self, folder: str | Path) -> None:
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(folder))


TEXT_TOWER_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "cls_emb")


@TEXT_ENCODERS.register("open_clip_text:")
class OpenCLIPText(nn.Module):
    """``open_clip_text:<source>``: an open_clip model's text tower with its projection: CLIP's
    causal transformer pooled at the end-of-text token, or the model's custom text tower (an HF
    encoder, SigLIP's); open_clip's tokenizer and context length. ``pretrained: true``
    loads the source's weights (as for every tower, nothing loads unasked);
    ``grad_checkpointing: true`` as for the image tower."""

    projected = True

    def __init__(self, source: str, pretrained: bool = False, grad_checkpointing: bool = False,
                 where: str = "model.text") -> None:
        super().__init__()
        import open_clip
        from open_clip.model import _build_text_tower

        self.source, model, cfg = loaded(source, pretrained, f"{where}.name")
        if hasattr(model, "text"):  # CustomTextCLIP: the tower is a module already
            self.model = copy.deepcopy(model.text)
            self.in_checkpoint = "text."
        else:  # CLIP keeps the text transformer's parts on the model itself, under the same names
            self.model = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], cfg.get("quick_gelu", False))
            source_state = model.state_dict()
            self.model.load_state_dict({k: source_state[k] for k in self.model.state_dict()})
            self.in_checkpoint = ""
        if hasattr(self.model, "output_tokens"):
            self.model.output_tokens = True
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        # the config's context length, as open_clip's tokenizer reads it (an HF text tower's
        # model.context_length is its position limit, e.g. 512)
        self.max_length = int(cfg["text_cfg"].get("context_length") or model.context_length)
        tokenizer_name = self.source.model_name if self.source.model_name.startswith(SCHEMAS) else \
            self.source.model_name.partition("@")[0]
        self.tokenizer = OpenCLIPTokenizer(open_clip.get_tokenizer(tokenizer_name, context_length=self.max_length),
                                           self.max_length)
        self.output_dim = int(cfg["embed_dim"])
        self.token_dim = int(getattr(self.model, "width", 0) or getattr(getattr(self.model, "config", None),
                                                                       "hidden_size", self.output_dim))

    def position_table(self) -> torch.Tensor | None:
        """(context length, width): CLIP's text position embeddings (None for a custom HF text tower)."""
        return getattr(self.model, "positional_embedding", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        out = self.model(input_ids)  # open_clip's towers find padding (and the end of text) from the ids
        pooled, tokens = out if isinstance(out, tuple) else (out, out.unsqueeze(1))
        mask = attention_mask.bool() if tokens.shape[1] == attention_mask.shape[1] else \
            torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return TextOutput(pooled=pooled, tokens=tokens, mask=mask)

    def input_embeddings(self) -> nn.Module:
        """CLIP's ``token_embedding``, or the HF encoder's word embeddings inside a custom tower."""
        if hasattr(self.model, "token_embedding"):
            return self.model.token_embedding
        return self.model.transformer.get_input_embeddings()


@PRETRAINED_CLIPS.register("open_clip:")
class OpenCLIPPretrained:
    """``open_clip:<source>``: both towers, their projections and the logit scale (and bias)
    of an open_clip model, e.g. ``open_clip:ViT-B-32@laion2b_s34b_b79k``."""

    def __init__(self, source: str, where: str = "model.pretrained") -> None:
        parsed = parse_source(source, where)
        if not parsed.has_weights:
            import open_clip

            tags = open_clip.list_pretrained_tags_by_model(parsed.model_name)
            raise UserError(f"{where}: open_clip:{source} names an architecture without weights: add @<tag> "
                            f"({', '.join(tags) or 'it has no tags'}) or @/path/to/weights, or build the towers "
                            f"with model.vision / model.text for fresh weights.")
        model, _ = load_model(parsed, True, where)
        self.vision = {"name": f"open_clip_vision:{source}", "pretrained": True}
        self.text = {"name": f"open_clip_text:{source}", "pretrained": True}
        self.logit_scale = float(model.logit_scale.detach().reshape(()))
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach().reshape(()))
