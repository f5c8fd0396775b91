"""Temporal aggregation: a video's frame embeddings (B, F, D) and frame mask (B, F) -> one
embedding (B, D), for video-text retrieval (CLIP4Clip, Luo et al. 2021).

- ``mean`` (CLIP4Clip's meanP): the mean of the L2-normalised frame embeddings over the real
  frames. It cannot tell a video from the same video played backwards.
- ``transformer`` (CLIP4Clip's seqTransf): frame position embeddings added, a transformer over
  the frames (padding masked), its output added back to the input (a residual around the
  whole stack, so it starts near meanP), then meanP. Unlike CLIP4Clip the frame embeddings are
  L2-normalised before the positions are added, so a tower's feature scale does not drown them. CLIP4Clip initialises the frame positions
  from CLIP's text position embeddings; ``init_positions`` below does the same from any text
  tower whose position table has the embedding's width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmlightning.errors import UserError
from mmlightning.registry import TEMPORAL_AGGREGATORS


def masked_mean(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the normalised frame embeddings over the real frames (meanP)."""
    frames = F.normalize(frames, dim=-1)
    weights = mask.to(frames.dtype).unsqueeze(-1)
    return (frames * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@TEMPORAL_AGGREGATORS.register("mean")
class MeanPooling(nn.Module):
    """CLIP4Clip's meanP: the mean of the normalised frame embeddings (no parameters)."""

    def __init__(self, dim: int, max_frames: int) -> None:
        super().__init__()
        self.max_frames = max_frames

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(frames, mask)


@TEMPORAL_AGGREGATORS.register("transformer")
class TemporalTransformer(nn.Module):
    """CLIP4Clip's seqTransf: frame positions + a transformer over the frames, residual, then meanP."""

    def __init__(self, dim: int, max_frames: int, layers: int = 4, heads: int | None = None,
                 dropout: float = 0.0, init_positions: str = "text") -> None:
        super().__init__()
        heads = heads or max(dim // 64, 1)
        if dim % heads:
            raise UserError(f"model.temporal.heads={heads} must divide the embedding width {dim}.")
        if init_positions not in ("text", "random"):
            raise UserError(f"model.temporal.init_positions: {init_positions!r}; valid: text (from the text tower's "
                              f"position table, as CLIP4Clip), random.")
        self.init_from_text = init_positions == "text"
        self.max_frames = max_frames
        self.positions = nn.Parameter(torch.empty(max_frames, dim))
        nn.init.trunc_normal_(self.positions, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def init_positions(self, table: torch.Tensor | None, where: str = "model.text") -> None:
        """The frame positions from the text tower's first ``max_frames`` position embeddings."""
        if not self.init_from_text:
            return
        if table is None or table.shape[1] != self.positions.shape[1] or table.shape[0] < self.max_frames:
            got = "no position table" if table is None else f"a position table of shape {tuple(table.shape)}"
            raise UserError(f"model.temporal.init_positions=text copies {self.max_frames} rows of width "
                              f"{self.positions.shape[1]} from the text tower's position embeddings; {where} has "
                              f"{got}. Set model.temporal.init_positions=random.")
        with torch.no_grad():
            self.positions.copy_(table[:self.max_frames].to(self.positions.dtype))

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if frames.shape[1] > self.max_frames:
            raise UserError(f"a clip of {frames.shape[1]} frames, past model.temporal.max_frames={self.max_frames}.")
        # unit-length frames first (meanP normalises them too): at a tower's own scale (the shapes
        # CLIP's frame embeddings have norms near 80) the positions would be lost in the pre-norm
        frames = F.normalize(frames, dim=-1)
        x = frames + self.positions[:frames.shape[1]].to(frames.dtype)
        x = self.transformer(x, src_key_padding_mask=~mask.bool()) + frames
        return masked_mean(x, mask)
