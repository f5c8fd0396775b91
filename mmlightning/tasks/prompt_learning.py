"""Prompt learning on a frozen CLIP (CoOp, CoCoOp): class prompts with learned context
vectors, scored against image embeddings as zero-shot CLIP scores its hand-written prompts.

image -> CLIP image tower + projection (frozen) -> normalised embedding ─┐
                                                                          ├─ scale * cosine -> logits
class names -> prompt learner (model.prompt) -> CLIP text tower (frozen) ─┘

Only the learner trains (its context vectors, and CoCoOp's meta-network); every CLIP weight
stays as loaded. The learner's prompts are rebuilt from the data's class names at every
start, so a checkpoint trained on one set of classes can be tested on another
(``data.class_subset=new``: CoCoOp's base-to-new protocol).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlightning.encoders.text import token_embeddings_replaced
from mmlightning.encoders.weights import freeze_tower
from mmlightning.metrics import TopKAccuracy
from mmlightning.registry import LOSSES, PROMPT_LEARNERS, TASKS
from mmlightning.report_blocks import section, table
from mmlightning.tasks.base import DataSpec, TaskModule, most_probable_classes
from mmlightning.tasks.classification import class_names
from mmlightning.tasks.clip import load_clip


@TASKS.register("prompt_learning")
class PromptLearningTask(TaskModule):
    """Prompt learning (CoOp, CoCoOp) on a frozen CLIP: only the prompt's context vectors (and meta-network) train; top-1/5 accuracy."""

    epoch_line_metrics = ("top1", "top5")

    def __init__(self, clip: str, prompt: dict[str, Any], loss: dict[str, Any], optimizer: dict[str, Any],
                 scheduler: dict[str, Any] | None = None) -> None:
        super().__init__(optimizer, scheduler)
        PROMPT_LEARNERS.check(prompt, "model.prompt")  # a typo fails before the CLIP loads
        source = load_clip(clip, "model.clip")
        self.vision, self.vision_proj = source.vision, source.vision_proj
        self.text, self.text_proj = source.text, source.text_proj
        for part in (self.vision, self.vision_proj, self.text, self.text_proj):
            freeze_tower(part, True)
        self.register_buffer("temperature_scale", source.temperature_scale().detach().clone())  # exp(logit scale)
        self.embed_dim = source.embed_dim
        self.prompt_spec = dict(prompt)
        self.prompt: nn.Module | None = None
        self.loss_fn = LOSSES.build(loss, "loss")
        self.classnames: list[str] = []
        self.accuracy = nn.ModuleDict()

    def data_spec(self) -> DataSpec:
        return DataSpec(self.text.tokenizer, self.text.max_length, self.vision.image_config)

    def bind_data(self, datamodule: Any) -> None:
        self.classnames, _ = class_names(datamodule, "prompt_learning")
        given = {"classnames": self.classnames, "text": self.text, "image_dim": self.embed_dim}
        takes = inspect.signature(PROMPT_LEARNERS.get(str(self.prompt_spec["name"]))).parameters
        self.prompt = PROMPT_LEARNERS.build(self.prompt_spec, "model.prompt",
                                            **{k: v for k, v in given.items() if k in takes})
        k = len(self.classnames)
        self.accuracy = nn.ModuleDict({s: TopKAccuracy(k, top_k=(1, min(5, k))) for s in ("val", "test")})

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's normalised image embedding (also what ``mml eval``'s probes fit)."""
        return F.normalize(self.vision_proj(self.vision(images).pooled).float(), dim=-1)

    def class_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings of prompts given as input embeddings (..., T, C)."""
        lead = embeddings.shape[:-2]
        flat = embeddings.reshape(-1, *embeddings.shape[-2:])
        repeat = flat.shape[0] // self.prompt.input_ids.shape[0]
        ids = self.prompt.input_ids.repeat(repeat, 1)
        mask = self.prompt.attention_mask.repeat(repeat, 1)
        with token_embeddings_replaced(self.text, flat):
            pooled = self.text(ids, mask).pooled
        return F.normalize(self.text_proj(pooled).float(), dim=-1).reshape(*lead, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.prompt is None:
            raise RuntimeError("PromptLearningTask.bind_data(datamodule) must run before forward: it builds the prompts")
        image = self.image_features(images)
        text = self.class_features(self.prompt(image))  # (K, D), or (B, K, D) for image-conditioned prompts
        logits = image @ text.T if text.ndim == 2 else torch.einsum("bd,bkd->bk", image, text)
        return self.temperature_scale * logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        targets = F.one_hot(batch["label"], len(self.classnames)).float()
        loss = self.loss_fn(self(batch["image"]), targets)
        self.log("train/loss", loss)
        return loss

    def evaluate_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> None:
        self.accuracy[stage].update(self(batch["image"]), batch["label"], batch["sample_id"])

    def evaluate_epoch_end(self, stage: str) -> None:
        metrics = {f"{stage}/{k}": v for k, v in self.accuracy[stage].compute().items()}
        self.accuracy[stage].reset()
        self.log_dict(metrics)

    def predict_images(self, images: torch.Tensor, datamodule: Any) -> list[str]:
        return most_probable_classes(self(images.to(self.device)), self.classnames)

    def report_sections(self, test_metrics: dict[str, float]) -> list[dict[str, Any]]:
        m = test_metrics
        return [section("Prompt learning (test split)", {"top-1": m["top1"]},
                        [table(["metric", "value"], [[k, v] for k, v in m.items()])],
                        [f"{self.prompt_spec['name']} on a frozen CLIP, over {len(self.classnames)} classes."])]
