"""Each evaluation sample counted once. Under DDP, Lightning's distributed sampler pads the
last batches with repeated samples so that every rank gets as many; a metric that summed as
it went would count those twice. The metrics here keep per-sample values with each sample's
id and reduce over the first occurrence of each id after gathering."""

from __future__ import annotations

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
