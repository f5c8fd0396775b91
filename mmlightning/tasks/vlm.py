"""A generative vision-language model, LLaVA-style: the image's tokens, projected to the
language model's width, stand where the prompt holds ``<image>``; the LM writes the answer.

image -> vision tower -> tokens (B, N, C) -> projector -> (B, N, H) ┐ in place of the N image
conversation -> chat template -> token embeddings (B, T, H) ────────┴ positions -> causal LM

Training is next-token cross-entropy on the assistant's tokens only (``answer_lm``; prompt,
image and padding positions are -100). What trains is the recipe's choice, as LLaVA's two
stages: ``freeze_lm`` (stage 1: the projector alone, with ``freeze_vision``), ``lora`` (stage
2: the projector and peft LoRA adapters on the LM, its base weights unchanged) or neither (the
whole LM); ``lr_scale`` sets each part's learning rate relative to ``optimizer.lr``.

Evaluation generates an answer to each prompt: VQA items are scored by the official VQA
accuracy on the generated text, per question type and group, beside the blind baseline (the
most common training answer of the type) and, on the test split, beside the same model with
the image tokens zeroed (what reading the image adds); caption items by BLEU, ROUGE-L and
CIDEr-D.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmlightning.data_modules.base import Conversations, TaskData
from mmlightning.encoders.chat import ChatFormat, block_attention
from mmlightning.encoders.weights import freeze_tower
from mmlightning.errors import UserError
from mmlightning.fusion import coordinate_maps
from mmlightning.metrics import CaptionMetrics, VQAAccuracy
from mmlightning.metrics.vqa import vqa_accuracy
from mmlightning.registry import LANGUAGE_MODELS, LOSSES, PROJECTIONS, TASKS, VISION_ENCODERS
from mmlightning.report_blocks import section, table
from mmlightning.tasks.base import DataSpec, TaskModule
from mmlightning.tasks.captioning import generation_options

SAMPLES_PER_TABLE = 16
VLM_GENERATION = {"num_beams": 1, "max_new_tokens": 32, "min_new_tokens": 1, "length_penalty": 1.0,
                  "do_sample": False, "top_p": 1.0}


@TASKS.register("vlm")
class VLMTask(TaskModule):
    """Generative vision-language model (LLaVA-style): projected image tokens in a causal LM's prompt; generative VQA (official accuracy) and captioning (CIDEr-D)."""

    leaves_parameters_unused = True  # the LM reads the vision tower's tokens, never its pooled output
    answers_questions = True

    def __init__(self, vision: dict[str, Any], lm: dict[str, Any], projector: dict[str, Any], loss: dict[str, Any],
                 optimizer: dict[str, Any], scheduler: dict[str, Any] | None = None, max_length: int = 128,
                 init_from: str | None = None, freeze_vision: bool = True, unfrozen_vision_groups: int = 0,
                 freeze_lm: bool = False, lora: dict[str, Any] | None = None, lr_scale: dict[str, float] | None = None,
                 generation: dict[str, Any] | None = None, image_coordinates: bool = False) -> None:
        super().__init__(optimizer, scheduler)
        self.vision = VISION_ENCODERS.build(vision, "model.vision")
        self.lm = LANGUAGE_MODELS.build(lm, "model.lm")
        with torch.no_grad():  # how many tokens the vision tower gives an image: the prompt holds as many
            size = self.vision.image_config.size
            image_tokens = self.vision(torch.zeros(1, 3, size, size)).tokens.shape[1]
        coordinates = None
        if image_coordinates:
            side = round(image_tokens ** 0.5)
            if side * side != image_tokens:
                raise UserError(f"model.image_coordinates: the vision tower gives {image_tokens} tokens, not a square "
                                  f"grid whose cells have coordinates; leave it false for this tower.")
            grid = coordinate_maps(torch.zeros(1, 1, side, side))  # (1, 2, side, side)
            coordinates = grid.flatten(2).transpose(1, 2)  # (1, N, 2), row-major as the tower's tokens
        self.register_buffer("image_coordinates", coordinates, persistent=False)
        self.projector = PROJECTIONS.build(projector, "model.projector", out_dim=self.lm.hidden_size,
                                           in_dim=self.vision.token_dim + (2 if image_coordinates else 0))
        if init_from:  # a CLIP run's vision tower; a vlm run's projector and LM as well (stage 1 -> stage 2)
            self.init_towers_from(init_from, {"vision": self.vision, "projector": self.projector, "lm": self.lm},
                                  optional=("projector", "lm"))
        freeze_tower(self.vision, freeze_vision, unfrozen_vision_groups, "model.freeze_vision")
        if lora and freeze_lm:
            raise UserError("model.lora with model.freeze_lm=true: LoRA already keeps the LM's base weights fixed and "
                              "trains its adapters; freeze_lm=true trains the projector alone. Choose one.")
        if lora:
            self.lm.add_lora(dict(lora), "model.lora")
        elif freeze_lm:
            freeze_tower(self.lm, True, 0, "model.freeze_lm")
        if max_length > self.lm.max_positions:
            raise UserError(f"model.max_length={max_length} exceeds the language model's {self.lm.max_positions} "
                              f"positions.")
        self.chat = ChatFormat(self.lm.tokenizer, image_tokens, max_length)
        self.set_lr_scale(lr_scale)
        self.loss_fn = LOSSES.build(loss, "loss")
        self.generation = generation_options(generation, VLM_GENERATION)
        self.caption_metrics = {"val": CaptionMetrics(), "test": CaptionMetrics()}
        self.metrics = nn.ModuleDict()
        self.question_types: list[str] = []
        self.blind_answers: dict[str, str] = {}

    def data_spec(self) -> DataSpec:
        return DataSpec(self.chat, self.chat.max_length, self.vision.image_config)

    def bind_data(self, datamodule: Any) -> None:
        if not isinstance(datamodule, Conversations):
            raise UserError(f"task vlm needs conversation data (question_types, type_groups, blind_answers); data "
                              f"module {type(datamodule).__name__} has none. Data modules that have them: "
                              f"shapes_vlm, templated_conversations, llava_json.")
        self.question_types = list(datamodule.question_types)
        self.blind_answers = dict(datamodule.blind_answers)
        groups = dict(datamodule.type_groups)
        self.group_names = list(groups)
        lookup = torch.full((max(len(self.question_types), 1),), -1, dtype=torch.long)
        for g, members in enumerate(groups.values()):
            for member in members:
                lookup[self.question_types.index(member)] = g
        self.register_buffer("type_to_group", lookup, persistent=False)
        for stage in ("val", "test"):
            for name in ("types", "blind", "zeroed"):
                self.metrics[f"{stage}_{name}"] = VQAAccuracy(self.question_types)
            for name in ("groups", "blind_groups", "zeroed_groups"):
                self.metrics[f"{stage}_{name}"] = VQAAccuracy(self.group_names)

    # ------------------------------------------------------------------ the model
    def embed(self, images: torch.Tensor, input_ids: torch.Tensor, zero_image: bool = False) -> torch.Tensor:
        """The LM's input embeddings, the projected image tokens at the image positions
        (zeros there with ``zero_image``: the model blind to the image, same prompt)."""
        embeds = self.lm.embed(input_ids)
        tokens = self.vision(images).tokens
        if self.image_coordinates is not None:  # each grid cell's (x, y): what "left of" is read from
            coordinates = self.image_coordinates.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens, coordinates], dim=-1)
        image = self.projector(tokens).to(embeds.dtype)
        if zero_image:
            image = torch.zeros_like(image)
        return embeds.masked_scatter((input_ids == self.chat.image_token_id).unsqueeze(-1), image)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V)."""
        return self.lm(self.embed(images, input_ids), attention_mask)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if "segments" in batch:  # conversations packed around one image: each block sees the image and itself
            embeds = self.embed(batch["image"], batch["input_ids"])
            logits = self.lm(embeds, block_attention(batch["segments"], embeds.dtype), batch["position_ids"])
        else:
            logits = self(batch["image"], batch["input_ids"], batch["attention_mask"])
        loss = self.loss_fn(logits, batch["labels"])
        self.log("train/loss", loss)
        return loss

    @torch.no_grad()
    def answer(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               zero_image: bool = False, **options: Any) -> list[str]:
        """The generated answer to each left-padded prompt; ``options`` override the recipe's
        ``model.generation``."""
        ids = self.lm.generate(self.embed(images, input_ids, zero_image), attention_mask,
                               **{**self.generation, **options})
        return [t.strip() for t in self.lm.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def prompts(self, questions: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded generation prompts asking each question about an image."""
        from mmlightning.encoders.chat import IMAGE_PLACEHOLDER

        ids = [self.chat.encode_prompt([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{q}"}], f"question {q!r}")
               for q in questions]
        return {k: v.to(self.device) for k, v in self.chat.collate(ids, left=True).items()}

    # ------------------------------------------------------------------ evaluation
    def _update_vqa(self, stage: str, name: str, scores: list[float], types: torch.Tensor, ids: torch.Tensor) -> None:
        score = torch.tensor(scores, device=self.device)
        self.metrics[f"{stage}_{'types' if name == '' else name}"].update(score, types, ids)
        groups = self.type_to_group[types]
        keep = groups >= 0
        self.metrics[f"{stage}_{'groups' if name == '' else name + '_groups'}"].update(score[keep], groups[keep], ids[keep])

    def evaluate_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        answers = self.answer(batch["image"], batch["input_ids"], batch["attention_mask"])
        rows = [k for k, kind in enumerate(batch["kind"]) if kind == "vqa"]
        if rows:
            at = torch.tensor(rows, device=self.device)
            types, ids = batch["question_type"][at], batch["item_id"][at]
            refs = [batch["references"][k] for k in rows]
            self._update_vqa(stage, "", [vqa_accuracy(answers[k], r) for k, r in zip(rows, refs)], types, ids)
            blind = [self.blind_answers.get(self.question_types[int(t)], "") for t in types.tolist()]
            self._update_vqa(stage, "blind", [vqa_accuracy(b, r) for b, r in zip(blind, refs)], types, ids)
            if stage == "test":  # the same prompts with the image tokens zeroed
                zeroed = self.answer(batch["image"][at], batch["input_ids"][at], batch["attention_mask"][at],
                                     zero_image=True)
                self._update_vqa(stage, "zeroed", [vqa_accuracy(z, r) for z, r in zip(zeroed, refs)], types, ids)
        captions = [k for k, kind in enumerate(batch["kind"]) if kind == "caption"]
        if captions:
            self.caption_metrics[stage].update([int(batch["item_id"][k]) for k in captions],
                                               [answers[k] for k in captions], [batch["references"][k] for k in captions])
        if batch_idx == 0:
            self._table_rows = [[batch["image"][k], batch["prompt"][k], answers[k], " | ".join(batch["references"][k])]
                                for k in range(min(SAMPLES_PER_TABLE, len(answers)))]

    def evaluate_epoch_end(self, stage: str) -> None:
        metrics: dict[str, Any] = {}
        for name, prefix in (("types", ""), ("blind", "blind_"), ("zeroed", "zeroed_image_")):
            if not self.question_types or (stage != "test" and name == "zeroed"):
                continue  # data without VQA items (captions only) logs no accuracy rather than a 0
            computed = self.metrics[f"{stage}_{name}"].compute()
            metrics.update({f"{stage}/{prefix}{k}": v for k, v in computed.items()})
            if self.group_names:
                grouped = self.metrics[f"{stage}_{'groups' if name == 'types' else name + '_groups'}"].compute()
                metrics.update({f"{stage}/{prefix}{k}": v for k, v in grouped.items() if k != "acc"})
        for key in list(self.metrics):
            if key.startswith(f"{stage}_"):
                self.metrics[key].reset()
        captions = self.caption_metrics[stage].compute(allow_empty=True)
        self.caption_metrics[stage].reset()
        metrics.update({f"{stage}/{k}": float(v) for k, v in captions.items()})
        self.log_dict(metrics)
        if getattr(self, "_table_rows", None):
            self.log_samples(f"{stage}/samples", ["image", "prompt", "generated", "references"], self._table_rows)
            self._table_rows = []

    def predict_images(self, images: torch.Tensor, datamodule: TaskData, question: str | None = None) -> list[str]:
        """The answer to ``question`` about each image; without one, the data's caption
        prompt (a caption)."""
        question = question or getattr(datamodule, "caption_prompt", None) or "describe the image"
        return self.answer(images.to(self.device), **self.prompts([question] * len(images)))

    def summary_rows(self, test_metrics: dict[str, float]) -> tuple[list[str], list[list[str]]]:
        """Each VQA accuracy beside the blind baseline and the model with its image zeroed."""
        other = {}
        for tag in ("blind", "zeroed_image"):
            other[tag] = {k.replace(f"/{tag}_", "/", 1): v for k, v in test_metrics.items() if f"/{tag}_" in k}
        rows = [[key, f"{value:.4f}", *(f"{other[t][key]:.4f}" if key in other[t] else "" for t in other)]
                for key, value in test_metrics.items() if "/blind_" not in key and "/zeroed_image_" not in key]
        return ["metric", "value", "blind baseline", "image zeroed"], rows

    def report_sections(self, test_metrics: dict[str, float]) -> list[dict[str, Any]]:
        m = test_metrics
        names = ["all", *self.question_types, *self.group_names]
        rows = [[name, m[key], m.get(f"blind_{key}", float("nan")), m.get(f"zeroed_image_{key}", float("nan"))]
                for name in names if (key := "acc" if name == "all" else f"acc_{name}") in m]
        headline = {k: m[k] for k in ("acc", "blind_acc", "zeroed_image_acc", "CIDEr-D", "BLEU-4") if k in m}
        return [section("Generative VQA and captioning (test split)", headline,
                        [table(["question type", "model", "blind baseline", "image zeroed"], rows),
                         table(["metric", "value"], [[k, v] for k, v in m.items() if k[:4] in ("BLEU", "ROUG", "CIDE")])],
                        ["VQA: the official accuracy (vqaEval.py's normalisation and leave-one-out rule) of the "
                         "generated text. Captions: pycocoevalcap's BLEU, ROUGE-L and CIDEr-D. Generation: "
                         f"{self.generation}."])]

    # ------------------------------------------------------------------ adapters
    def save_adapter(self, folder: str | Path) -> Path:
        """What stage 2 trained, in a folder peft and torch load: the LoRA adapter
        (``adapter_config.json``, ``adapter_model.safetensors``: ``PeftModel.from_pretrained``)
        and the projector's weights (``projector.pt``)."""
        if not self.lm.has_lora:
            raise UserError("save_adapter: this model has no LoRA adapter (model.lora is not set).")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.lm.model.save_pretrained(str(folder))
        torch.save(self.projector.state_dict(), folder / "projector.pt")
        return folder

    def load_adapter(self, folder: str | Path) -> None:
        """The adapter and projector ``save_adapter`` wrote, into this model's LoRA and projector."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        if not self.lm.has_lora:
            raise UserError(f"load_adapter: this model has no LoRA adapter to load {folder} into (set model.lora).")
        result = set_peft_model_state_dict(self.lm.model, load_file(str(folder / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise UserError(f"load_adapter: {folder}: adapter weights this model has no place for: "
                              f"{result.unexpected_keys[:3]}.")
        self.projector.load_state_dict(torch.load(folder / "projector.pt", map_location="cpu", weights_only=True))
