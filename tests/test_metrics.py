"""Retrieval recall@K (several captions per image, caption-string matches) and zero-shot accuracy."""

from __future__ import annotations

import pytest
import torch

from mmlightning.metrics import RetrievalRecall, ZeroShotAccuracy


def hand_made(metric: RetrievalRecall, pad: bool = False) -> dict[str, float]:
    images = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    # text 0 and 2 are the same string "a", owned by images 0 and 1
    texts = torch.tensor([[0, 1.0, 0.2], [0.5, 0, 0.8], [0.9, 0.1, 0], [0, 0, 1.0]])
    owner, caption, text_id = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 0, 2]), torch.arange(4)
    metric.update(images[:2], torch.tensor([0, 1]), texts[:3], owner[:3], caption[:3], text_id[:3])
    metric.update(images[2:], torch.tensor([2]), texts[3:], owner[3:], caption[3:], text_id[3:])
    if pad:  # what a distributed sampler adds to even out ranks
        metric.update(images[2:], torch.tensor([2]), texts[3:], owner[3:], caption[3:], text_id[3:])
    return {k: float(v) for k, v in metric.compute().items()}


def test_recall_by_hand() -> None:
    for pad in (False, True):
        r = hand_made(RetrievalRecall(ks=(1, 2, 5)), pad=pad)
        expected = {"i2t_R@1": 1 / 3, "i2t_R@2": 1.0, "i2t_R@1_str": 1.0, "t2i_R@1": 1 / 4, "t2i_R@2": 3 / 4,
                    "t2i_R@5": 1.0, "t2i_R@1_str": 3 / 4, "t2i_R@2_str": 1.0}
        assert r == pytest.approx({**r, **expected})


def test_recall_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    n_img, per = 40, 3
    images = torch.randn(n_img, 8, generator=g)
    owner = torch.arange(n_img).repeat_interleave(per)
    texts = images[owner] + 1.5 * torch.randn(len(owner), 8, generator=g)
    caption = torch.randint(0, 60, (len(owner),), generator=g)
    metric = RetrievalRecall(ks=(1, 5, 10), chunk=7)
    metric.update(images, torch.arange(n_img), texts, owner, caption, torch.arange(len(owner)))
    got = metric.compute()
    sim = images @ texts.T
    for k in (1, 5, 10):
        top = sim.topk(k, dim=1).indices
        expect = sum(bool((owner[top[i]] == i).any()) for i in range(n_img)) / n_img
        assert abs(float(got[f"i2t_R@{k}"]) - expect) < 1e-6
        top_t = sim.T.topk(k, dim=1).indices
        expect_t = sum(bool((top_t[j] == owner[j]).any()) for j in range(len(owner))) / len(owner)
        assert abs(float(got[f"t2i_R@{k}"]) - expect_t) < 1e-6
        has = {(int(o), int(c)) for o, c in zip(owner, caption)}
        expect_s = sum(any((i, int(caption[t])) in has for t in top[i]) for i in range(n_img)) / n_img
        assert abs(float(got[f"i2t_R@{k}_str"]) - expect_s) < 1e-6


def test_zero_shot_accuracy_groups() -> None:
    metric = ZeroShotAccuracy(num_classes=3, groups={"heldout": [2]}, top_k=(1, 2))
    logits = torch.tensor([[3.0, 2, 1], [1, 3, 2], [1, 3, 2], [0, 0, 0]])
    metric.update(logits, torch.tensor([0, 1, 2, -1]))  # -1: not a single-class image, ignored
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx({"top1": 2 / 3, "top2": 1.0, "top1_heldout": 0.0, "top2_heldout": 1.0})
