"""Export a trained CLIP or vlm checkpoint for use outside mmlightning.

``mml export runs/<run> --format FORMAT --out exported/`` writes a folder another library
loads, giving the same embeddings as the framework:

- ``open_clip``: ``open_clip.create_model_and_transforms("local-dir:exported/")`` loads it.
  ``open_clip_config.json`` (model and preprocessing config, with a timm image tower and an HF
  text tower as open_clip's own configs describe them), ``open_clip_pytorch_model.bin`` (the
  state dict, renamed) and ``text/`` (the text tower's HF config and tokenizer, which the model
  config points at).
- ``hf``: ``transformers.AutoModel.from_pretrained("exported/", trust_remote_code=True)`` loads
  it. ``config.json`` and ``model.safetensors`` of a small dual-encoder model whose code,
  ``hf_dual_encoder.py``, travels in the folder (transformers has no class that pools a text
  tower as mmlightning does: see that file), with the stock ``TimmWrapperModel`` and text model
  as towers; plus the tokenizer and ``preprocessor_config.json``, which ``AutoTokenizer``,
  ``AutoImageProcessor`` and ``AutoProcessor`` load, and the zero-shot-image-classification
  pipeline takes the folder as its model.

  A vlm run's ``hf`` folder holds its language model for transformers, its LoRA adapter for
  peft and its vision tower and projector (``to_hf_vlm``).

Both CLIP formats hold a timm image tower and an HF text tower, each with a bias-free linear
projection. What a format cannot express is refused with the reasons, before anything is
written.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmlightning import runs
from mmlightning.build import build_task
from mmlightning.encoders.chat import IMAGE_PLACEHOLDER
from mmlightning.encoders.hf_clip_towers import HFCLIPText, HFCLIPVision
from mmlightning.encoders.open_clip_towers import OpenCLIPText, OpenCLIPVision
from mmlightning.encoders.text import HFTextEncoder
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.encoders.vision import TimmEncoder
from mmlightning.errors import UserError
from mmlightning.fault_tolerance import load_checkpoint
from mmlightning.hf_dual_encoder import MMLDualEncoderConfig, MMLDualEncoderModel
from mmlightning.tasks.vlm import VLMTask

OPEN_CLIP_POOLING = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}


def load_task(checkpoint_or_run: str | Path) -> tuple[Any, Path]:
    """The task a checkpoint (or a run directory's best checkpoint) was trained as, with its
    weights: the recipe comes from the checkpoint itself."""
    path = runs.eval_checkpoint(checkpoint_or_run)
    checkpoint = load_checkpoint(path)
    cfg = checkpoint.get("mmlightning_recipe")
    if not cfg:
        raise UserError(f"{path}: not an mmlightning checkpoint (no recipe inside).")
    if cfg.get("task") not in ("clip", "vlm"):
        raise UserError(f"mml export writes CLIP and vlm models; {path} is a {cfg.get('task')!r} task.")
    model = dict(cfg["model"])  # the checkpoint overwrites every weight: fetch or read no pretrained ones
    vision, text = dict(model.get("vision") or {}), dict(model.get("text") or {})
    if str(vision.get("name", "")).startswith("timm:"):
        vision.update(checkpoint_path=None, checkpoint_remap=None)
    towers = [("vision", vision), ("text", text)] if cfg["task"] == "clip" else [("vision", vision)]
    if cfg["task"] == "vlm" and (model.get("lm") or {}).get("pretrained"):
        model["lm"] = {**model["lm"], "pretrained": False}
    for key, spec in towers:
        if model.get("pretrained") or "pretrained" in spec:  # configs and tokenizers still come from the source
            model[key] = {**spec, "pretrained": False}
    task = build_task({**cfg, "model": model}, load_pretrained=False)
    task.load_state_dict(checkpoint["state_dict"], strict=True)
    return task.eval(), path


def tower_problems(task: Any, format_name: str) -> list[str]:
    """What neither format can hold: both rebuild a timm image tower and an HF text tower, each
    followed by a bias-free linear projection."""
    spec = task.recipe["model"]
    problems = []
    if not isinstance(task.vision, TimmEncoder):
        problems.append(f"the image tower is {spec['vision']['name']!r}: {format_name}'s image towers are timm models")
    if not isinstance(task.text, HFTextEncoder):
        problems.append(f"the text tower is {spec['text']['name']!r}: {format_name}'s text towers are HF models")
    if (spec.get("projection") or {"name": "linear"})["name"] != "linear" or task.vision_proj.bias is not None:
        problems.append(f"model.projection must be linear without bias ({format_name}'s projections)")
    return problems


def refuse(format_name: str, problems: list[str]) -> None:
    if problems:
        raise UserError(f"cannot export to {format_name}: " + "; ".join(problems) + ".")


def renamed_state_dict(task: Any, renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """The task's weights under another library's names (prefix -> prefix); metric states
    are left out."""
    state = {}
    for key, value in task.state_dict().items():
        prefix = next((ours for ours in renames if key.startswith(ours)), None)
        if prefix is not None:
            state[renames[prefix] + key[len(prefix):]] = value
        elif key == "logit_scale":  # neither library clamps it: store what the model used
            state[key] = task.used_logit_scale().detach()
        elif key == "logit_bias":
            state[key] = value
    return state


def open_clip_config(task: Any, text_dir: Path) -> dict[str, Any]:
    """open_clip's model and preprocessing config for ``task``, or a UserError naming what
    open_clip's format has no way to say."""
    spec = task.recipe["model"]
    problems = tower_problems(task, "open_clip")
    if isinstance(task.vision, TimmEncoder):
        if spec["vision"].get("model_kwargs"):
            problems.append(f"model.vision.model_kwargs {spec['vision']['model_kwargs']}: open_clip builds a timm "
                            f"tower from its model name alone")
        elif spec["vision"].get("img_size") and getattr(task.vision.model, "patch_embed", None) is not None \
                and task.vision.model.default_cfg.get("input_size", [0, 0, 0])[-1] != spec["vision"]["img_size"]:
            problems.append(f"model.vision.img_size {spec['vision']['img_size']}: open_clip builds a timm transformer "
                            f"at its default size")
    if isinstance(task.vision, TimmEncoder) and task.vision.image_config.crop_pct != 1.0:
        image = task.vision.image_config
        problems.append(f"the image tower evaluates at crop_pct {image.crop_pct:g} (resize to "
                        f"{round(image.size / image.crop_pct)}, crop {image.size}), which open_clip's preprocessing "
                        f"cannot say (it resizes to the crop size): train with model.vision.crop_pct=1, or export "
                        f"--format hf, whose image processor can")
    if isinstance(task.text, HFTextEncoder) and task.text.pooling not in OPEN_CLIP_POOLING:
        problems.append(f"text pooling {task.text.pooling!r} has no open_clip pooler")
    if task.logit_bias is not None:
        problems.append("the loss has a logit bias (SigLIP): export it as a CLIP-loss model, or use open_clip's "
                        "SigLIP configs by hand")
    refuse("open_clip", problems)
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


def to_open_clip(task: Any, out: Path) -> tuple[Path, str]:
    if isinstance(task, VLMTask):
        refuse("open_clip", ["a vlm run is a vision tower, a projector and a causal LM, not a CLIP: use --format hf"])
    if isinstance(task.vision, OpenCLIPVision) or isinstance(task.text, OpenCLIPText):
        return to_open_clip_native(task, out)
    config = open_clip_config(task, out / "text")  # refuses before anything is written
    out.mkdir(parents=True, exist_ok=True)
    task.text.model.config.save_pretrained(out / "text")
    task.text.tokenizer.save_pretrained(out / "text")
    task.text.tokenizer.save_pretrained(out)  # open_clip.get_tokenizer("local-dir:...") reads the folder itself
    state = renamed_state_dict(task, {"vision.model.": "visual.trunk.", "vision_proj.": "visual.head.proj.",
                                      "text.model.": "text.transformer.", "text_proj.": "text.proj."})
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save(state, out / "open_clip_pytorch_model.bin")
    return out, f"open_clip.create_model_and_transforms('local-dir:{out}')"


def native_problems(task: Any, format_name: str, vision_cls: type, text_cls: type) -> list[str]:
    """Both towers the library's own, from one model, each keeping its own projection."""
    problems = []
    if not (isinstance(task.vision, vision_cls) and isinstance(task.text, text_cls)):
        problems.append(f"one tower is {format_name}'s own ({type(task.vision).__name__} + {type(task.text).__name__}): "
                        f"a model in {format_name}'s own layout needs both towers from one {format_name} model")
    elif task.vision.source != task.text.source:
        problems.append(f"the towers come from two models ({task.vision.source} and {task.text.source})")
    if not (isinstance(task.vision_proj, torch.nn.Identity) and isinstance(task.text_proj, torch.nn.Identity)):
        problems.append(f"a projection was added on top of a tower (model.embed_dim {task.embed_dim} is not the "
                        f"towers' own width)")
    return problems


def to_open_clip_native(task: Any, out: Path) -> tuple[Path, str]:
    """An open_clip model fine-tuned here, back in open_clip's own layout and config."""
    refuse("open_clip", native_problems(task, "open_clip", OpenCLIPVision, OpenCLIPText))
    model_cfg = copy.deepcopy(task.vision.model_config)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"visual.{k}": v for k, v in task.vision.model.state_dict().items()}
    state.update({f"{task.text.in_checkpoint}{k}": v for k, v in task.text.model.state_dict().items()})
    state["logit_scale"] = task.used_logit_scale().detach()
    if task.logit_bias is not None:
        state["logit_bias"] = task.logit_bias.detach()
    if model_cfg["text_cfg"].get("hf_model_name"):  # an HF text tower: its config and tokenizer travel along
        task.text.model.transformer.config.save_pretrained(out / "text")
        task.text.tokenizer.save_pretrained(out / "text")
        task.text.tokenizer.save_pretrained(out)  # where open_clip.get_tokenizer("local-dir:...") looks
        model_cfg["text_cfg"].update(hf_model_name=str((out / "text").resolve()),
                                     hf_tokenizer_name=str((out / "text").resolve()), hf_model_pretrained=False)
    image = task.vision.image_config
    preprocess = {"size": image.size, "mean": list(image.mean), "std": list(image.std),
                  "interpolation": image.interpolation, "resize_mode": image.resize_mode}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                          indent=2))
    torch.save(state, out / "open_clip_pytorch_model.bin")
    return out, f"open_clip.create_model_and_transforms('local-dir:{out}')"


def hf_native_model(task: Any) -> Any:
    """A stock ``CLIPModel`` / ``SiglipModel`` holding the task's weights, checked to embed as
    the task does."""
    import transformers as tf

    refuse("hf", native_problems(task, "HF", HFCLIPVision, HFCLIPText))
    vision, text = task.vision.model.config.to_dict(), task.text.model.config.to_dict()
    if task.vision.model_type == "clip":
        config = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=task.embed_dim,
                               logit_scale_init_value=float(task.used_logit_scale().detach()))
        model = tf.CLIPModel(config)
    else:
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision))
    state = {**whole_model_keys(task.vision.model), **whole_model_keys(task.text.model),
             "logit_scale": task.used_logit_scale().detach().reshape(model.logit_scale.shape)}
    if task.logit_bias is not None:
        state["logit_bias"] = task.logit_bias.detach().reshape(model.logit_bias.shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        refuse("hf", [f"the towers do not fill a {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"])
    return model.eval()


def whole_model_keys(tower: Any) -> dict[str, torch.Tensor]:
    """A tower's weights under the whole model's names: a tower class that holds its
    transformer as an attribute (``CLIPTextModelWithProjection.text_model``) has them already;
    one that is that transformer (transformers 5's ``SiglipTextModel``) needs its prefix."""
    prefix = tower.base_model_prefix
    state = tower.state_dict()
    return state if hasattr(tower, prefix) else {f"{prefix}.{k}": v for k, v in state.items()}


def to_hf_native(task: Any, out: Path) -> tuple[Path, str]:
    import transformers as tf
    from transformers.image_utils import PILImageResampling

    model = hf_native_model(task)
    image = task.vision.image_config
    resample = PILImageResampling.BILINEAR if image.interpolation == "bilinear" else PILImageResampling.BICUBIC
    if task.vision.model_type == "clip":
        images = tf.CLIPImageProcessor(size={"shortest_edge": int(round(image.size / image.crop_pct))},
                                       crop_size={"height": image.size, "width": image.size}, resample=resample,
                                       image_mean=list(image.mean), image_std=list(image.std))
    else:
        images = tf.SiglipImageProcessor(size={"height": image.size, "width": image.size}, resample=resample,
                                         image_mean=list(image.mean), image_std=list(image.std))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    task.text.tokenizer.save_pretrained(out)
    images.save_pretrained(out)
    return out, f"transformers.{type(model).__name__}.from_pretrained('{out}') (and AutoTokenizer, AutoImageProcessor)"


def timm_architecture(task: Any) -> str:
    return task.recipe["model"]["vision"]["name"].removeprefix("timm:")  # with its pretrained tag: it can set the size


def timm_model_args(task: Any) -> dict[str, Any]:
    """The keyword arguments TimmEncoder built its timm model with, for TimmWrapperConfig's
    ``model_args``: ``model_kwargs``, and ``img_size`` where the model takes one."""
    import timm

    spec = task.recipe["model"]["vision"]
    args = dict(spec.get("model_kwargs") or {})
    if spec.get("img_size"):
        try:  # as TimmEncoder does: convolutional nets take any size and have no img_size argument
            with torch.device("meta"):
                timm.create_model(timm_architecture(task), num_classes=0, img_size=spec["img_size"], **args)
            args["img_size"] = spec["img_size"]
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return args


def hf_config(task: Any) -> Any:
    """The exported model's config (``hf_dual_encoder.MMLDualEncoderConfig``), or a
    UserError naming what it cannot hold."""
    refuse("hf", tower_problems(task, "hf"))
    from transformers import TimmWrapperConfig

    # its label fields mean nothing to TimmWrapperModel, which always drops the classifier
    vision = TimmWrapperConfig(architecture=timm_architecture(task), model_args=timm_model_args(task) or None)
    text = task.text.model.config.to_dict()
    text.pop("_name_or_path", None)  # the training-time folder: the export is self-contained
    return MMLDualEncoderConfig(
        vision_config=vision, text_config=text, text_pooling=task.text.pooling,
        vision_embed_dim=task.vision_proj.in_features, projection_dim=task.vision_proj.out_features,
        logit_scale_init_value=task.used_logit_scale().item(),
        has_logit_bias=task.logit_bias is not None,
    )


def hf_model(task: Any) -> Any:
    """The exported model with the task's weights, checked to embed as the task does: a
    timm model TimmWrapperModel rebuilds differently is refused, not written."""
    config = hf_config(task)
    try:
        model = MMLDualEncoderModel(config).eval()
    except (TypeError, ValueError) as err:  # e.g. model_kwargs that TimmWrapperModel's own arguments collide with
        refuse("hf", [f"TimmWrapperModel cannot rebuild timm:{config.vision_config.architecture} with model_args "
                      f"{config.vision_config.model_args}: {err}"])
    state = renamed_state_dict(task, {"vision.model.": "vision_model.timm_model.", "vision_proj.": "visual_projection.",
                                      "text.model.": "text_model.", "text_proj.": "text_projection."})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        refuse("hf", [f"the rebuilt towers do not fit the checkpoint: missing {missing[:5]}, "
                      f"unexpected {unexpected[:5]}"])
    size = task.vision.image_config.size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    captions = ["a photo", "a longer caption, with padding to pool over"]
    tokens = tokenize(task.text.tokenizer, captions, task.text.max_length)
    try:
        with torch.no_grad():
            gaps = {"image": (model.get_image_features(images) - task.encode_image(images)).abs().max().item(),
                    "text": (model.get_text_features(**tokens) - task.encode_text(**tokens)).abs().max().item()}
    except (RuntimeError, TypeError, ValueError) as err:  # a tower the exported model cannot run as trained
        refuse("hf", [f"the rebuilt model cannot embed as the checkpoint does: {type(err).__name__}: "
                      f"{str(err).splitlines()[0]}"])
    refuse("hf", [f"the rebuilt {tower} tower's embeddings differ from the checkpoint's by up to {gap:.1e}"
                  for tower, gap in gaps.items() if gap > 1e-5])
    return model


def image_processor(task: Any) -> Any:
    """CLIPImageProcessor does what the framework's eval transform does: resize the short side
    to size / crop_pct, centre-crop, scale to [0, 1], normalize."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    image = task.vision.image_config
    # the framework resizes bilinearly when asked to and bicubically otherwise
    resample = PILImageResampling.BILINEAR if image.interpolation == "bilinear" else PILImageResampling.BICUBIC
    return CLIPImageProcessor(size={"shortest_edge": int(round(image.size / image.crop_pct))},
                              crop_size={"height": image.size, "width": image.size}, resample=resample,
                              image_mean=list(image.mean), image_std=list(image.std), do_convert_rgb=True)


def to_hf_vlm(task: VLMTask, out: Path) -> tuple[Path, str]:
    """A vlm run: ``lm/`` the language model with any LoRA merged in and its tokenizer (chat
    template and ``<image>`` token included), which transformers' Auto classes load;
    ``adapter/`` the LoRA adapter alone, which peft loads onto the base LM; the vision tower and
    projector in ``vision_projector.safetensors``, and in ``mmlightning_vlm.json`` how the
    three fit together (how many image tokens replace ``<image>``, the image preprocessing)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    task.lm.merged().save_pretrained(out / "lm")
    task.lm.tokenizer.save_pretrained(out / "lm")
    if task.lm.has_lora:
        task.lm.model.save_pretrained(str(out / "adapter"))
    weights = {f"{part}.{k}": v.detach().contiguous() for part in ("vision", "projector")
               for k, v in getattr(task, part).state_dict().items()}
    save_file(weights, str(out / "vision_projector.safetensors"))
    config = task.vision.image_config
    (out / "mmlightning_vlm.json").write_text(json.dumps({
        "model": (task.recipe or {}).get("model"), "image_token": IMAGE_PLACEHOLDER,
        "image_token_id": task.chat.image_token_id, "image_tokens": task.chat.image_tokens,
        "image_coordinates": task.image_coordinates is not None,
        "image": {"size": config.size, "mean": list(config.mean), "std": list(config.std),
                  "interpolation": config.interpolation, "crop_pct": config.crop_pct, "resize_mode": config.resize_mode},
        "how": "input embeddings = lm's token embeddings, with the positions of image_token (image_tokens of them, "
               "where the prompt's <image> was expanded) replaced by projector(vision(image).tokens), each token's "
               "grid (x, y) in [-1, 1] (row-major, x first) concatenated to it before the projector where "
               "image_coordinates is true",
    }, indent=2))
    adapter = f"; peft.PeftModel.from_pretrained(<base LM>, '{out / 'adapter'}')" if task.lm.has_lora else ""
    return out, f"transformers.AutoModelForCausalLM.from_pretrained('{out / 'lm'}') and AutoTokenizer likewise{adapter}"


def to_hf(task: Any, out: Path) -> tuple[Path, str]:
    from transformers import VisionTextDualEncoderProcessor

    if isinstance(task, VLMTask):
        return to_hf_vlm(task, out)
    if isinstance(task.vision, HFCLIPVision) or isinstance(task.text, HFCLIPText):
        return to_hf_native(task, out)
    model = hf_model(task)  # refuses before anything is written
    tokenizer = copy.deepcopy(task.text.tokenizer)  # saving a processor marks its tokenizer
    tokenizer.model_max_length = task.text.max_length  # truncation=True then cuts where training did
    images = image_processor(task)
    # register_for_auto_class makes save_pretrained copy hf_dual_encoder.py into the folder and
    # name it in config.json's auto_map, which trust_remote_code follows
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModel")
    # and the zero-shot-image-classification pipeline builds its model through this auto class
    model.config.auto_map = {"AutoModelForZeroShotImageClassification":
                             f"{type(model).__module__.rsplit('.', 1)[-1]}.{type(model).__name__}"}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # the processor (tokenizer + image processor, for AutoProcessor and pipelines) keeps its
    # image processor in processor_config.json; preprocessor_config.json is where
    # AutoImageProcessor, and transformers before 5, look
    VisionTextDualEncoderProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    images.save_pretrained(out)
    # AutoTokenizer and AutoProcessor read config.json too, and would ask before running its code
    return out, (f"transformers.AutoModel.from_pretrained('{out}', trust_remote_code=True), and its AutoTokenizer or "
                 f"AutoProcessor likewise (AutoImageProcessor needs no flag)")


FORMATS: dict[str, Callable[[Any, Path], tuple[Path, str]]] = {"open_clip": to_open_clip, "hf": to_hf}
"""Each format's writer: it writes the folder and says how to load it."""
