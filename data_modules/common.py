"""What data modules share: the batch layout tasks read, tokenizing and image normalisation.

Training batches hold one caption per image:
    image (B,3,H,W) float, input_ids/attention_mask (B,T), image_id (B,), caption_id (B,)
Evaluation batches hold each image once with all its captions, so retrieval can count an
image as found through any of them:
    image (B,3,H,W), image_id (B,), label (B,) zero-shot class or -1,
    input_ids/attention_mask (M,T), text_image_id (M,), caption_id (M,), text_id (M,)
``caption_id`` numbers distinct caption strings within a split (identical strings share one),
``text_id`` numbers captions, so duplicates added by a distributed sampler can be dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmlightning.encoders.outputs import ImageConfig


@dataclass
class ZeroShotSpec:
    """Classes and prompt templates for zero-shot classification of evaluation images.
    ``groups`` names subsets of classes to report separately (e.g. 'heldout')."""

    classnames: list[str]
    templates: list[str]
    groups: dict[str, list[int]] = field(default_factory=dict)

    def prompts(self) -> list[list[str]]:
        return [[t.format(c) for t in self.templates] for c in self.classnames]


def normalize_uint8(images: torch.Tensor, config: ImageConfig) -> torch.Tensor:
    """(B,H,W,3) uint8 -> (B,3,H,W) float normalised with the encoder's mean and std."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def string_ids(strings: list[str]) -> torch.Tensor:
    """Number distinct strings: identical captions get identical ids."""
    table: dict[str, int] = {}
    return torch.tensor([table.setdefault(s, len(table)) for s in strings], dtype=torch.long)


def already_batched(batch: Any) -> Any:
    """collate_fn for datasets that build whole batches in ``__getitems__``."""
    return batch
