"""Image transforms that follow the vision encoder's ``ImageConfig`` (size, mean, std, crop)."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from mmlightning.encoders.outputs import ImageConfig


def _interpolation(name: str) -> InterpolationMode:
    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}.get(name, InterpolationMode.BICUBIC)


def apply_transform(transform: Any, image: Any, index: int) -> torch.Tensor:
    """``transform(image)`` with the sample's own random numbers where the training sampler
    gave its index a seed (``common.SampleIndex``): a random crop then depends on the run's
    seed, the epoch and the sample only, not on the loader worker, the rank or what came before
    it, so a resumed run crops as the uninterrupted one did. The process's generator is left
    as it was (dropout keeps its own stream)."""
    seed = getattr(index, "seed", None)
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # torch.manual_seed would queue CUDA seeding too, 40x slower
        return transform(image)


def train_transform(config: ImageConfig, scale: tuple[float, float] = (0.9, 1.0)) -> T.Compose:
    """Random resized crop, as open_clip trains. No flips: captions say left and right."""
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(config.size, scale=tuple(scale), interpolation=_interpolation(config.interpolation), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(config.mean, config.std),
    ])


def eval_transform(config: ImageConfig) -> T.Compose:
    """Resize the short side to size / crop_pct and centre-crop (``resize_mode: shortest``), or
    resize to the square (``squash``, SigLIP's): deterministic. The resize comes first, so a
    PIL image is resized by PIL, as open_clip's and HF's preprocessing do."""
    interpolation = _interpolation(config.interpolation)
    if config.resize_mode == "squash":
        resize = [T.Resize((config.size, config.size), interpolation=interpolation, antialias=True)]
    elif config.resize_mode == "shortest":
        resize = [T.Resize(int(round(config.size / config.crop_pct)), interpolation=interpolation, antialias=True),
                  T.CenterCrop(config.size)]
    else:
        raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {config.resize_mode!r}")
    return T.Compose([
        *resize,
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(config.mean, config.std),
    ])
