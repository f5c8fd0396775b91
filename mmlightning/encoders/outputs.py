"""What every encoder returns, so any fusion head or loss works with any encoder pair."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisionOutput:
    pooled: torch.Tensor  # (B, D) one vector per image
    tokens: torch.Tensor  # (B, N, C) patch or grid-cell features, for attention and FiLM heads


@dataclass
class TextOutput:
    pooled: torch.Tensor  # (B, D)
    tokens: torch.Tensor  # (B, T, C)
    mask: torch.Tensor  # (B, T) bool, True on real tokens


@dataclass
class ImageConfig:
    """How images must be prepared for a vision encoder; the data module follows it."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    resize_mode: str = "shortest"  # short side to size / crop_pct, then centre-crop; "squash": both sides to size
