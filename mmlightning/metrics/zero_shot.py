"""Zero-shot classification accuracy: images scored against text embeddings of class prompts."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


class ZeroShotAccuracy(Metric):
    """Top-1/top-5 accuracy overall and per named group of classes. Images labelled -1
    (not single-class) are ignored."""

    full_state_update = False

    def __init__(self, num_classes: int, groups: dict[str, list[int]] | None = None, top_k: tuple[int, ...] = (1, 5),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)  # torchmetrics options, e.g. sync_on_compute=False
        self.groups, self.top_k = dict(groups or {}), top_k
        self.add_state("total", default=torch.zeros(num_classes), dist_reduce_fx="sum")
        for k in top_k:
            self.add_state(f"correct_top{k}", default=torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        keep = labels >= 0
        logits, labels = logits[keep], labels[keep]
        if not len(labels):
            return
        self.total += torch.bincount(labels, minlength=self.total.numel()).float()
        ranked = logits.topk(min(max(self.top_k), logits.shape[1]), dim=1).indices
        for k in self.top_k:
            hit = (ranked[:, :k] == labels[:, None]).any(1)
            getattr(self, f"correct_top{k}").add_(torch.bincount(labels[hit], minlength=self.total.numel()).float())

    def compute(self) -> dict[str, torch.Tensor]:
        out = {}
        subsets = {"": slice(None), **{f"_{g}": torch.tensor(ix, dtype=torch.long) for g, ix in self.groups.items()}}
        for suffix, ix in subsets.items():
            total = self.total[ix].sum().clamp(min=1)
            for k in self.top_k:
                out[f"top{k}{suffix}"] = getattr(self, f"correct_top{k}")[ix].sum() / total
        return out

    def per_class(self) -> torch.Tensor:
        return self.correct_top1 / self.total.clamp(min=1)
