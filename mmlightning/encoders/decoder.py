"""Text decoders for captioning: an HF transformers causal LM with cross-attention over visual
tokens. Generation (greedy, beam search, nucleus sampling) is transformers' ``generate``.

    hf:<local dir | hub id | model type>   e.g. hf:gpt2 with config: {n_layer: 2, ...}
    small_decoder                          a 2-layer GPT-2 over the shapes world's words

Each decoder carries its ``tokenizer`` (which wraps every caption as BOS ... EOS) and
``max_length``, which the data module uses to tokenize captions once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmlightning.encoders.tokenizers import named_vocabulary, word_tokenizer
from mmlightning.encoders.weights import local_path, missing_folder
from mmlightning.errors import UserError
from mmlightning.registry import TEXT_DECODERS, VOCABULARIES


@TEXT_DECODERS.register("hf:")
class HFCausalDecoder(nn.Module):
    """``hf:<name>``: ``AutoModelForCausalLM`` with cross-attention switched on.

    - ``pretrained: true`` loads the weights from a local directory or the hub (the new
      cross-attention layers start fresh);
    - ``pretrained: false`` (default: nothing is fetched unasked) builds from the config with
      fresh weights; ``config:`` overrides
      fields (``n_layer: 2``);
    - a model type with ``pretrained: false`` (``hf:gpt2``) builds from ``config:`` alone and
      needs ``tokenizer:``: a directory, a hub id, ``shapes`` or a word-list file.
    """

    def __init__(self, name_or_path: str, pretrained: bool = False, config: dict[str, Any] | None = None,
                 tokenizer: str | None = None, max_length: int = 32, where: str = "model.decoder") -> None:
        super().__init__()
        missing_folder(name_or_path, f"{where}.name")
        self.tokenizer = load_decoder_tokenizer(tokenizer or name_or_path)
        overrides = {"add_cross_attention": True, "is_decoder": True, **(config or {})}
        self.model, hf_config = load_causal_lm(name_or_path, pretrained, overrides, self.tokenizer, tokenizer is not None,
                                               where, "a captioning decoder")
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise UserError(f"{where}.tokenizer: hf:{name_or_path}: tokenizer has {len(self.tokenizer)} tokens, the model "
                              f"{self.model.config.vocab_size}.")
        positions = getattr(hf_config, "n_positions", None) or getattr(hf_config, "max_position_embeddings", max_length)
        self.max_length = min(max_length, positions)
        self.hidden_size = hf_config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) for every position, attending to ``visual`` (B, N, H)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=visual,
                          use_cache=False).logits

    @torch.no_grad()
    def generate(self, visual: torch.Tensor, **options: Any) -> torch.Tensor:
        """Token ids (B, L) starting after BOS; ``options`` are ``generate``'s (num_beams,
        length_penalty, min_new_tokens, max_new_tokens, do_sample, top_p, ...)."""
        start = torch.full((len(visual), 1), self.tokenizer.bos_token_id, dtype=torch.long, device=visual.device)
        out = self.model.generate(input_ids=start, attention_mask=torch.ones_like(start), encoder_hidden_states=visual,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                                  **options)
        return out[:, 1:]


@TEXT_DECODERS.register("small_decoder")
def small_decoder(vocab: str = "shapes", width: int = 128, layers: int = 2, heads: int = 4,
                  max_length: int = 32, dropout: float = 0.0) -> HFCausalDecoder:
    """A GPT-2 built small over a closed word vocabulary: no download, trains on a CPU."""
    config = {"n_embd": width, "n_layer": layers, "n_head": heads, "n_positions": max_length,
              "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    return HFCausalDecoder("gpt2", pretrained=False, config=config, tokenizer=vocab, max_length=max_length)


def load_causal_lm(name_or_path: str, pretrained: bool, config: dict[str, Any], tokenizer: Any, tokenizer_given: bool,
                   where: str, purpose: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """An ``AutoModelForCausalLM`` and its config: from a local directory or hub id (weights
    with ``pretrained``), or a model type built from ``config`` alone over ``tokenizer``'s
    vocabulary (which must then have been given); ``config`` overrides fields either way."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    try:
        if not Path(name_or_path).is_dir() and name_or_path in CONFIG_MAPPING and not pretrained:
            if not tokenizer_given:
                raise UserError(f"{where}.tokenizer: hf:{name_or_path} is built from a config and has no vocabulary: "
                                  f"give tokenizer: <local dir, hub id, 'shapes' or a word-list file>.")
            hf_config = AutoConfig.for_model(name_or_path, vocab_size=len(tokenizer), **ids, **config)
            pretrained = False
        else:
            hf_config = AutoConfig.from_pretrained(name_or_path, **config)
            hf_config.update({k: v for k, v in ids.items() if getattr(hf_config, k, None) is None})
        if pretrained:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, config=hf_config,
                                                         **({"dtype": dtype} if dtype is not None else {}))
        else:
            model = AutoModelForCausalLM.from_config(hf_config)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise UserError(f"{where}.name: hf:{name_or_path}: cannot load{' (HF_HUB_OFFLINE=1)' if offline else ''}: "
                          f"{str(err).splitlines()[0]} Give a local directory or a model type with config:.") from None
    except (ValueError, AttributeError) as err:  # e.g. an encoder-only architecture has no causal LM head
        raise UserError(f"{where}.name: hf:{name_or_path}: not usable as {purpose}: {err}") from None
    return model, hf_config


def load_decoder_tokenizer(name: str):
    """A fast tokenizer that wraps text as BOS ... EOS and has a pad token. Word vocabularies
    use [CLS] / [SEP] as BOS / EOS; GPT-2-style BPE tokenizers get their one special token
    (<|endoftext|>) on both ends, and it pads too (the attention mask tells padding apart)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    if name.startswith("pkg:"):  # a tokenizer folder shipped inside an installed package, as text towers take
        name = str(local_path(name, "model.decoder.tokenizer"))
    missing_folder(name, "model.decoder.tokenizer")
    if name in VOCABULARIES or Path(name).is_file():
        tok = word_tokenizer(named_vocabulary(name))
        tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
        return tok
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise UserError(f"tokenizer {name!r}: cannot load: {str(err).splitlines()[0]}") from None
    if not tok.is_fast:
        raise UserError(f"tokenizer {name!r}: a fast (Rust) tokenizer is needed.")
    bos = tok.bos_token or tok.cls_token or tok.eos_token
    eos = tok.eos_token or tok.sep_token or bos
    if bos is None:
        raise UserError(f"tokenizer {name!r} has no BOS/CLS/EOS token to start captions with.")
    tok.bos_token, tok.eos_token = bos, eos
    if tok.pad_token is None:
        tok.pad_token = eos
    sample = tok("a")["input_ids"]
    if sample[0] != tok.bos_token_id or sample[-1] != tok.eos_token_id:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)])
    return tok
