"""Retrieval recall@K (several captions per image, caption-string matches) and zero-shot accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmlightning.metrics import RetrievalRecall, TopKAccuracy


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
    metric = TopKAccuracy(num_classes=3, groups={"heldout": [2]}, top_k=(1, 2))
    logits = torch.tensor([[3.0, 2, 1], [1, 3, 2], [1, 3, 2], [0, 0, 0]])
    metric.update(logits, torch.tensor([0, 1, 2, -1]), torch.arange(4))  # -1: not a single-class image, ignored
    metric.update(logits[2:3], torch.tensor([2]), torch.tensor([2]))  # a sampler's repeat of image 2: counted once
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx({"top1": 2 / 3, "top2": 1.0, "top1_heldout": 0.0, "top2_heldout": 1.0})
    images, accuracy = metric.per_class()
    assert images.tolist() == [1, 1, 1] and accuracy[:, 0].tolist() == [1.0, 1.0, 0.0]


def _padded_eval_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    from mmlightning.metrics import VQAAccuracy, TopKAccuracy

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    scores, groups, logits, labels = _eval_split()
    share = list(DistributedSampler(range(len(scores)), num_replicas=world, rank=rank, shuffle=False))
    vqa, zero_shot = VQAAccuracy(["a", "b"]), TopKAccuracy(3, top_k=(1, 2))
    ids = torch.tensor(share)
    vqa.update(scores[ids], groups[ids], ids)
    zero_shot.update(logits[ids], labels[ids], ids)
    torch.save({**vqa.compute(), **zero_shot.compute()}, f"{out}.{rank}")
    dist.destroy_process_group()


def _eval_split() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    n = 7  # not a multiple of 2 or 3 ranks: the sampler repeats samples to even the shares
    return (torch.rand(n, generator=generator), torch.randint(0, 2, (n,), generator=generator),
            torch.randn(n, 3, generator=generator), torch.randint(0, 3, (n,), generator=generator))


def test_metrics_count_the_distributed_samplers_repeats_once(tmp_path: Path) -> None:
    """Three gloo ranks, each evaluating its share of a 7-sample split as Lightning's
    DistributedSampler deals it (9 samples: 2 repeated), synced by torchmetrics: the same
    VQA and zero-shot figures as one process over the 7."""
    import socket

    import torch.multiprocessing as mp

    from mmlightning.metrics import VQAAccuracy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_padded_eval_worker, args=(3, port, str(tmp_path / "m")), nprocs=3, start_method="spawn")
    scores, groups, logits, labels = _eval_split()
    vqa, zero_shot = VQAAccuracy(["a", "b"]), TopKAccuracy(3, top_k=(1, 2))
    vqa.update(scores, groups, torch.arange(7))
    zero_shot.update(logits, labels, torch.arange(7))
    expected = {k: float(v) for k, v in {**vqa.compute(), **zero_shot.compute()}.items()}
    assert expected["acc"] == pytest.approx(float(scores.mean()))
    for rank in range(3):
        got = {k: float(v) for k, v in torch.load(tmp_path / f"m.{rank}").items()}
        assert got == pytest.approx(expected), rank
