"""Fusion-encoder pretraining: hard negatives never match and follow their weights, MLM labels
sit on the masked words only, 2 gloo ranks equal one process, and a VQA run starts from the
pretrained fusion encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmlightning.cli import main
from mmlightning.data_modules.shapes_world import vocabulary
from mmlightning.encoders.tokenizers import word_tokenizer
from mmlightning.errors import UserError
from mmlightning.fusion_objectives import IGNORE, draw_negatives, mask_tokens, negative_weights, step_generator

TINY = ["data.num_train=256", "data.num_val=64", "data.num_test=64", "data.batch_size=32", "trainer.max_epochs=1",
        "model.fusion={name: single_stream, width: 32, layers: 1, heads: 2, hidden_dim: 32}", "logger.name=none",
        "scheduler.warmup_steps=2"]


def test_hard_negatives_never_match_and_follow_their_weights() -> None:
    image_ids = torch.tensor([0, 0, 1, 2, 3, 4])  # two captions of image 0
    caption_ids = torch.tensor([10, 11, 12, 13, 12, 14])  # rows 2 and 4: the same caption string
    similarity = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 2
    weights = negative_weights(similarity, image_ids, image_ids, caption_ids, caption_ids)
    match = (image_ids[:, None] == image_ids[None, :]) | (caption_ids[:, None] == caption_ids[None, :])
    assert torch.all(weights[match] == 0) and torch.all(weights[~match] > 0)
    generator = step_generator(0, 0)
    draws = torch.stack([draw_negatives(weights, generator) for _ in range(20000)])  # (n, rows)
    assert not match[torch.arange(6), draws].any()  # no draw is a true pair
    for row in range(6):
        frequency = torch.bincount(draws[:, row], minlength=6).float() / len(draws)
        expected = weights[row] / weights[row].sum()
        assert torch.allclose(frequency, expected, atol=0.015), (row, frequency, expected)
    # the same step draws the same negatives, whichever process draws them
    assert torch.equal(draw_negatives(weights, step_generator(3, 7)), draw_negatives(weights, step_generator(3, 7)))
    with pytest.raises(UserError, match="row 0 of the batch has no caption to draw as a hard negative"):
        draw_negatives(negative_weights(similarity[:2, :2], image_ids[:2], image_ids[:2]), generator, "caption")


def test_mlm_labels_are_the_masked_words_only() -> None:
    tokenizer = word_tokenizer(vocabulary())
    texts = ["a small red circle left of a large blue square"] * 400
    tokens = tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    masked, labels = mask_tokens(ids, mask, tokenizer, 0.15, step_generator(0, 0))
    chosen = labels != IGNORE
    specials = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert not (chosen & (specials | ~mask.bool())).any()  # never [CLS], [SEP] or padding
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    words = int((mask.bool() & ~specials).sum())
    assert abs(int(chosen.sum()) / words - 0.15) < 0.02
    as_mask = (masked[chosen] == tokenizer.mask_token_id).float().mean()
    kept = (masked[chosen] == ids[chosen]).float().mean()
    assert abs(float(as_mask) - 0.8) < 0.04 and abs(float(kept) - 0.1) < 0.04  # and about 10% swapped
    # a rank's rows of a global batch get the draws one process gives them, whatever its padding
    half = tokenizer(texts[:200], padding="longest", return_tensors="pt")
    second, second_labels = mask_tokens(half["input_ids"], half["attention_mask"], tokenizer, 0.15,
                                        step_generator(0, 0), first_row=200, total_rows=400, max_length=16)
    width = half["input_ids"].shape[1]
    assert torch.equal(second_labels, labels[200:, :width]) and torch.equal(second, masked[200:, :width])


def test_a_tokenizer_without_a_mask_token_is_refused() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mmlightning.fusion_objectives import mask_token_id

    words = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "red": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    gpt_like = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]")  # no [MASK]
    with pytest.raises(UserError, match=r"model.text: its tokenizer has no mask token, which masked language "
                                        r"modelling needs"):
        mask_token_id(gpt_like)
    assert mask_token_id(word_tokenizer(vocabulary())) == word_tokenizer(vocabulary()).mask_token_id


DDP_SCRIPT = r'''
import json, os, sys
import torch
sys.path.insert(0, os.environ["TESTS"])
from ddp_parity import compare
from mmlightning.build import build_task
from mmlightning import config as C
from mmlightning.data_modules.shapes import ShapesCLIPData

def batch_and_task():
    cfg = C.resolve(C.load_recipe("itm-mlm-shapes", json.loads(os.environ["OVERRIDES"])))
    torch.manual_seed(0)
    task = build_task(cfg)
    spec = task.data_spec()
    data = ShapesCLIPData(spec.tokenizer, spec.max_length, spec.image_config, num_train=16, num_val=4, num_test=4,
                          batch_size=16, heldout=[])
    data.setup("fit")
    batch = data.datasets["train"].__getitems__(list(range(16)))
    return task.eval(), batch  # eval: no dropout, BatchNorm on its running statistics

compare(batch_and_task)
'''


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    from ddp_parity import run

    overrides = json.dumps(["model.fusion={name: single_stream, width: 32, layers: 1, heads: 2, hidden_dim: 32}"])
    a, b = run(tmp_path, DDP_SCRIPT, port=29533, env={"OVERRIDES": overrides})
    assert abs(a["loss"] - b["loss"]) < 1e-4, (a["loss"], b["loss"])
    assert set(a["grads"]) == set(b["grads"])
    for name, grad in a["grads"].items():
        assert torch.allclose(grad, b["grads"][name], atol=1e-5, rtol=1e-3), name


def test_pretrains_then_vqa_starts_from_the_fusion_encoder(tmp_path: Path) -> None:
    from tiny import SHAPES_VQA

    from mmlightning.tasks.base import read_run_checkpoint

    assert main(["fit", "itm-mlm-shapes", *TINY, "run.name=pre"]) == 0
    summary = json.loads(Path("runs/pre/summary.json").read_text())["test"]
    for key in ("test/itm_acc", "test/mlm_acc", "test/mlm_acc_no_image", "test/mlm_acc_colour",
                "test/mlm_acc_relation_no_image", "test/t2i_R@1", "test/t2i_R@1_itm"):
        assert 0 <= summary[key] <= 1, key
    from mmlightning import config as C
    from mmlightning.build import build_task

    fusion = "model.fusion={name: single_stream, width: 32, layers: 1, heads: 2, hidden_dim: 32}"
    vqa = build_task(C.resolve(C.load_recipe("vqa-shapes", [*SHAPES_VQA, fusion, "model.init_from=runs/pre"])))
    _, _, pre = read_run_checkpoint("runs/pre", "x")
    loaded = {f"fusion.{k}": v for k, v in vqa.fusion.state_dict().items()}
    assert loaded and all(torch.equal(pre[k], v) for k, v in loaded.items())
    assert all(torch.equal(pre[f"vision.{k}"], v) for k, v in vqa.vision.state_dict().items())
    # a fusion head of another architecture is refused, naming the key and what the run built
    with pytest.raises(UserError, match=r"model.init_from: the fusion tower in .* does not fit this recipe's "
                                        r"model.fusion; that run built it as .*single_stream"):
        build_task(C.resolve(C.load_recipe("vqa-shapes", [*SHAPES_VQA, "model.init_from=runs/pre"])))
