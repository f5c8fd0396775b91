"""Visual question answering as classification over an answer vocabulary.

image -> vision tower ┐
                      ├─ fusion head -> answer classifier -> logits over the data's answers
question -> text tower┘

The answer vocabulary comes from the training data (``bind_data``), so the classifier is
built once the data module exists. Accuracy is the official VQA rule: data modules give, for
each question, the score each vocabulary answer would earn (``batch["accuracy"]``), and the
blind baseline (the most common training answer for the question's type) is scored the same
way, so the report shows what looking at the image adds.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from mmlightning.data_modules.base import AnswerVocabulary
from mmlightning.encoders.weights import freeze_tower
from mmlightning.errors import UserError
from mmlightning.metrics import VQAAccuracy
from mmlightning.registry import FUSION_HEADS, LOSSES, TASKS, TEXT_ENCODERS, VISION_ENCODERS
from mmlightning.report_blocks import section, table
from mmlightning.tasks.base import DataSpec, TaskModule

SAMPLES_PER_TABLE = 16


@TASKS.register("vqa")
class VQATask(TaskModule):
    """Visual question answering as classification over the data's answers, through a fusion head; VQA accuracy per question type beside a blind baseline."""

    leaves_parameters_unused = True  # heads that read only tokens leave the towers' pooling idle

    def __init__(self, vision: dict[str, Any], text: dict[str, Any], fusion: dict[str, Any], loss: dict[str, Any],
                 optimizer: dict[str, Any], scheduler: dict[str, Any] | None = None, classifier_hidden: int = 512,
                 dropout: float = 0.1, init_from: str | None = None, freeze_vision: bool = False,
                 unfrozen_vision_groups: int = 0, freeze_text: bool = False, unfrozen_text_groups: int = 0) -> None:
        super().__init__(optimizer, scheduler)
        self.vision = VISION_ENCODERS.build(vision, "model.vision")
        self.text = TEXT_ENCODERS.build(text, "model.text")
        widths = {"vision_dim": self.vision.output_dim, "vision_token_dim": self.vision.token_dim,
                  "text_dim": self.text.output_dim, "text_token_dim": self.text.token_dim}
        FUSION_HEADS.check(fusion, "model.fusion")
        head_params = inspect.signature(FUSION_HEADS.get(str(fusion["name"]))).parameters
        self.fusion = FUSION_HEADS.build(fusion, "model.fusion", **{k: v for k, v in widths.items() if k in head_params})
        if init_from:  # a CLIP run's towers; a fusion-pretraining run's fusion encoder as well
            self.init_towers_from(init_from, {"vision": self.vision, "text": self.text, "fusion": self.fusion},
                                  optional=("fusion",))
        freeze_tower(self.vision, freeze_vision, unfrozen_vision_groups, "model.freeze_vision")
        freeze_tower(self.text, freeze_text, unfrozen_text_groups, "model.freeze_text")
        self.loss_fn = LOSSES.build(loss, "loss")
        self.classifier_hidden, self.dropout = classifier_hidden, dropout
        self.classifier: nn.Module | None = None
        self.answers: list[str] = []
        self.metrics = nn.ModuleDict()

    def data_spec(self) -> DataSpec:
        return DataSpec(self.text.tokenizer, self.text.max_length, self.vision.image_config)

    def bind_data(self, datamodule: Any) -> None:
        """The classifier's width is the data's answer vocabulary; metrics group by the data's
        question types (answer types for VQAv2, question families for shapes)."""
        if not isinstance(datamodule, AnswerVocabulary):
            raise UserError(f"task vqa needs data with an answer vocabulary (answers, question_types, type_groups); "
                            f"data module {type(datamodule).__name__} has none. Data modules that have one: "
                            f"shapes_vqa, vqav2.")
        self.answers = list(datamodule.answers)
        self.classifier = nn.Sequential(
            nn.Linear(self.fusion.output_dim, self.classifier_hidden), nn.GELU(), nn.Dropout(self.dropout),
            nn.Linear(self.classifier_hidden, len(self.answers)),
        )
        self.type_names = list(datamodule.question_types)
        # optional coarser grouping of question types, e.g. relational vs non-relational
        groups: dict[str, list[str]] = dict(datamodule.type_groups)
        self.group_names = list(groups)
        lookup = torch.full((len(self.type_names),), -1, dtype=torch.long)
        for g, members in enumerate(groups.values()):
            for member in members:
                lookup[self.type_names.index(member)] = g
        self.register_buffer("type_to_group", lookup, persistent=False)
        for stage in ("val", "test"):
            self.metrics[f"{stage}_types"] = VQAAccuracy(self.type_names)
            self.metrics[f"{stage}_blind"] = VQAAccuracy(self.type_names)
            self.metrics[f"{stage}_groups"] = VQAAccuracy(self.group_names)
            self.metrics[f"{stage}_blind_groups"] = VQAAccuracy(self.group_names)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("VQATask.bind_data(datamodule) must run before forward: it sizes the answer classifier")
        fused = self.fusion(self.vision(images), self.text(input_ids, attention_mask))
        return self.classifier(fused)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"], batch["input_ids"], batch["attention_mask"])
        loss = self.loss_fn(logits, batch["target"])
        self.log("train/loss", loss)
        return loss

    # ------------------------------------------------------------------ evaluation
    def evaluate_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        logits = self(batch["image"], batch["input_ids"], batch["attention_mask"])
        prediction = logits.argmax(dim=-1)
        score = batch["accuracy"].gather(1, prediction[:, None]).squeeze(1)
        blind = batch["accuracy"].gather(1, batch["blind_answer"][:, None]).squeeze(1)
        types, ids = batch["question_type"], batch["question_id"]
        self.metrics[f"{stage}_types"].update(score, types, ids)
        self.metrics[f"{stage}_blind"].update(blind, types, ids)
        groups = self.type_to_group[types]
        keep = groups >= 0
        self.metrics[f"{stage}_groups"].update(score[keep], groups[keep], ids[keep])
        self.metrics[f"{stage}_blind_groups"].update(blind[keep], groups[keep], ids[keep])
        if batch_idx == 0:
            self._table_rows = [
                [batch["image"][i], batch["question"][i], self.answers[int(prediction[i])], batch["answer"][i],
                 float(score[i])]
                for i in range(min(SAMPLES_PER_TABLE, len(prediction)))
            ]

    def evaluate_epoch_end(self, stage: str) -> None:
        metrics = {f"{stage}/{k}": v for k, v in self.metrics[f"{stage}_types"].compute().items()}
        metrics.update({f"{stage}/blind_{k}": v for k, v in self.metrics[f"{stage}_blind"].compute().items()})
        if self.group_names:
            grouped = self.metrics[f"{stage}_groups"].compute()
            metrics.update({f"{stage}/{k}": v for k, v in grouped.items() if k != "acc"})
            grouped = self.metrics[f"{stage}_blind_groups"].compute()
            metrics.update({f"{stage}/blind_{k}": v for k, v in grouped.items() if k != "acc"})
        for name in ("types", "blind", "groups", "blind_groups"):
            self.metrics[f"{stage}_{name}"].reset()
        self.log_dict(metrics)
        if getattr(self, "_table_rows", None):
            self.log_samples(f"{stage}/samples", ["image", "question", "predicted", "answer", "accuracy"],
                             self._table_rows)
            self._table_rows = []

    def summary_rows(self, test_metrics: dict[str, float]) -> tuple[list[str], list[list[str]]]:
        """Each accuracy beside what the same model scores blind to the image."""
        blind = {k.replace("/blind_", "/", 1): v for k, v in test_metrics.items() if "/blind_" in k}
        rows = [[key, f"{value:.4f}", f"{blind[key]:.4f}" if key in blind else ""]
                for key, value in test_metrics.items() if "/blind_" not in key]
        return ["metric", "value", "blind baseline"], rows

    def report_sections(self, test_metrics: dict[str, float]) -> list[dict[str, Any]]:
        m = test_metrics
        names = ["all", *self.type_names, *self.group_names]
        rows = [[name, m[key], m.get(f"blind_{key}", float("nan"))]
                for name in names if (key := "acc" if name == "all" else f"acc_{name}") in m]
        headline = {"VQA accuracy": m["acc"], "VQA blind baseline": m["blind_acc"]}
        headline.update({f"VQA {g}": m[f"acc_{g}"] for g in self.group_names if f"acc_{g}" in m})
        return [section("VQA accuracy (test split)", headline,
                        [table(["question type", "model", "blind baseline"], rows)],
                        ["Official VQA accuracy: min(1, matching annotators / 3), averaged over the 10 "
                         "leave-one-out sets of 9 annotators. Blind baseline: the most common training answer "
                         "for the question's type, without the image."])]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vqa_answers"] = self.answers

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("vqa_answers")
        if saved is not None and saved != self.answers:
            raise UserError(f"the checkpoint's answer vocabulary ({len(saved)} answers, first {saved[:5]}) differs "
                              f"from this data's ({len(self.answers)}, first {self.answers[:5]}): the classifier "
                              f"rows would mean different answers. Use the data the checkpoint was trained on.")
