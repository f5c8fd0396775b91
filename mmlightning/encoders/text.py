"""Text encoders: any HF transformers encoder, and a small transformer for closed vocabularies.

Each returns ``TextOutput(pooled, tokens, mask)`` and carries ``tokenizer`` and
``max_length``, which the data module uses to tokenize once, outside the training loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmlightning.encoders.outputs import TextOutput
from mmlightning.encoders.tokenizers import named_vocabulary, word_tokenizer
from mmlightning.encoders.weights import local_path, missing_folder
from mmlightning.errors import UserError
from mmlightning.registry import TEXT_ENCODERS


def pool(tokens: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * m).sum(1) / m.sum(1).clamp(min=1)
    raise UserError(f"pooling must be 'cls' or 'mean', got {pooling!r}")


@contextlib.contextmanager
def token_embeddings_replaced(tower: nn.Module, embeddings: torch.Tensor) -> Iterator[None]:
    """Within the block the tower's token-embedding lookup returns ``embeddings`` (B, T, C)
    instead of looking up the ids it is given: prompt learning (CoOp) feeds learned vectors
    in place of words, and everything after the lookup (positions, attention, pooling at the
    end-of-text id) runs as for real tokens. Every text tower says where its lookup is
    (``input_embeddings()``)."""
    if not hasattr(tower, "input_embeddings"):
        raise UserError(f"text tower {type(tower).__name__} cannot take prompt embeddings: it has no "
                        f"input_embeddings() (its token-embedding layer).")

    def replace(module: nn.Module, args: tuple[Any, ...], looked_up: torch.Tensor) -> torch.Tensor:
        if looked_up.shape[:2] != embeddings.shape[:2]:
            raise ValueError(f"prompt embeddings {tuple(embeddings.shape)} do not match the token ids "
                             f"{tuple(looked_up.shape[:2])}")
        return embeddings.to(looked_up.dtype)

    handle = tower.input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


@TEXT_ENCODERS.register("small_transformer")
class SmallTextTransformer(nn.Module):
    """Pre-norm transformer over word tokens with learned positions; pooled at [CLS]."""

    def __init__(self, vocab: str = "shapes", width: int = 128, layers: int = 2, heads: int = 4,
                 max_length: int = 32, pooling: str = "cls", dropout: float = 0.0) -> None:
        super().__init__()
        self.tokenizer = word_tokenizer(named_vocabulary(vocab))
        self.max_length = max_length
        self.pooling = pooling
        self.output_dim = self.token_dim = width
        self.embed = nn.Embedding(len(self.tokenizer), width, padding_idx=self.tokenizer.pad_token_id)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, width))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        mask = attention_mask.bool()
        x = self.embed(input_ids) + self.pos_embed[:, : input_ids.shape[1]]
        x = self.norm(self.transformer(x, src_key_padding_mask=~mask))
        return TextOutput(pooled=pool(x, mask, self.pooling), tokens=x, mask=mask)

    def input_embeddings(self) -> nn.Embedding:
        return self.embed

    def position_table(self) -> torch.Tensor:
        """(max_length, width): the learned position embeddings (CLIP4Clip starts frame positions from them)."""
        return self.pos_embed[0]


@TEXT_ENCODERS.register("hf:")
class HFTextEncoder(nn.Module):
    """``hf:<local dir | hub id | model type>``: a transformers encoder (BERT, RoBERTa, ...).

    - ``pretrained: true`` loads the weights from a local directory (works offline) or the hub;
    - ``pretrained: false`` (default, as for every tower source: nothing is fetched unasked)
      builds the architecture from its config with fresh weights;
      ``config:`` overrides config fields (e.g. ``num_hidden_layers: 2`` to shrink it);
    - a model type (``hf:bert``) builds from ``config:`` alone and needs ``tokenizer:``.
    """

    def __init__(self, name_or_path: str, pretrained: bool = False, config: dict[str, Any] | None = None,
                 tokenizer: str | None = None, pooling: str = "cls", max_length: int = 64,
                 grad_checkpointing: bool = False, where: str = "model.text") -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        overrides = dict(config or {})
        if name_or_path.startswith("pkg:"):  # a model folder shipped inside an installed package
            name_or_path = str(local_path(name_or_path, f"{where}.name"))
        if tokenizer and tokenizer.startswith("pkg:"):
            tokenizer = str(local_path(tokenizer, f"{where}.tokenizer"))
        missing_folder(name_or_path, f"{where}.name")
        if tokenizer:
            missing_folder(tokenizer, f"{where}.tokenizer")
        is_dir = Path(name_or_path).is_dir()
        try:
            if not is_dir and name_or_path in CONFIG_MAPPING:
                hf_config = AutoConfig.for_model(name_or_path, **overrides)
                pretrained = False
                if tokenizer is None:
                    raise UserError(f"{where}.tokenizer: hf:{name_or_path} is built from a config and has no vocabulary: "
                                      f"give tokenizer: <local dir or hub id>.")
            else:
                hf_config = AutoConfig.from_pretrained(name_or_path, **overrides)
            # BERT-style pooler layers are never read (pooling happens here): left in, they would
            # be parameters without gradients, which DDP rejects
            no_pooler = {"add_pooling_layer": False} if hf_config.model_type in ("bert", "roberta") else {}
            if pretrained:
                self.model = AutoModel.from_pretrained(name_or_path, config=hf_config, **no_pooler)
            else:
                self.model = AutoModel.from_config(hf_config, **no_pooler)
            if getattr(self.model, "pooler", None) is not None:  # other encoders with a pooler (MPNet, ALBERT...)
                self.model.pooler = None
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or name_or_path)
        except OSError as err:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise UserError(f"{where}.name: hf:{name_or_path}: cannot load{' (HF_HUB_OFFLINE=1)' if offline else ''}: "
                              f"{str(err).splitlines()[0]} Give a local directory with config.json "
                              f"and tokenizer files.") from None
        if grad_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.pooling = pooling
        self.max_length = min(max_length, getattr(hf_config, "max_position_embeddings", max_length))
        self.output_dim = self.token_dim = hf_config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        return TextOutput(pooled=pool(tokens, mask, self.pooling), tokens=tokens, mask=mask)

    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()
