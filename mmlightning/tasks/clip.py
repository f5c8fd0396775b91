"""CLIP-style contrastive pretraining: two towers, two projections, one contrastive loss.

Evaluation embeds the whole split once and reports image<->text recall@K and zero-shot
classification from the data module's class prompts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlightning.encoders.tokenizers import tokenize
from mmlightning.encoders.weights import freeze_tower
from mmlightning.metrics import RetrievalRecall, ZeroShotAccuracy
from mmlightning.registry import LOSSES, PROJECTIONS, TASKS, TEXT_ENCODERS, VISION_ENCODERS
from mmlightning.tasks.base import DataSpec, TaskModule

MAX_LOGIT_SCALE = math.log(100.0)  # temperature never below 1/100, as in CLIP


@TASKS.register("clip")
class CLIPTask(TaskModule):
    def __init__(self, vision: dict[str, Any], text: dict[str, Any], loss: dict[str, Any], optimizer: dict[str, Any],
                 scheduler: dict[str, Any] | None = None, embed_dim: int = 256,
                 projection: dict[str, Any] | None = None, freeze_vision: bool = False,
                 unfrozen_vision_groups: int = 0, freeze_text: bool = False, unfrozen_text_groups: int = 0) -> None:
        super().__init__(optimizer, scheduler)
        self.vision = VISION_ENCODERS.build(vision, "model.vision")
        self.text = TEXT_ENCODERS.build(text, "model.text")
        # LiT ("locked-image tuning") freezes the image tower; unfrozen groups leave its last layers trainable
        freeze_tower(self.vision, freeze_vision, unfrozen_vision_groups, "model.freeze_vision")
        freeze_tower(self.text, freeze_text, unfrozen_text_groups, "model.freeze_text")
        projection = projection or {"name": "linear"}
        self.vision_proj = PROJECTIONS.build(projection, "model.projection", in_dim=self.vision.output_dim, out_dim=embed_dim)
        self.text_proj = PROJECTIONS.build(projection, "model.projection", in_dim=self.text.output_dim, out_dim=embed_dim)
        self.loss_fn = LOSSES.build(loss, "loss")
        self.logit_scale = nn.Parameter(torch.tensor(float(self.loss_fn.logit_scale_init)))
        bias = getattr(self.loss_fn, "logit_bias_init", None)
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self.retrieval = nn.ModuleDict({"val": RetrievalRecall(), "test": RetrievalRecall()})
        self.zero_shot: dict[str, ZeroShotAccuracy] = {}
        self.classifier: torch.Tensor | None = None

    def data_spec(self) -> DataSpec:
        return DataSpec(self.text.tokenizer, self.text.max_length, self.vision.image_config)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(self.vision(images).pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask).pooled), dim=-1)

    def temperature_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        image = self.encode_image(batch["image"])
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        scale = self.temperature_scale()
        loss = self.loss_fn(image, text, scale, caption_ids=batch.get("caption_id"), logit_bias=self.logit_bias)
        self.log("train/loss", loss)
        self.log("train/logit_scale", scale)
        return loss

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def build_zero_shot_classifier(self) -> None:
        spec = getattr(getattr(self.trainer, "datamodule", None), "zero_shot", None)
        self.classifier = None
        if spec is None:
            return
        prompts = spec.prompts()  # classes x templates
        flat = [p for per_class in prompts for p in per_class]
        embeddings = []
        for chunk in range(0, len(flat), 512):
            tokens = tokenize(self.text.tokenizer, flat[chunk:chunk + 512], self.text.max_length)
            embeddings.append(self.encode_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)))
        per_class = torch.cat(embeddings).view(len(prompts), len(spec.templates), -1).mean(1)
        self.classifier = F.normalize(per_class, dim=-1)
        for stage in ("val", "test"):
            self.zero_shot[stage] = ZeroShotAccuracy(len(prompts), spec.groups).to(self.device)

    def on_validation_epoch_start(self) -> None:
        self.build_zero_shot_classifier()

    def on_test_epoch_start(self) -> None:
        self.build_zero_shot_classifier()

    def evaluate_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> None:
        image = self.encode_image(batch["image"])
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        self.retrieval[stage].update(image, batch["image_id"], text, batch["text_image_id"], batch["caption_id"], batch["text_id"])
        if self.classifier is not None and "label" in batch:
            self.zero_shot[stage].update(image @ self.classifier.T, batch["label"])

    def evaluate_epoch_end(self, stage: str) -> None:
        metrics = dict(self.retrieval[stage].compute())
        self.retrieval[stage].reset()
        if self.classifier is not None:
            metrics.update({f"zs_{k}": v for k, v in self.zero_shot[stage].compute().items()})
            self.zero_shot[stage].reset()
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()})
