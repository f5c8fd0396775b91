"""Export a trained CLIP checkpoint for use outside mmlightning.

``mml export runs/<run> --format open_clip --out exported/`` writes a folder that
``open_clip.create_model_and_transforms("local-dir:exported/")`` loads, giving the same
embeddings: ``open_clip_config.json`` (model and preprocessing config, with a timm image
tower and an HF text tower as open_clip's own configs describe them),
``open_clip_pytorch_model.bin`` (the state dict, renamed) and ``text/`` (the text tower's HF
config and tokenizer, which the model config points at). What open_clip cannot express is
refused with the reason, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmlightning.registry import ConfigError
from mmlightning.tasks.clip import MAX_LOGIT_SCALE

OPEN_CLIP_POOLING = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}


def load_task(checkpoint_or_run: str | Path) -> tuple[Any, Path]:
    """The task a checkpoint (or a run directory's best checkpoint) was trained as, with its
    weights: the recipe comes from the checkpoint itself."""
    from mmlightning import runs
    from mmlightning.build import build_task

    path = runs.eval_checkpoint(checkpoint_or_run)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    cfg = checkpoint.get("mmlightning_recipe")
    if not cfg:
        raise ConfigError(f"{path}: not an mmlightning checkpoint (no recipe inside).")
    model = dict(cfg["model"])  # the checkpoint overwrites every weight: fetch or read no pretrained ones
    if str(model["vision"].get("name", "")).startswith("timm:"):
        model["vision"] = {**model["vision"], "pretrained": False, "checkpoint_path": None, "checkpoint_remap": None}
    if str(model.get("text", {}).get("name", "")).startswith("hf:"):
        model["text"] = {**model["text"], "pretrained": False}  # config and tokenizer still come from its folder
    task = build_task({**cfg, "model": model}, load_pretrained=False)
    task.load_state_dict(checkpoint["state_dict"], strict=True)
    return task.eval(), path


def open_clip_config(task: Any, text_dir: Path) -> dict[str, Any]:
    """open_clip's model and preprocessing config for ``task``, or a ConfigError naming what
    open_clip's format has no way to say."""
    from mmlightning.encoders.text import HFTextEncoder
    from mmlightning.encoders.vision import TimmEncoder

    spec = task.recipe["model"]
    problems = []
    if not isinstance(task.vision, TimmEncoder):
        problems.append(f"the image tower is {spec['vision']['name']!r}: open_clip's custom towers are timm models")
    elif spec["vision"].get("model_kwargs"):
        problems.append(f"model.vision.model_kwargs {spec['vision']['model_kwargs']}: open_clip builds a timm "
                        f"tower from its model name alone")
    elif spec["vision"].get("img_size") and getattr(task.vision.model, "patch_embed", None) is not None \
            and task.vision.model.default_cfg.get("input_size", [0, 0, 0])[-1] != spec["vision"]["img_size"]:
        problems.append(f"model.vision.img_size {spec['vision']['img_size']}: open_clip builds a timm transformer "
                        f"at its default size")
    if not isinstance(task.text, HFTextEncoder):
        problems.append(f"the text tower is {spec['text']['name']!r}: open_clip's custom text towers are HF models")
    elif task.text.pooling not in OPEN_CLIP_POOLING:
        problems.append(f"text pooling {task.text.pooling!r} has no open_clip pooler")
    if (spec.get("projection") or {"name": "linear"})["name"] != "linear" or task.vision_proj.bias is not None:
        problems.append("model.projection must be linear without bias (open_clip's 'linear' projections)")
    if task.logit_bias is not None:
        problems.append("the loss has a logit bias (SigLIP): export it as a CLIP-loss model, or use open_clip's "
                        "SigLIP configs by hand")
    if problems:
        raise ConfigError("cannot export to open_clip: " + "; ".join(problems) + ".")
    image = task.vision.image_config
    return {
        "model_cfg": {
            "embed_dim": task.vision_proj.out_features,
            "vision_cfg": {"image_size": image.size, "timm_model_name": task.vision.model.default_cfg["architecture"],
                           "timm_model_pretrained": False, "timm_pool": task.vision.model.global_pool
                           if isinstance(task.vision.model.global_pool, str) else "avg",
                           "timm_proj": "linear", "timm_proj_bias": False},
            "text_cfg": {"hf_model_name": str(text_dir.resolve()), "hf_tokenizer_name": str(text_dir.resolve()),
                         "hf_model_pretrained": False, "hf_proj_type": "linear",
                         "hf_pooler_type": OPEN_CLIP_POOLING[task.text.pooling], "context_length": task.text.max_length},
        },
        "preprocess_cfg": {"size": image.size, "mean": list(image.mean), "std": list(image.std),
                           "interpolation": image.interpolation, "resize_mode": "shortest"},
    }


def to_open_clip(task: Any, out: Path) -> Path:
    config = open_clip_config(task, out / "text")  # refuses before anything is written
    out.mkdir(parents=True, exist_ok=True)
    task.text.model.config.save_pretrained(out / "text")
    task.text.tokenizer.save_pretrained(out / "text")
    renames = {"vision.model.": "visual.trunk.", "vision_proj.": "visual.head.proj.", "text.model.": "text.transformer.",
               "text_proj.": "text.proj."}
    state = {}
    for key, value in task.state_dict().items():
        for ours, theirs in renames.items():
            if key.startswith(ours):
                state[theirs + key[len(ours):]] = value
                break
        else:
            if key == "logit_scale":  # open_clip does not clamp it: store what the model used
                state[key] = value.clamp(max=MAX_LOGIT_SCALE)
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save(state, out / "open_clip_pytorch_model.bin")
    return out
