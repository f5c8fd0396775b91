"""Image captioning: a vision tower's tokens feed a text decoder through cross-attention.

image -> vision tower -> tokens (B, N, C) -> linear to decoder width ┐
BOS w1 w2 ... (teacher forcing) -> causal decoder with cross-attention ┴-> next-word logits

Training is teacher-forced next-token cross-entropy (``caption_lm`` loss). Evaluation
generates a caption per image (beam search by default) and scores it against all of the
image's references with COCO metrics (BLEU, ROUGE-L, CIDEr-D), exact match and the number of
distinct captions, which exposes a captioner that says one thing to every image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmlightning.data_modules.base import TaskData
from mmlightning.encoders.weights import freeze_tower
from mmlightning.errors import UserError
from mmlightning.metrics import CaptionMetrics
from mmlightning.registry import LOSSES, TASKS, TEXT_DECODERS, VISION_ENCODERS, did_you_mean
from mmlightning.report_blocks import section, table
from mmlightning.tasks.base import DataSpec, TaskModule

SAMPLES_PER_TABLE = 16
DEFAULT_GENERATION = {"num_beams": 3, "max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0,
                      "do_sample": False, "top_p": 1.0}


@TASKS.register("caption")
class CaptionTask(TaskModule):
    """Image captioning: a vision tower's tokens into a text decoder by cross-attention; generated captions scored by BLEU, ROUGE-L and CIDEr-D."""

    leaves_parameters_unused = True  # heads that read only tokens leave the towers' pooling idle

    def __init__(self, vision: dict[str, Any], decoder: dict[str, Any], loss: dict[str, Any],
                 optimizer: dict[str, Any], scheduler: dict[str, Any] | None = None,
                 generation: dict[str, Any] | None = None, init_from: str | None = None,
                 freeze_vision: bool = False, unfrozen_vision_groups: int = 0) -> None:
        super().__init__(optimizer, scheduler)
        self.vision = VISION_ENCODERS.build(vision, "model.vision")
        if init_from:
            self.init_towers_from(init_from, {"vision": self.vision})
        freeze_tower(self.vision, freeze_vision, unfrozen_vision_groups, "model.freeze_vision")
        self.decoder = TEXT_DECODERS.build(decoder, "model.decoder")
        self.bridge = nn.Sequential(nn.Linear(self.vision.token_dim, self.decoder.hidden_size),
                                    nn.LayerNorm(self.decoder.hidden_size))
        self.loss_fn = LOSSES.build(loss, "loss")
        self.generation = generation_options(generation)
        if self.generation["max_new_tokens"] + 1 > self.decoder.max_length:
            raise UserError(f"model.generation.max_new_tokens={self.generation['max_new_tokens']} plus BOS exceeds "
                              f"the decoder's max_length {self.decoder.max_length} (its position table).")
        self.caption_metrics = {"val": CaptionMetrics(), "test": CaptionMetrics()}

    def data_spec(self) -> DataSpec:
        return DataSpec(self.decoder.tokenizer, self.decoder.max_length, self.vision.image_config)

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.bridge(self.vision(images).tokens)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.decoder(batch["input_ids"], batch["attention_mask"], self.visual_tokens(batch["image"]))
        loss = self.loss_fn(logits, batch["input_ids"], batch["attention_mask"])
        self.log("train/loss", loss)
        return loss

    @torch.no_grad()
    def caption(self, images: torch.Tensor, **options: Any) -> list[str]:
        """Captions for a batch of prepared images; ``options`` override the recipe's
        ``model.generation`` (e.g. ``num_beams=1`` for greedy)."""
        ids = self.decoder.generate(self.visual_tokens(images), **{**self.generation, **options})
        return [t.strip() for t in self.decoder.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ------------------------------------------------------------------ evaluation
    def evaluate_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        captions = self.caption(batch["image"])
        self.caption_metrics[stage].update(batch["image_id"], captions, batch["references"])
        if batch_idx == 0:
            self._table_rows = [[batch["image"][i], captions[i], " | ".join(batch["references"][i])]
                                for i in range(min(SAMPLES_PER_TABLE, len(captions)))]

    def evaluate_epoch_end(self, stage: str) -> None:
        scores = self.caption_metrics[stage].compute()
        self.caption_metrics[stage].reset()
        self.log_dict({f"{stage}/{k}": float(v) for k, v in scores.items()}, sync_dist=False)
        if getattr(self, "_table_rows", None):
            self.log_samples(f"{stage}/samples", ["image", "generated", "references"], self._table_rows)
            self._table_rows = []

    def predict_images(self, images: torch.Tensor, datamodule: TaskData) -> list[str]:
        return self.caption(images.to(self.device))

    def report_sections(self, test_metrics: dict[str, float]) -> list[dict[str, Any]]:
        m = test_metrics
        return [section("Captioning (test split)", {k: m[k] for k in ("BLEU-4", "CIDEr-D") if k in m},
                        [table(["metric", "value"], [[k, v] for k, v in m.items()])],
                        [f"Generation: {self.generation}. BLEU and CIDEr-D as pycocoevalcap computes them "
                         "(tests compare), on PTB-style tokenised captions."])]


def generation_options(options: dict[str, Any] | None, defaults: dict[str, Any] = DEFAULT_GENERATION) -> dict[str, Any]:
    """The recipe's ``model.generation`` over a task's ``defaults``, each key checked."""
    merged = dict(defaults)
    for key, value in (options or {}).items():
        if key not in DEFAULT_GENERATION and key not in ("top_k", "temperature", "repetition_penalty",
                                                         "no_repeat_ngram_size"):
            raise UserError(f"model.generation.{key}: unknown option.{did_you_mean(key, list(DEFAULT_GENERATION))} "
                              f"Valid: {', '.join(DEFAULT_GENERATION)}, top_k, temperature, "
                              f"repetition_penalty, no_repeat_ngram_size.")
        merged[key] = value
    if merged["num_beams"] < 1 or merged["max_new_tokens"] < 1:
        raise UserError(f"model.generation: num_beams and max_new_tokens must be >= 1, got "
                          f"{merged['num_beams']} and {merged['max_new_tokens']}.")
    return merged
