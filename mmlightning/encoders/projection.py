"""Projection heads map a tower's pooled vector into the shared embedding space (CLIP), or a
vision tower's tokens into a language model's input embeddings (vlm: any of them, applied per token)."""

from __future__ import annotations

from torch import nn

from mmlightning.registry import PROJECTIONS


@PROJECTIONS.register("linear")
def linear(in_dim: int, out_dim: int, bias: bool = False) -> nn.Module:
    """One linear map, without bias as in CLIP."""
    return nn.Linear(in_dim, out_dim, bias=bias)


@PROJECTIONS.register("mlp")
def mlp(in_dim: int, out_dim: int, hidden_dim: int | None = None, dropout: float = 0.0) -> nn.Module:
    """Linear, GELU, dropout, linear (``hidden_dim`` defaults to the input width)."""
    hidden = hidden_dim or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


@PROJECTIONS.register("mlp2x_gelu")
def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1.5's projector from image tokens into a language model: linear to the LM's
    width, GELU, linear (``mlp`` with the hidden width at the output's)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
