"""Tiny pretrained-format CLIPs for tests, written the way each library saves them: an open_clip
model folder (open_clip_config.json + weights), HF CLIPModel and SiglipModel folders
(save_pretrained), each with fresh weights and its library's own tokenizer and preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import torch

OPEN_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                  "interpolation": "bicubic", "resize_mode": "shortest"}


def open_clip_folder(out: Path, logit_bias: float | None = None, seed: int = 0) -> Path:
    """A tiny open_clip CLIP (ViT + causal text transformer, CLIP's BPE) as a local-dir folder."""
    import open_clip

    cfg = dict(OPEN_CLIP_CFG, **({"init_logit_bias": logit_bias} if logit_bias is not None else {}))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    with torch.no_grad():  # away from the init value, so a test sees it was loaded
        model.logit_scale.fill_(3.1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": PREPROCESS_CFG}))
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    return out


def clip_tokenizer(out: Path):
    """HF's CLIPTokenizer over CLIP's own BPE vocabulary (the file open_clip ships)."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = open_clip.SimpleTokenizer()
    out.mkdir(parents=True, exist_ok=True)
    # open_clip names the two special tokens <start_of_text> and <end_of_text>; HF (and OpenAI) <|...|>
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (out / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>")


def hf_folder(out: Path, model_type: str = "clip", seed: int = 0) -> Path:
    """A tiny HF CLIPModel or SiglipModel, saved with its tokenizer and image processor."""
    import transformers as tf

    towers = {"text_config": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "max_position_embeddings": 16},
              "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "image_size": 32, "patch_size": 8}}
    torch.manual_seed(seed)
    if model_type == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(**towers, projection_dim=24))
        images = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = tf.SiglipModel(tf.SiglipConfig(**towers))
        images = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
        with torch.no_grad():
            model.logit_bias.fill_(-7.5)
    with torch.no_grad():
        model.logit_scale.fill_(3.3)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer = clip_tokenizer(out / "_bpe")
    tokenizer.save_pretrained(out)
    images.save_pretrained(out)
    return out
