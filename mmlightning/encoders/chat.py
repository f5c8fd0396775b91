"""Conversations as token ids for a generative vision-language model (LLaVA-style).

A conversation is a list of messages ``{"role": "user" | "assistant" | "system", "content": str}``
whose first user message holds the image placeholder ``<image>`` once. ``ChatFormat`` renders it
with the tokenizer's chat template (or ``DEFAULT_CHAT_TEMPLATE`` when the tokenizer has none),
expands the placeholder to the ``image_tokens`` positions the projected image features will
fill, and labels only the assistant's tokens (its end-of-turn token included, so the model
learns to stop); every prompt, system and image position is -100.

The assistant spans come from rendering the conversation up to each assistant message with
the generation prompt and then through it: the tokens between are the answer. This needs a
template whose renderings are prefixes of one another, which ``encode`` checks.

Truncation cuts from the end and never into the image tokens: a conversation whose prompt and
image do not fit in ``max_length`` is an error naming the sample.
"""

from __future__ import annotations

from typing import Any

import torch

from mmlightning.errors import UserError

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100  # cross_entropy's ignore_index: positions that are not the assistant's
USER_TAG, ASSISTANT_TAG = "<|user|>", "<|assistant|>"
# For tokenizers without a chat template (GPT-2's BPE, the shapes world's words):
#   BOS <|user|> question <|assistant|> answer EOS <|user|> ... ; the tags are added as special tokens
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}" + ASSISTANT_TAG + " {{ m['content'] }}{{ eos_token }}"
    "{% else %}" + USER_TAG + " {{ m['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT_TAG + "{% endif %}"
)
ROLES = ("system", "user", "assistant")


def prepare_chat_tokenizer(tokenizer: Any) -> list[str]:
    """Give ``tokenizer`` the image placeholder as a special token, and the default chat
    template with its two role tags when it has no template of its own. Returns the tokens
    added (the language model's embedding table must grow by as many)."""
    added = [IMAGE_PLACEHOLDER]
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        added += [USER_TAG, ASSISTANT_TAG]
    new = [t for t in added if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)  # never split, skipped when decoding
    return new


class ChatFormat:
    """Turns conversations into training sequences (ids and labels) and generation prompts,
    for one tokenizer, image-token count and length limit. Data modules receive it as the
    task's ``tokenizer`` (``DataSpec``) and call ``encode`` / ``encode_prompt`` / ``collate``."""

    def __init__(self, tokenizer: Any, image_tokens: int, max_length: int) -> None:
        self.tokenizer, self.image_tokens, self.max_length = tokenizer, int(image_tokens), int(max_length)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if self.image_token_id in (None, tokenizer.unk_token_id):
            raise ValueError("ChatFormat: the tokenizer has no image placeholder: call prepare_chat_tokenizer first")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ one conversation
    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @staticmethod
    def check(messages: list[dict[str, str]], where: str, prompt: bool = False) -> None:
        """A conversation as ``encode`` needs it: known roles, text content, one image
        placeholder in the first user message and none elsewhere, and (unless ``prompt``) at
        least one assistant message."""
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: a conversation must be a non-empty list of messages, got {messages!r:.80}.")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: message {k} must be {{role: {'|'.join(ROLES)}, content: text}}, "
                                  f"got {m!r:.80}.")
        users = [k for k, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise UserError(f"{where}: the conversation has no user message to hold the image.")
        count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if count != 1 or IMAGE_PLACEHOLDER not in messages[users[0]]["content"]:
            what = "missing" if count == 0 else (f"repeated ({count} times)" if count > 1 else "not in the first user message")
            raise UserError(f"{where}: the image placeholder {IMAGE_PLACEHOLDER} is {what}; it must appear once, "
                              f"in the first user message.")
        if not prompt and not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: the conversation has no assistant message to learn from.")

    def encode(self, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
        """Token ids and labels (-100 except on the assistant's tokens) of a whole conversation,
        the image placeholder expanded to ``image_tokens`` positions."""
        self.check(messages, where)
        spans: list[tuple[int, int]] = []
        ids: list[int] = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._ids(self._render(messages[:k], generation_prompt=True))
            through = self._ids(self._render(messages[:k + 1], generation_prompt=False))
            if through[:len(before)] != before or through[:len(ids)] != ids:
                raise UserError(f"{where}: the tokenizer's chat template does not render a conversation as a prefix of "
                                  f"its continuation, so the assistant's tokens cannot be told apart; give "
                                  f"model.lm.chat_template: default.")
            spans.append((len(before), len(through)))
            ids = through
        if messages[-1]["role"] != "assistant":  # trailing user turns carry no loss but still read
            ids = self._ids(self._render(messages, generation_prompt=False))
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        return self._expand_and_fit(ids, labels, where)

    def encode_prompt(self, messages: list[dict[str, str]], where: str) -> list[int]:
        """Token ids of a conversation that ends with a user message, through the generation
        prompt: what the model continues with its answer."""
        self.check(messages, where, prompt=True)
        if messages[-1]["role"] != "user":
            raise UserError(f"{where}: a prompt to answer must end with a user message, not {messages[-1]['role']}.")
        ids = self._ids(self._render(messages, generation_prompt=True))
        return self._expand_and_fit(ids, [IGNORE_INDEX] * len(ids), where)[0]

    def _expand_and_fit(self, ids: list[int], labels: list[int], where: str) -> tuple[list[int], list[int]]:
        at = [k for k, t in enumerate(ids) if t == self.image_token_id]
        if len(at) != 1:  # check() counted the text; a template that repeats content would land here
            raise UserError(f"{where}: the rendered conversation holds the image placeholder {len(at)} times, not once.")
        p, n = at[0], self.image_tokens
        ids = ids[:p] + [self.image_token_id] * n + ids[p + 1:]
        labels = labels[:p] + [IGNORE_INDEX] * n + labels[p + 1:]
        if p + n > self.max_length:
            raise UserError(f"{where}: the image's {n} tokens end at position {p + n}, past max_length "
                              f"{self.max_length}; raise model.max_length (truncation never cuts the image).")
        return ids[:self.max_length], labels[:self.max_length]

    def pack(self, conversations: list[list[dict[str, str]]], where: str) -> tuple[list[int], ...]:
        """Conversations about one image in one sequence that holds the image once: the shared
        start (through the image tokens) and then each conversation's own tokens, as a block.
        Returns ids, labels, position ids and segments (0: the shared start, k: the k-th
        conversation), from which ``block_attention`` lets each block see the shared start and
        itself only, at the positions it has alone: the same logits as encoding each
        conversation apart, for one pass over the image."""
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        segments: list[int] = []
        for k, messages in enumerate(conversations, start=1):
            seq, lab = self.encode(messages, where)
            start = seq.index(self.image_token_id) + self.image_tokens
            if not ids:
                ids, labels = seq[:start], lab[:start]
                positions, segments = list(range(start)), [0] * start
            elif seq[:start] != ids[:start]:
                raise UserError(f"{where}: conversation {k} starts differently from the first up to the image, so "
                                  f"they cannot share it; pack conversations whose first message starts alike.")
            ids, labels = ids + seq[start:], labels + lab[start:]
            positions += list(range(start, len(seq)))
            segments += [k] * (len(seq) - start)
        if len(ids) > self.max_length:
            raise UserError(f"{where}: {len(conversations)} conversations packed take {len(ids)} tokens, past "
                              f"max_length {self.max_length}; pack fewer or raise model.max_length.")
        return ids, labels, positions, segments

    # ------------------------------------------------------------------ batches
    def collate(self, sequences: list[list[int]], labels: list[list[int]] | None = None,
                left: bool = False, positions: list[list[int]] | None = None,
                segments: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
        """Pad to the longest: on the right for training (``labels`` padded with -100), on the
        left for generation, so every prompt ends where the answer starts. Packed sequences
        (``pack``) bring their ``position_ids`` and ``segments`` (-1 on padding)."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        extra = {"labels": (labels, IGNORE_INDEX), "position_ids": (positions, 0), "segments": (segments, -1)}
        filled = {key: torch.full((len(sequences), width), fill, dtype=torch.long)
                  for key, (rows, fill) in extra.items() if rows is not None}
        for row, seq in enumerate(sequences):
            cut = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, cut] = torch.tensor(seq, dtype=torch.long)
            mask[row, cut] = 1
            for key, tensor in filled.items():
                tensor[row, cut] = torch.tensor(extra[key][0][row], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, **filled}


def block_attention(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask (B, 1, T, T) of packed sequences (``ChatFormat.pack``):
    causal, and a token of block k attends to the shared start (segment 0) and to block k,
    never to padding (-1) or another block. 0 where attention is allowed, the dtype's minimum
    elsewhere: the 4-D form transformers' models take as it is."""
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(segments.shape[1], dtype=torch.bool, device=segments.device)  # padding rows see themselves
    zero = torch.zeros((), dtype=dtype, device=segments.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]
