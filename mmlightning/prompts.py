"""Prompt learners: learned context vectors in place of a hand-written prompt, for a frozen
CLIP's text tower (task ``prompt_learning``).

- ``coop`` (Zhou et al., "Learning to Prompt for Vision-Language Models", 2022): M vectors
  before each class name, ``[ctx_1] ... [ctx_M] <class name>.``, shared by all classes or one
  set per class (``class_specific``), started at random (N(0, 0.02)) or from the embeddings
  of a phrase (``init: "a photo of a"``, which then fixes M).
- ``cocoop`` (Zhou et al., "Conditional Prompt Learning", 2022): CoOp's shared context plus
  one image-conditioned shift, a small meta-network (linear, ReLU, linear; width / 16) from
  the image embedding, added to every context vector.

A learner returns the prompts as token ids, attention mask and input embeddings (the token
embeddings with the context slots replaced); the task runs them through the text tower
with ``encoders.text.token_embeddings_replaced``, so pooling at the end-of-text token and
everything else is the tower's own. Only the learner's parameters train.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmlightning.encoders.tokenizers import tokenize
from mmlightning.errors import UserError
from mmlightning.registry import PROMPT_LEARNERS

PLACEHOLDER = "X"  # one token in every tokenizer here (a closed word vocabulary reads it as [UNK])


def context_slots(tokenizer: Any, max_length: int, prefix: str, classnames: list[str],
                  where: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Token ids and mask of ``"<prefix> <class name>."`` for each class, and where the prefix's
    tokens sit (start, length), found by comparing with the class names tokenized alone: the
    same for any tokenizer, with or without a start token."""
    texts = [f"{name}." for name in classnames]
    full = tokenize(tokenizer, [f"{prefix} {t}" for t in texts], max_length)
    bare = tokenize(tokenizer, texts, max_length)
    starts, lengths = set(), set()
    for i, name in enumerate(classnames):
        a = full["input_ids"][i][full["attention_mask"][i].bool()].tolist()
        b = bare["input_ids"][i][bare["attention_mask"][i].bool()].tolist()
        length = len(a) - len(b)
        # the first place the prefix fits: the same for every class (the tokenizer's start
        # tokens) even where a closed vocabulary reads both the prefix and a name as [UNK]
        start = next((j for j in range(len(b) + 1) if length >= 1 and a[:j] == b[:j] and a[j + length:] == b[j:]), None)
        if start is None:
            raise UserError(f"{where}: the prompt for class {name!r} does not fit the text tower's context of "
                            f"{max_length} tokens with {prefix!r} before it; use fewer context tokens or a longer "
                            f"max_length.")
        starts.add(start)
        lengths.add(length)
    if len(starts) > 1 or len(lengths) > 1:
        raise UserError(f"{where}: the tokenizer splits {prefix!r} differently before different class names "
                        f"({sorted(lengths)} tokens); give a context phrase of whole words.")
    return full["input_ids"], full["attention_mask"], starts.pop(), lengths.pop()


@PROMPT_LEARNERS.register("coop")
class CoOp(nn.Module):
    """CoOp: ``n_ctx`` learned context vectors before each class name, shared or per class
    (``class_specific``), random (N(0, 0.02)) or from the phrase ``init`` (which sets n_ctx)."""

    def __init__(self, classnames: list[str], text: nn.Module, n_ctx: int | None = None, init: str | None = None,
                 class_specific: bool = False, where: str = "model.prompt") -> None:
        super().__init__()
        if init is not None and n_ctx is not None:
            raise UserError(f"{where}: give n_ctx or init, not both: the phrase's tokens are the context.")
        n_ctx = 4 if n_ctx is None and init is None else n_ctx
        if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 1):
            raise UserError(f"{where}.n_ctx must be a whole number >= 1, got {n_ctx!r}.")
        prefix = init if init is not None else " ".join([PLACEHOLDER] * n_ctx)
        ids, mask, start, length = context_slots(text.tokenizer, text.max_length, prefix, classnames, where)
        if init is None and length != n_ctx:
            raise UserError(f"{where}: the tokenizer reads the placeholder {PLACEHOLDER!r} as more than one token.")
        embedding = text.input_embeddings()
        with torch.no_grad():
            base = embedding(ids).float()  # (K, T, C): the prompts as the tower embeds them
        # rebuilt from the class names at every start, so a checkpoint holds only the learned
        # context and may be tested on other classes (base-to-new)
        self.register_buffer("input_ids", ids, persistent=False)
        self.register_buffer("attention_mask", mask, persistent=False)
        self.register_buffer("base", base, persistent=False)
        self.start, self.length, self.width = start, length, base.shape[-1]
        shape = (len(classnames), length, self.width) if class_specific else (length, self.width)
        if init is not None:
            context = base[0, start:start + length].clone()
            context = context.expand(shape).clone() if class_specific else context
        else:
            context = torch.empty(shape).normal_(std=0.02)
        self.context = nn.Parameter(context)

    def with_context(self, context: torch.Tensor) -> torch.Tensor:
        """The class prompts' input embeddings (K, T, C) with ``context`` ((n, C) shared or
        (K, n, C) per class) in the slots."""
        before, after = self.base[:, :self.start], self.base[:, self.start + self.length:]
        context = context.expand(self.base.shape[0], -1, -1) if context.ndim == 2 else context
        return torch.cat([before, context.to(before.dtype), after], dim=1)

    def forward(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """(K, T, C) input embeddings of the class prompts (``input_ids``/``attention_mask``
        are their tokens)."""
        return self.with_context(self.context)


@PROMPT_LEARNERS.register("cocoop")
class CoCoOp(CoOp):
    """CoCoOp: CoOp's shared context plus an image-conditioned shift from a meta-network
    (``image_dim`` -> ``image_dim // 16`` -> context width) of the image embedding."""

    def __init__(self, classnames: list[str], text: nn.Module, image_dim: int, n_ctx: int | None = None,
                 init: str | None = None, where: str = "model.prompt") -> None:
        super().__init__(classnames, text, n_ctx=n_ctx, init=init, class_specific=False, where=where)
        hidden = max(1, image_dim // 16)
        self.meta_net = nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, self.width))

    def forward(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, T, C): each image's prompts, its shift added to every context vector."""
        if image_features is None:
            raise ValueError("CoCoOp's prompts depend on the image: pass image_features")
        shift = self.meta_net(image_features.float())  # (B, C)
        context = self.context[None] + shift[:, None]  # (B, n, C)
        b, k = len(context), self.base.shape[0]
        before = self.base[None, :, :self.start].expand(b, -1, -1, -1)
        after = self.base[None, :, self.start + self.length:].expand(b, -1, -1, -1)
        return torch.cat([before, context[:, None].expand(-1, k, -1, -1), after], dim=2)
