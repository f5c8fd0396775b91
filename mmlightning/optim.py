"""Optimizers and learning-rate schedules, chosen by name in a recipe's ``optimizer:`` and
``scheduler:`` sections."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from mmlightning.errors import UserError
from mmlightning.registry import OPTIMIZERS, SCHEDULERS


def _check_lr(lr: float, weight_decay: float) -> None:
    if not lr > 0:
        raise UserError(f"optimizer.lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise UserError(f"optimizer.weight_decay must be >= 0, got {weight_decay}")


def _fusable(groups: list) -> bool:
    """torch's fused AdamW kernel runs on CPU and CUDA floating-point tensors."""
    tensors = [t for g in groups for t in (g["params"] if isinstance(g, dict) else [g])]
    return all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)


def build_optimizer(spec: dict[str, Any], param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The recipe's ``optimizer:`` over ``param_groups``."""
    return OPTIMIZERS.build(dict(spec), "optimizer", params=param_groups)


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.98),
          eps: float = 1e-6, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay), with torch's fused kernel where it applies.

    ``fused: null`` (default) uses torch's fused kernel where the parameters allow it: one
    kernel for every tensor instead of a Python loop over them (on this project's CPU
    benchmarks the optimizer step was 4-7x faster, about 4% of a clip-shapes step), and the
    kernel skips a step whose gradients are not finite on the device (NonFiniteGuard)."""
    _check_lr(lr, weight_decay)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise UserError(f"optimizer.betas must be two numbers in [0, 1), like [0.9, 0.98]; got {list(betas)}")
    if not eps > 0:
        raise UserError(f"optimizer.eps must be > 0, got {eps}")
    groups = list(params)
    if fused is None:
        fused = _fusable(groups)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, fused=fused)


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable, lr: float = 0.1, weight_decay: float = 0.0, momentum: float = 0.9,
        nesterov: bool = False, fused: bool | None = None) -> torch.optim.Optimizer:
    """SGD with momentum (Nesterov optional); fused where the parameters allow, as AdamW."""
    _check_lr(lr, weight_decay)
    groups = list(params)
    if fused is None:
        fused = _fusable(groups)
    return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                           fused=fused)


def _check_schedule(warmup_steps: int, min_lr_ratio: float = 0.0) -> None:
    if warmup_steps < 0:
        raise UserError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise UserError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


@SCHEDULERS.register("cosine")
def cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
           min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` x lr at ``total_steps``."""
    _check_schedule(warmup_steps, min_lr_ratio)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


@SCHEDULERS.register("constant")
def constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up, then a constant learning rate."""
    _check_schedule(warmup_steps)
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup_steps))
