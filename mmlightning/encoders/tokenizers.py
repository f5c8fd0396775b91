"""Tokenizers. Every text encoder carries an HF ``PreTrainedTokenizerFast``, so data modules
call one interface whether the vocabulary is BERT's or the shapes world's 60 words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mmlightning.errors import UserError
from mmlightning.registry import VOCABULARIES

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer for a closed vocabulary: '[CLS] words [SEP]'."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(words) - set(SPECIAL_TOKENS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def named_vocabulary(vocab: str) -> list[str]:
    """A registered vocabulary's name (``shapes``: the embedded world's words, registered by
    its data module) or a path to a text file with one word per line."""
    if vocab in VOCABULARIES:
        return list(VOCABULARIES.get(vocab)())
    path = Path(vocab)
    if not path.is_file():
        raise UserError(f"vocab {vocab!r}: neither a registered vocabulary ({', '.join(VOCABULARIES.names())}) nor "
                        f"an existing file with one word per line.")
    return [w.strip() for w in path.read_text().splitlines() if w.strip()]


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pad to the longest text in the batch, truncate at ``max_length``. A tokenizer marked
    ``pads_to_max_length`` (its model pools a fixed position: SigLIP's last token, open_clip's
    towers) pads every text to ``max_length``."""
    padding = "max_length" if getattr(tokenizer, "pads_to_max_length", False) else "longest"
    out = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
