"""What fusion-encoder pretraining draws before its losses: hard negatives for image-text
matching (ITM) and masked tokens for masked language modelling (MLM).

**ITM hard negatives** (ALBEF, BLIP): for each image, a caption drawn with probability in
proportion to the softmax of its ITC similarities, and for each caption an image likewise,
never a pair that is in fact a match: the same image id, or an identical caption string
(``caption_id``), since an image with several captions, or two scenes with the same caption,
would otherwise teach the matcher to reject true pairs (ALBEF #126). The draw is made on the
global batch from a generator seeded by (seed, step), so every rank draws the same negatives
for the same rows and 2 ranks equal one process with the global batch.

**MLM masking** (BERT): each real, non-special token is chosen with probability ``prob``;
of the chosen, 80% become the mask token, 10% a random word, 10% stay; the labels hold the
original ids at the chosen positions and -100 everywhere else (what cross-entropy ignores).
"""

from __future__ import annotations

import torch

from mmlightning.errors import UserError

IGNORE = -100


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The same random stream on every rank for one training step."""
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))
    return generator


def negative_weights(similarity: torch.Tensor, query_image_ids: torch.Tensor, key_image_ids: torch.Tensor,
                     query_caption_ids: torch.Tensor | None = None,
                     key_caption_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax of ``similarity`` (queries x keys) over each row, with every true match (same
    image id, or the same caption string where caption ids are given) set to zero."""
    match = query_image_ids[:, None] == key_image_ids[None, :]
    if query_caption_ids is not None and key_caption_ids is not None:
        match |= query_caption_ids[:, None] == key_caption_ids[None, :]
    weights = torch.softmax(similarity.float(), dim=1).masked_fill(match, 0.0)
    return weights


def draw_negatives(weights: torch.Tensor, generator: torch.Generator, what: str = "pair") -> torch.Tensor:
    """One key index per row, drawn in proportion to the row's weights. A row with no
    candidate (every key in the batch matches it) is an error: the batch is too small or too
    uniform to hold a negative."""
    empty = weights.sum(dim=1) <= 0
    if bool(empty.any()):
        row = int(empty.nonzero()[0])
        raise UserError(f"itm: row {row} of the batch has no {what} to draw as a hard negative: every other one shares "
                        f"its image id or its caption. Raise data.batch_size (needs >= 2 distinct images and captions).")
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def special_ids(tokenizer: object) -> list[int]:
    return sorted({int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None})


def mask_token_id(tokenizer: object, where: str = "model.text") -> int:
    token_id = getattr(tokenizer, "mask_token_id", None)
    if token_id is None:
        raise UserError(f"{where}: its tokenizer has no mask token, which masked language modelling needs; use a "
                        f"BERT-style text tower (hf: with [MASK], or small_transformer), or set loss weight mlm: 0.")
    return int(token_id)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer: object, prob: float,
                generator: torch.Generator, first_row: int = 0, total_rows: int | None = None,
                max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, labels) by BERT's 80/10/10 rule (see the module docstring). The
    random numbers are drawn for a (``total_rows``, ``max_length``) grid and this batch takes
    rows ``first_row`` on and its own width: a rank's rows of a global batch get the draws one
    process would give them, whatever each rank pads to."""
    if not 0 < prob < 1:
        raise UserError(f"model.mlm_probability must be in (0, 1), got {prob}.")
    mask_id = mask_token_id(tokenizer)
    rows, width = input_ids.shape
    total_rows, max_length = total_rows or rows, max(max_length or width, width)
    grid = (total_rows, max_length)

    def draw(values: torch.Tensor) -> torch.Tensor:
        return values[first_row:first_row + rows, :width].to(input_ids.device)

    specials = set(special_ids(tokenizer))
    words = torch.tensor([i for i in range(len(tokenizer)) if i not in specials], device=input_ids.device)  # type: ignore[arg-type]
    chosen_draw = draw(torch.rand(grid, generator=generator, device=generator.device))
    how = draw(torch.rand(grid, generator=generator, device=generator.device))
    picks = draw(torch.randint(len(words), grid, generator=generator, device=generator.device))
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(sorted(specials), device=input_ids.device,
                                                                             dtype=input_ids.dtype))
    chosen = candidates & (chosen_draw < prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    masked = input_ids.clone()
    masked[chosen & (how < 0.8)] = mask_id
    swap = chosen & (how >= 0.8) & (how < 0.9)
    masked[swap] = words[picks[swap]]
    return masked, labels
