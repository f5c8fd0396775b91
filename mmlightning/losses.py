"""Contrastive losses, usable without Lightning:

    from mmlightning.losses import ClipLoss
    loss = ClipLoss()(image_features, text_features, logit_scale)

Under torch.distributed each rank gathers every rank's features *with gradients* and computes
only its own rows of the logit matrix (open_clip's ``gather_with_grad`` + ``local_loss``): N
ranks x B samples then give the same loss (averaged over ranks, as DDP averages gradients)
and the same gradients as one process with N*B samples, at B x N*B memory instead of
N*B x N*B. Logits and losses are computed in fp32 whatever the autocast precision.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from mmlightning.registry import LOSSES


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def at_least_fp32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """bf16/fp16 features are upcast: softmax over thousands of logits needs fp32."""
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


def outside_autocast(forward: Callable) -> Callable:
    """Run a loss's forward with autocast off. Upcasting the features is not enough: under
    bf16/fp16 autocast a matmul of fp32 tensors still returns half precision, and the logits,
    their softmax and the loss must stay fp32."""

    @functools.wraps(forward)
    def fp32_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        device = next(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return forward(self, *args, **kwargs)

    return fp32_forward


def gather_features(features: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``features`` of all ranks in rank order. With ``with_grad``, gradients flow
    back to the rank that produced each row; without, only the local rows carry gradients."""
    rank, world = world_info()
    if world == 1:
        return features
    if with_grad:
        return torch.cat(dist_fn.all_gather(features), dim=0)
    parts = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(parts, features.detach())
    parts[rank] = features
    return torch.cat(parts, dim=0)


def _soft_targets(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """Row-normalised target matrix: every column whose id equals the row's is a positive."""
    same = (row_ids[:, None] == col_ids[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


@LOSSES.register("clip")
class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP). Same arguments and result as open_clip's ``ClipLoss``; world
    size and rank are read from torch.distributed at call time.

    ``caption_positives``: pass ``caption_ids`` (equal for identical caption strings) and a
    caption that also describes another image in the batch counts as a positive for it,
    instead of a false negative.
    """

    logit_scale_init = math.log(1 / 0.07)
    logit_bias_init: float | None = None
    max_logit_scale: float | None = math.log(100.0)  # temperature never below 1/100, as CLIP trains

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, caption_positives: bool = False) -> None:
        super().__init__()
        self.local_loss, self.gather_with_grad, self.caption_positives = local_loss, gather_with_grad, caption_positives

    @outside_autocast
    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                caption_ids: torch.Tensor | None = None, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        image_features, text_features, logit_scale = at_least_fp32(image_features, text_features, logit_scale)
        rank, world = world_info()
        all_image = gather_features(image_features, self.gather_with_grad)
        all_text = gather_features(text_features, self.gather_with_grad)
        if self.local_loss or world == 1:
            # rows: this rank's samples; columns: every rank's
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            first = rank * image_features.shape[0] if world > 1 else 0
            rows = torch.arange(first, first + image_features.shape[0], device=image_features.device)
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            rows = torch.arange(all_image.shape[0], device=image_features.device)
        if self.caption_positives and caption_ids is not None:
            all_ids = gather_features(caption_ids, with_grad=False)
            targets = _soft_targets(all_ids[rows], all_ids)
            loss_i = torch.sum(-targets * F.log_softmax(logits_per_image, dim=1), dim=1).mean()
            loss_t = torch.sum(-targets * F.log_softmax(logits_per_text, dim=1), dim=1).mean()
            return (loss_i + loss_t) / 2
        return (F.cross_entropy(logits_per_image, rows) + F.cross_entropy(logits_per_text, rows)) / 2


@LOSSES.register("siglip")
class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023) with a learnable bias; summed over
    pairs and divided by the local batch, as open_clip's ``SigLipLoss``. Under DDP, this
    rank's images are scored against every rank's texts."""

    logit_scale_init = math.log(10.0)
    logit_bias_init: float | None = -10.0
    max_logit_scale: float | None = None  # as big_vision and HF: SigLIP's learnt scale ends above 100

    def __init__(self, gather_with_grad: bool = True, caption_positives: bool = False) -> None:
        super().__init__()
        self.gather_with_grad, self.caption_positives = gather_with_grad, caption_positives

    @outside_autocast
    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                caption_ids: torch.Tensor | None = None, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs logit_bias")
        image_features, text_features, logit_scale, logit_bias = at_least_fp32(image_features, text_features, logit_scale, logit_bias)
        rank, world = world_info()
        all_text = gather_features(text_features, self.gather_with_grad)
        logits = logit_scale * image_features @ all_text.T + logit_bias
        first = rank * image_features.shape[0]
        rows = torch.arange(first, first + image_features.shape[0], device=logits.device)
        if self.caption_positives and caption_ids is not None:
            all_ids = gather_features(caption_ids, with_grad=False)
            positive = all_ids[rows][:, None] == all_ids[None, :]
        else:
            positive = rows[:, None] == torch.arange(logits.shape[1], device=logits.device)[None, :]
        labels = positive.float() * 2 - 1
        return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]


# ---------------------------------------------------------------------- answer classification
@LOSSES.register("soft_bce")
class SoftScoreBCE(nn.Module):
    """VQAv2 practice: every answer is a binary label with a soft target min(#annotators/3, 1),
    binary cross-entropy summed over answers and averaged over questions (Teney et al. 2018)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = at_least_fp32(logits, target)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


@LOSSES.register("cross_entropy")
class SoftCrossEntropy(nn.Module):
    """Softmax cross-entropy. One-hot targets give the plain loss of single-answer data; soft
    targets are normalised to a distribution; questions with no answer in the vocabulary
    (all-zero targets) are left out."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = at_least_fp32(logits, target)
        total = target.sum(dim=1, keepdim=True)
        keep = (total.squeeze(1) > 0).float()
        # masked mean rather than boolean indexing: no host sync to learn how many rows remain
        per_question = F.cross_entropy(logits, target / total.clamp(min=1e-12), reduction="none",
                                       label_smoothing=self.label_smoothing)
        return (per_question * keep).sum() / keep.sum().clamp(min=1)


# ---------------------------------------------------------------------- captioning
@LOSSES.register("caption_lm")
class CaptionLMLoss(nn.Module):
    """Teacher-forced next-token cross-entropy. ``logits[:, t]`` predicts ``input_ids[:, t+1]``:
    the shift happens here and only here (pass the decoder no labels, or they shift twice),
    so the logits at BOS target the first real word. Padding is left out of the mean."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        (logits,) = at_least_fp32(logits)
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100, label_smoothing=self.label_smoothing)


# ---------------------------------------------------------------------- generative vision-language models
@LOSSES.register("answer_lm")
class AnswerLMLoss(nn.Module):
    """Next-token cross-entropy on the answer tokens only: ``labels`` is -100 on every prompt,
    image and padding position (encoders/chat.py), and ``logits[:, t]`` predicts
    ``labels[:, t+1]`` (the shift happens here). The mean is over the batch's answer tokens,
    as transformers' causal-LM loss and LLaVA take it."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        (logits,) = at_least_fp32(logits)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, label_smoothing=self.label_smoothing)
