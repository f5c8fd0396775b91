"""Image<->text retrieval recall@K over a whole evaluation split.

Protocol (as LAVIS and the COCO/Flickr papers): an image query is a hit at K if *any* of its
captions is among the K nearest texts; a text query is a hit if its own image is among the K
nearest images. ``*_str`` variants also accept an identical caption string belonging to
another image: in a synthetic world many images share a caption, and picking one of them is
not an error. ``{dir}_MdR`` and ``{dir}_MnR`` are the median and mean rank (1 = first) of a
query's best-ranked own match, as the video retrieval papers report them; an identical
caption of another item scores the same and ties count in the query's favour, so where
captions repeat (the shapes world) the ranks read as the caption-string match. ``directions``
names the two directions (``("v2t", "t2v")`` for videos).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from mmlightning.metrics.samples import first_occurrences


class RetrievalRecall(Metric):
    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024,
                 directions: tuple[str, str] = ("i2t", "t2i")) -> None:
        super().__init__()
        self.ks, self.chunk, self.directions = tuple(ks), chunk, tuple(directions)
        for name in ("image_features", "image_ids", "text_features", "text_image_ids", "caption_ids", "text_ids"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, image_features: torch.Tensor, image_ids: torch.Tensor, text_features: torch.Tensor,
               text_image_ids: torch.Tensor, caption_ids: torch.Tensor, text_ids: torch.Tensor) -> None:
        self.image_features.append(image_features.detach().float())
        self.image_ids.append(image_ids)
        self.text_features.append(text_features.detach().float())
        self.text_image_ids.append(text_image_ids)
        self.caption_ids.append(caption_ids)
        self.text_ids.append(text_ids)

    def compute(self) -> dict[str, torch.Tensor]:
        cat = lambda x: torch.cat(x) if isinstance(x, list) else x  # noqa: E731  (a list until synced)
        # distributed samplers pad with repeats: keep each image and caption once
        image_ids, first = first_occurrences(cat(self.image_ids))
        images = cat(self.image_features)[first]
        _, tfirst = first_occurrences(cat(self.text_ids))
        texts = cat(self.text_features)[tfirst]
        owner, cap = cat(self.text_image_ids)[tfirst], cat(self.caption_ids)[tfirst]
        cap = torch.unique(cap, return_inverse=True)[1]  # dense: streamed data hashes captions to 63-bit ids
        # dense row numbers for image ids, so (image, caption string) pairs hash to one int
        row_of = {int(i): r for r, i in enumerate(image_ids.tolist())}
        owner_row = torch.tensor([row_of[int(i)] for i in owner.tolist()], device=texts.device)
        n_cap = int(cap.max()) + 1 if cap.numel() else 1
        image_has_caption = torch.unique(owner_row * n_cap + cap)
        kmax = max(self.ks)
        out: dict[str, torch.Tensor] = {}
        i2t = self._topk(images, texts, kmax)  # (n_img, k) text indices
        rows = torch.arange(len(images), device=texts.device)[:, None]
        hit_own = owner_row[i2t] == rows
        hit_str = torch.isin(rows * n_cap + cap[i2t], image_has_caption)
        t2i = self._topk(texts, images, kmax)  # (n_txt, k) image rows
        hit_t_own = t2i == owner_row[:, None]
        hit_t_str = torch.isin(t2i * n_cap + cap[:, None], image_has_caption)
        i2t, t2i = self.directions
        for k in self.ks:
            out[f"{i2t}_R@{k}"] = hit_own[:, :k].any(1).float().mean()
            out[f"{t2i}_R@{k}"] = hit_t_own[:, :k].any(1).float().mean()
            out[f"{i2t}_R@{k}_str"] = hit_str[:, :k].any(1).float().mean()
            out[f"{t2i}_R@{k}_str"] = hit_t_str[:, :k].any(1).float().mean()
        out["mean_recall"] = torch.stack([out[f"{d}_R@{k}"] for d in self.directions for k in self.ks]).mean()
        own = owner_row[None, :] == rows  # (n_img, n_txt): text j is one of image i's captions
        for name, ranks in ((i2t, self._ranks(images, texts, own)), (t2i, self._ranks(texts, images, own.T))):
            out[f"{name}_MdR"] = ranks.float().quantile(0.5)  # as np.median: halfway between two middles
            out[f"{name}_MnR"] = ranks.float().mean()
        return out

    def _ranks(self, queries: torch.Tensor, gallery: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """Each query's rank (1 = first) of its best-scored positive: 1 + the gallery items
        scored above it (ties counted in the query's favour)."""
        ranks = []
        for q, pos in zip(queries.split(self.chunk), positive.split(self.chunk)):
            scores = q @ gallery.T
            best = scores.masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values
            ranks.append(1 + (scores > best).sum(1))
        return torch.cat(ranks)

    def _topk(self, queries: torch.Tensor, gallery: torch.Tensor, k: int) -> torch.Tensor:
        k = min(k, len(gallery))
        parts = [(q @ gallery.T).topk(k, dim=1).indices for q in queries.split(self.chunk)]
        idx = torch.cat(parts)
        if idx.shape[1] < max(self.ks):  # tiny galleries: pad with a repeat so slicing works
            idx = torch.cat([idx, idx[:, -1:].expand(-1, max(self.ks) - idx.shape[1])], dim=1)
        return idx


