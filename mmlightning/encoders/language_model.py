"""Causal language models for generative vision-language models (LLaVA-style): the image's
projected tokens take the place of the ``<image>`` placeholder in the input embeddings; no
cross-attention (that is the captioning decoder, decoder.py).

    hf:<local dir | hub id | model type>   any AutoModelForCausalLM (gpt2, llama, qwen2, ...)
    small_lm                               a 2-layer Llama over the shapes world's words

Each carries its ``tokenizer``, given the image placeholder (and, if it has no chat template,
the default one: chat.py), with the embedding table grown to match. LoRA comes from ``peft``
(``add_lora``); ``save_adapter``/``merged`` are peft's own save and merge.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmlightning.encoders.chat import DEFAULT_CHAT_TEMPLATE, prepare_chat_tokenizer
from mmlightning.encoders.decoder import load_causal_lm, load_decoder_tokenizer
from mmlightning.encoders.weights import missing_folder
from mmlightning.errors import UserError
from mmlightning.registry import LANGUAGE_MODELS, did_you_mean

LORA_OPTIONS = ("r", "alpha", "dropout", "target_modules", "bias", "use_rslora")


@LANGUAGE_MODELS.register("hf:")
class CausalLM(nn.Module):
    """``hf:<name>``: ``AutoModelForCausalLM``.

    - ``pretrained: true`` loads the weights from a local directory or the hub;
    - ``pretrained: false`` (default: nothing is fetched unasked) builds from the config with
      fresh weights, ``config:`` overriding fields (``num_hidden_layers: 2``);
    - a model type (``hf:llama``) builds from ``config:`` alone and needs ``tokenizer:``: a
      directory, a hub id, ``shapes`` or a word-list file;
    - ``chat_template: default`` uses chat.py's template even where the tokenizer has one.
    """

    def __init__(self, name_or_path: str, pretrained: bool = False, config: dict[str, Any] | None = None,
                 tokenizer: str | None = None, chat_template: str | None = None, dtype: str | None = None,
                 where: str = "model.lm") -> None:
        super().__init__()
        missing_folder(name_or_path, f"{where}.name")
        self.tokenizer = load_decoder_tokenizer(tokenizer or name_or_path)
        if chat_template not in (None, "default"):
            raise UserError(f"{where}.chat_template: {chat_template!r}; valid: null (the tokenizer's own, else the "
                              f"default) or 'default'.")
        if chat_template == "default":
            self.tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        prepare_chat_tokenizer(self.tokenizer)
        self.model, hf_config = load_causal_lm(name_or_path, pretrained, dict(config or {}), self.tokenizer,
                                               tokenizer is not None, where, "a causal language model",
                                               getattr(torch, dtype) if dtype else None)
        if len(self.tokenizer) > self.model.get_input_embeddings().num_embeddings:
            # the placeholder and role tags are new rows; mean-initialised, as transformers does
            self.model.resize_token_embeddings(len(self.tokenizer))
        self.hidden_size = hf_config.hidden_size
        self.max_positions = (getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
                              or 1 << 30)
        self.where = where

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, T, V) for every position; ``attention_mask`` is (B, T) or a
        4-D additive mask (packed sequences, with their ``position_ids``)."""
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **options: Any) -> torch.Tensor:
        """New token ids (B, L) after left-padded prompt embeddings; ``options`` are
        transformers' ``generate`` options (max_new_tokens, num_beams, do_sample, ...)."""
        return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                                   **options)

    # ------------------------------------------------------------------ LoRA (peft)
    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def add_lora(self, spec: dict[str, Any], where: str = "model.lora") -> None:
        """Wrap the model in peft's LoRA: the base weights frozen, adapters on the modules named
        by ``target_modules`` (e.g. ``[q_proj, v_proj]``; ``all-linear`` for every linear layer)."""
        from peft import LoraConfig, get_peft_model

        for key in spec:
            if key not in LORA_OPTIONS:
                raise UserError(f"{where}.{key}: unknown LoRA option.{did_you_mean(key, list(LORA_OPTIONS))} "
                                  f"Valid: {', '.join(LORA_OPTIONS)}.")
        rank = spec.get("r", 8)
        if not isinstance(rank, int) or rank < 1:
            raise UserError(f"{where}.r: the LoRA rank must be a whole number >= 1, got {rank!r}.")
        targets = spec.get("target_modules", "all-linear")
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in self.model.named_modules()
                               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
        if targets != "all-linear":
            missing = [t for t in targets if t not in linear_names]
            if missing:
                raise UserError(f"{where}.target_modules: {missing} name no layer of {type(self.model).__name__}; "
                                  f"its linear layers: {', '.join(linear_names)} (or 'all-linear').")
        config = LoraConfig(r=rank, lora_alpha=spec.get("alpha", 2 * rank), lora_dropout=spec.get("dropout", 0.0),
                            target_modules=targets, bias=spec.get("bias", "none"),
                            use_rslora=spec.get("use_rslora", False), task_type="CAUSAL_LM")
        self.model = get_peft_model(self.model, config)

    def merged(self) -> nn.Module:
        """The transformers model with the LoRA updates folded into its weights (a copy; this
        module keeps its adapters)."""
        import copy

        if not self.has_lora:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()


@LANGUAGE_MODELS.register("small_lm")
def small_lm(vocab: str = "shapes", width: int = 128, layers: int = 2, heads: int = 4, mlp_width: int = 256,
             max_positions: int = 256, dropout: float = 0.0) -> CausalLM:
    """A Llama built small over a closed word vocabulary: no download, trains on a CPU."""
    config = {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "intermediate_size": mlp_width, "max_position_embeddings": max_positions,
              "attention_dropout": dropout, "tie_word_embeddings": False}
    return CausalLM("llama", pretrained=False, config=config, tokenizer=vocab)
