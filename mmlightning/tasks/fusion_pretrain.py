"""Fusion-encoder pretraining (UNITER, ViLBERT, ALBEF): a CLIP's two towers and a fusion
encoder over their tokens, trained with three weighted objectives:

- **ITC**: the towers' pooled outputs, the CLIP task's contrastive loss (``loss``);
- **ITM**: the fusion encoder's [CLS] says whether an image and a caption match; each batch
  adds, for every image, a hard negative caption and, for every caption, a hard negative
  image, drawn in proportion to the softmax of their ITC similarities over the global batch
  (never a true match: ``fusion_objectives``);
- **MLM**: words masked by BERT's 80/10/10 rule are predicted from the fusion encoder's word
  states, which see the image.

Evaluation adds to the CLIP task's retrieval: text->image R@1 re-ranked by ITM (each caption's
top ``rerank_k`` images by ITC re-scored by the fusion encoder, ALBEF's inference;
``test/t2i_R@1_itm``, on one process), ITM accuracy on each caption's own image and
on its hardest in-batch negative image (``itm_acc``), and MLM accuracy on eval captions masked
by a fixed draw, with the image and with every grid cell hidden (``mlm_acc``,
``mlm_acc_no_image``), overall and for each named word group (``model.word_groups``, e.g.
colours, relations), so what the image adds shows.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlightning.encoders.outputs import TextOutput, VisionOutput
from mmlightning.errors import UserError
from mmlightning.fusion_objectives import (IGNORE, draw_negatives, mask_token_id, mask_tokens, negative_weights,
                                           step_generator)
from mmlightning.losses import gather_features, world_info
from mmlightning.registry import FUSION_HEADS, TASKS
from mmlightning.tasks.clip import CLIPTask

WEIGHTS = ("itc", "itm", "mlm")


@TASKS.register("fusion_pretrain")
class FusionPretrainTask(CLIPTask):
    """ITC + ITM with hard negatives + MLM over a fusion encoder (see the module docstring)."""

    epoch_line_metrics = ("t2i_R@1", "itm_acc", "mlm_acc", "mlm_acc_no_image")

    def __init__(self, fusion: dict[str, Any], loss: dict[str, Any], optimizer: dict[str, Any],
                 vision: dict[str, Any] | None = None, text: dict[str, Any] | None = None,
                 pretrained: str | None = None, scheduler: dict[str, Any] | None = None, embed_dim: int | None = None,
                 projection: dict[str, Any] | None = None, freeze_vision: bool = False,
                 unfrozen_vision_groups: int = 0, freeze_text: bool = False, unfrozen_text_groups: int = 0,
                 weights: dict[str, float] | None = None, mlm_probability: float = 0.15,
                 word_groups: dict[str, list[str]] | None = None, rerank_k: int = 16,
                 accumulate_batches: int = 1, init_from: str | None = None,
                 init_towers: tuple[str, ...] | list[str] = ("vision", "text"),
                 lr_scale: dict[str, float] | None = None) -> None:
        if accumulate_batches != 1:
            raise UserError("model.accumulate_batches: fusion pretraining steps one batch at a time (its hard "
                            "negatives come from the batch); raise data.batch_size instead.")
        super().__init__(loss=loss, optimizer=optimizer, vision=vision, text=text, pretrained=pretrained,
                         scheduler=scheduler, embed_dim=embed_dim, projection=projection, freeze_vision=freeze_vision,
                         unfrozen_vision_groups=unfrozen_vision_groups, freeze_text=freeze_text,
                         unfrozen_text_groups=unfrozen_text_groups, init_from=init_from, init_towers=init_towers)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in WEIGHTS}
        unknown = sorted(set(weights or {}) - set(WEIGHTS))
        if unknown:
            raise UserError(f"model.weights: {', '.join(unknown)} is not an objective; the objectives are "
                            f"{', '.join(WEIGHTS)}.")
        if self.weights["mlm"]:
            mask_token_id(self.text.tokenizer)  # a tokenizer without one fails now, naming the key
        FUSION_HEADS.check(fusion, "model.fusion")
        head = FUSION_HEADS.get(str(fusion["name"]))
        if not hasattr(head, "encode"):
            encoders = [n for n in FUSION_HEADS.names() if hasattr(FUSION_HEADS.get(n), "encode")]
            raise UserError(f"model.fusion: {fusion['name']!r} fuses into one vector only; pretraining needs word "
                            f"states too. Fusion heads that give them: {', '.join(encoders)}.")
        widths = {"vision_dim": self.vision.output_dim, "vision_token_dim": self.vision.token_dim,
                  "text_dim": self.text.output_dim, "text_token_dim": self.text.token_dim}
        params = inspect.signature(head).parameters
        self.fusion = FUSION_HEADS.build(fusion, "model.fusion", **{k: v for k, v in widths.items() if k in params})
        self.itm_head = nn.Linear(self.fusion.output_dim, 2)
        self.set_lr_scale(lr_scale)  # again, now that the fusion encoder and heads are parts too
        self.mlm_head = nn.Sequential(nn.Linear(self.fusion.width, self.fusion.width), nn.GELU(),
                                      nn.LayerNorm(self.fusion.width), nn.Linear(self.fusion.width, len(self.text.tokenizer)))
        self.mlm_probability = mlm_probability
        self.word_groups = self.group_token_ids(word_groups or {})
        self.tallies: dict[str, dict[str, torch.Tensor]] = {}
        if rerank_k < 1:
            raise UserError(f"model.rerank_k must be >= 1 (images re-scored by ITM per caption), got {rerank_k}.")
        self.rerank_k = rerank_k
        self.kept: list[tuple[torch.Tensor, ...]] = []  # the test split's tokens, for ITM re-ranking

    def group_token_ids(self, groups: dict[str, list[str]]) -> dict[str, list[int]]:
        tokenizer, out = self.text.tokenizer, {}
        for name, words in groups.items():
            ids = [tokenizer.convert_tokens_to_ids(w) for w in words]
            unknown = [w for w, i in zip(words, ids) if i is None or i == tokenizer.unk_token_id]
            if unknown:
                raise UserError(f"model.word_groups.{name}: {', '.join(map(repr, unknown))} not in the text tower's "
                                f"vocabulary (one token each).")
            out[name] = ids
        return out

    # ------------------------------------------------------------------ the objectives
    def seed(self) -> int:
        return int(os.environ.get("PL_GLOBAL_SEED", "0"))

    def matching_logits(self, vision: VisionOutput, text: TextOutput) -> torch.Tensor:
        return self.itm_head(self.fusion.encode(vision, text)[0])

    def hard_negatives(self, image: torch.Tensor, text: torch.Tensor, batch: dict[str, torch.Tensor],
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(global index of each local image's negative caption, of each local caption's
        negative image), drawn on the global batch."""
        all_image, all_text = gather_features(image, with_grad=False), gather_features(text, with_grad=False)
        image_ids = gather_features(batch["image_id"], with_grad=False)
        caption_ids = gather_features(batch["caption_id"], with_grad=False) if "caption_id" in batch else None
        similarity = (all_image @ all_text.T) * self.temperature_scale().detach()
        text_for_image = draw_negatives(negative_weights(similarity, image_ids, image_ids, caption_ids, caption_ids),
                                        generator, "caption")
        image_for_text = draw_negatives(negative_weights(similarity.T, image_ids, image_ids, caption_ids, caption_ids),
                                        generator, "image")
        rank, _ = world_info()
        first = rank * len(image)
        rows = slice(first, first + len(image))
        return text_for_image[rows], image_for_text[rows]

    def objectives(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        vision = self.vision(batch["image"])
        text = self.text(batch["input_ids"], batch["attention_mask"])
        image = F.normalize(self.vision_proj(vision.pooled), dim=-1)
        caption = F.normalize(self.text_proj(text.pooled), dim=-1)
        losses = {"itc": self.loss_fn(image, caption, self.temperature_scale(), caption_ids=batch.get("caption_id"),
                                      logit_bias=self.logit_bias)}
        if self.weights["itm"]:
            neg_text, neg_image = self.hard_negatives(image.detach(), caption.detach(), batch, generator)
            # the negatives' tokens may sit on another rank: gathered with their gradients
            v_tokens, t_tokens = gather_features(vision.tokens), gather_features(text.tokens)
            t_mask = gather_features(text.mask, with_grad=False)
            pos = VisionOutput(pooled=vision.pooled, tokens=vision.tokens)
            negatives_v = VisionOutput(pooled=vision.pooled, tokens=v_tokens[neg_image])
            pairs = [(pos, text),
                     (pos, TextOutput(pooled=text.pooled, tokens=t_tokens[neg_text], mask=t_mask[neg_text])),
                     (negatives_v, text)]
            logits = torch.cat([self.matching_logits(v, t) for v, t in pairs])
            labels = torch.cat([torch.ones(len(image)), torch.zeros(2 * len(image))]).long().to(logits.device)
            losses["itm"] = F.cross_entropy(logits.float(), labels)
        if self.weights["mlm"]:
            rank, world = world_info()
            masked, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], self.text.tokenizer,
                                         self.mlm_probability, generator, first_row=rank * len(image),
                                         total_rows=world * len(image), max_length=self.text.max_length)
            states = self.fusion.encode(vision, self.text(masked, batch["attention_mask"]))[1]
            logits = self.mlm_head(states)
            # the mean over the global batch's masked words (DDP averages the ranks' gradients,
            # hence x world): equal to one process's, however the masked words fall on the ranks
            count = (labels != IGNORE).sum().float()
            if world > 1:
                torch.distributed.all_reduce(count)  # a count: no gradient to carry
            total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                    reduction="sum")
            losses["mlm"] = total * world / count.float().clamp(min=1)
        return losses

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = self.objectives(batch, step_generator(self.seed(), self.global_step))
        return sum(self.weights[name] * value for name, value in losses.items())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.objectives(batch, step_generator(self.seed(), self.global_step))
        for name, value in losses.items():
            self.log(f"train/{name}_loss", value)
        loss = sum(self.weights[name] * value for name, value in losses.items())
        self.log("train/loss", loss)
        return loss

    # ------------------------------------------------------------------ evaluation
    def tally(self, stage: str, name: str, hits: torch.Tensor, count: torch.Tensor) -> None:
        entry = self.tallies.setdefault(stage, {}).setdefault(name, torch.zeros(2, device=self.device))
        entry += torch.stack([hits.float().sum(), count.float().sum()])

    def evaluate_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> None:
        vision = self.vision(batch["image"])  # once: for ITC retrieval, ITM and MLM alike
        text = self.text(batch["input_ids"], batch["attention_mask"])
        image = F.normalize(self.vision_proj(vision.pooled), dim=-1)
        caption = F.normalize(self.text_proj(text.pooled), dim=-1)
        self.score_embeddings(batch, stage, image, caption)
        # ITM: each caption with its own image, and with its most similar other image of the batch
        own = (batch["text_image_id"][:, None] == batch["image_id"][None, :]).float().argmax(1)  # its image's row
        similarity = (caption @ image.T).masked_fill(batch["text_image_id"][:, None] == batch["image_id"][None, :],
                                                     float("-inf"))
        if len(batch["image_id"]) > 1:
            hardest = similarity.argmax(1)
            tokens = VisionOutput(pooled=vision.pooled[own], tokens=vision.tokens[own])
            negative = VisionOutput(pooled=vision.pooled[hardest], tokens=vision.tokens[hardest])
            says_match = self.matching_logits(tokens, text).argmax(1) == 1
            says_other = self.matching_logits(negative, text).argmax(1) == 0
            self.tally(stage, "itm_acc", torch.cat([says_match, says_other]), torch.tensor(2 * len(says_match)))
        if stage == "test":
            self.kept.append((vision.tokens.float(), batch["image_id"], image.float(), text.tokens.float(), text.mask,
                              batch["text_image_id"], caption.float()))  # re-scored after the epoch, outside autocast
        # MLM with a fixed draw per batch, with and without the image
        generator = step_generator(self.seed(), 10**6 + batch_idx)
        masked, labels = mask_tokens(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), self.text.tokenizer,
                                     self.mlm_probability, generator)
        masked, labels = masked.to(self.device), labels.to(self.device)
        masked_text = self.text(masked, batch["attention_mask"])
        grid = VisionOutput(pooled=vision.pooled[own], tokens=vision.tokens[own])
        chosen = labels != IGNORE
        for suffix, use_image in (("", True), ("_no_image", False)):
            predicted = self.mlm_head(self.fusion.encode(grid, masked_text, use_image=use_image)[1]).argmax(-1)
            right = (predicted == labels) & chosen
            self.tally(stage, f"mlm_acc{suffix}", right, chosen.sum())
            for group, ids in self.word_groups.items():
                in_group = chosen & torch.isin(labels, torch.tensor(ids, device=labels.device))
                self.tally(stage, f"mlm_acc_{group}{suffix}", right & in_group, in_group.sum())

    @torch.no_grad()
    def reranked_recall(self) -> torch.Tensor:
        """Text->image R@1 with each caption's top ``rerank_k`` images by ITC re-scored by the
        fusion encoder's match probability (ALBEF's inference), over this process's test split."""
        kept, self.kept = self.kept, []
        grids = torch.cat([k[0] for k in kept])
        image_ids = torch.cat([k[1] for k in kept])
        images = torch.cat([k[2] for k in kept])
        width = max(k[3].shape[1] for k in kept)
        words = torch.cat([F.pad(k[3], (0, 0, 0, width - k[3].shape[1])) for k in kept])
        masks = torch.cat([F.pad(k[4], (0, width - k[4].shape[1])) for k in kept])
        owners, captions = torch.cat([k[5] for k in kept]), torch.cat([k[6] for k in kept])
        seen: dict[int, int] = {}  # each image once (its first row)
        for row, image_id in enumerate(image_ids.tolist()):
            seen.setdefault(image_id, row)
        first = torch.tensor(list(seen.values()), device=grids.device)
        grids, image_ids, images = grids[first], image_ids[first], images[first]
        k = min(self.rerank_k, len(images))
        candidates = (captions @ images.T).topk(k, dim=1).indices  # (M, k)
        best = []
        for rows in torch.arange(len(captions), device=grids.device).split(max(1, 512 // k)):
            cand = candidates[rows].flatten()
            text = TextOutput(pooled=captions[rows].repeat_interleave(k, 0), tokens=words[rows].repeat_interleave(k, 0),
                              mask=masks[rows].repeat_interleave(k, 0))
            vision = VisionOutput(pooled=images[cand], tokens=grids[cand])
            match = self.matching_logits(vision, text).float().softmax(-1)[:, 1].view(len(rows), k)
            best.append(candidates[rows].gather(1, match.argmax(1, keepdim=True)).squeeze(1))
        return (image_ids[torch.cat(best)] == owners).float().mean()

    def evaluate_epoch_end(self, stage: str) -> None:
        super().evaluate_epoch_end(stage)
        if stage == "test" and self.kept:
            if self.trainer.world_size == 1:  # the whole split is in this process
                self.log("test/t2i_R@1_itm", self.reranked_recall())
            self.kept = []
        tallies = self.tallies.pop(stage, {})
        for name, (hits, count) in tallies.items():
            total = self.trainer.strategy.reduce(torch.stack([hits, count]), reduce_op="sum")
            self.log(f"{stage}/{name}", total[0] / total[1].clamp(min=1), rank_zero_only=True)
