"""Classification accuracy: top-k overall, per named group of classes and per class, and the
confusion matrix; used for zero-shot CLIP, fine-tuned classifiers and prompt learning alike."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from mmlightning.metrics.samples import concatenated, first_occurrences


class TopKAccuracy(Metric):
    """Top-1/top-5 accuracy overall and per named group of classes. Images labelled -1
    (not single-class) are ignored; each image counts once by its id, whatever the
    distributed sampler repeated (``samples.py``)."""

    full_state_update = False

    def __init__(self, num_classes: int, groups: dict[str, list[int]] | None = None, top_k: tuple[int, ...] = (1, 5),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)  # torchmetrics options, e.g. sync_on_compute=False
        self.num_classes, self.groups, self.top_k = num_classes, dict(groups or {}), top_k
        # hits: (samples, len(top_k)), hit at each k; predictions: the top-1 class
        for name in ("labels", "sample_ids", "hits", "predictions"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor) -> None:
        keep = labels >= 0
        logits, labels, sample_ids = logits[keep], labels[keep], sample_ids.reshape(-1)[keep]
        if not len(labels):
            return
        ranked = logits.topk(min(max(self.top_k), logits.shape[1]), dim=1).indices
        self.hits.append(torch.stack([(ranked[:, :k] == labels[:, None]).any(1) for k in self.top_k], dim=1))
        self.labels.append(labels.long())
        self.sample_ids.append(sample_ids.long())
        self.predictions.append(ranked[:, 0])

    def _samples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Labels, top-k hits and top-1 predictions, each image once."""
        long = torch.zeros(0, dtype=torch.long, device=self.device)
        _, first = first_occurrences(concatenated(self.sample_ids, long))
        hits = concatenated(self.hits, torch.zeros(0, len(self.top_k), dtype=torch.bool, device=self.device))
        return concatenated(self.labels, long)[first], hits[first], concatenated(self.predictions, long)[first]

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class: images, and top-k hits (classes, len(top_k))."""
        labels, hits, _ = self._samples()
        total = torch.bincount(labels, minlength=self.num_classes).float()
        correct = torch.zeros(self.num_classes, len(self.top_k), device=total.device).index_add_(0, labels, hits.float())
        return total, correct

    def compute(self) -> dict[str, torch.Tensor]:
        total_per_class, correct_per_class = self._counts()
        out = {}
        subsets = {"": slice(None), **{f"_{g}": torch.tensor(ix, dtype=torch.long) for g, ix in self.groups.items()}}
        for suffix, ix in subsets.items():
            total = total_per_class[ix].sum().clamp(min=1)
            for j, k in enumerate(self.top_k):
                out[f"top{k}{suffix}"] = correct_per_class[ix, j].sum() / total
        return out

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images per class and each class's accuracy at each k (classes, len(top_k))."""
        total, correct = self._counts()
        return total, correct / total.clamp(min=1)[:, None]

    def confusion(self) -> torch.Tensor:
        """(classes, classes) counts: row the true class, column the top-1 prediction."""
        labels, _, predictions = self._samples()
        flat = torch.bincount(labels * self.num_classes + predictions, minlength=self.num_classes ** 2)
        return flat.view(self.num_classes, self.num_classes)
