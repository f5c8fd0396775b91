"""Image transforms that follow the vision encoder's ``ImageConfig`` (size, mean, std, crop)."""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from mmlightning.encoders.outputs import ImageConfig


def _interpolation(name: str) -> InterpolationMode:
    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}.get(name, InterpolationMode.BICUBIC)


def train_transform(config: ImageConfig, scale: tuple[float, float] = (0.9, 1.0)) -> T.Compose:
    """Random resized crop, as open_clip trains. No flips: captions say left and right."""
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(config.size, scale=tuple(scale), interpolation=_interpolation(config.interpolation), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(config.mean, config.std),
    ])


def eval_transform(config: ImageConfig) -> T.Compose:
    """Resize the short side to size / crop_pct, then centre-crop: deterministic."""
    return T.Compose([
        T.ToImage(),
        T.Resize(int(round(config.size / config.crop_pct)), interpolation=_interpolation(config.interpolation), antialias=True),
        T.CenterCrop(config.size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(config.mean, config.std),
    ])
