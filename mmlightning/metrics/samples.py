"""Samples: each evaluation sample counted once, and few-shot draws.

Each evaluation sample counted once. Under DDP, Lightning's distributed sampler pads the
last batches with repeated samples so that every rank gets as many; a metric that summed as
it went would count those twice. The metrics here keep per-sample values with each sample's
id and reduce over the first occurrence of each id after gathering."""

from __future__ import annotations

import numpy as np
import torch


def first_occurrences(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids and the position of the first occurrence of each."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((len(uniq),), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")
    return uniq, first


def concatenated(state: list[torch.Tensor] | torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """A ``dist_reduce_fx="cat"`` state as one tensor: a list before syncing, a tensor after."""
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else empty


def few_shot_draw(labels: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``k`` samples of each class (indices into ``labels``), and ``k`` more of each as
    the draw's own held-out set (fewer where a class has fewer). Seeded by (seed, k): the
    few-shot data modules and the linear probes of ``mml eval`` draw the same samples."""
    rng = np.random.default_rng([seed, k])
    drawn = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return np.concatenate([ix[:k] for ix in drawn]), np.concatenate([ix[k:2 * k] for ix in drawn])
