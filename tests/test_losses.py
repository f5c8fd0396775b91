"""The contrastive losses against open_clip's, on one process and across two (gloo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from mmlightning.losses import ClipLoss, SigLipLoss


def features(n: int = 24, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    return image, text, scale


def loss_and_grads(loss_fn, *args, **kwargs) -> list[torch.Tensor]:
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    loss = loss_fn(*args, **kwargs)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("local_loss", [True, False])
def test_clip_loss_equals_open_clip(local_loss: bool) -> None:
    ours = loss_and_grads(ClipLoss(local_loss=local_loss), *features())
    ref = loss_and_grads(OpenClipLoss(local_loss=local_loss), *features())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_siglip_loss_equals_open_clip() -> None:
    image, text, scale = features()
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    ours = loss_and_grads(SigLipLoss(), image, text, scale, logit_bias=bias)
    ref = loss_and_grads(OpenSigLipLoss(), image, text, scale, bias)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_caption_positives() -> None:
    image, text, scale = features(n=6)
    unique = torch.arange(6)
    # with all captions distinct it is plain InfoNCE
    torch.testing.assert_close(ClipLoss(caption_positives=True)(image, text, scale, caption_ids=unique),
                               ClipLoss()(image, text, scale), atol=1e-12, rtol=0)
    # two images sharing a caption: the row is a 50/50 target over both, computed by hand
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    logits = scale * image @ text.T
    targets = (ids[:, None] == ids[None, :]).double()
    targets = targets / targets.sum(1, keepdim=True)
    expected = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(ClipLoss(caption_positives=True)(image, text, scale, caption_ids=ids), expected)


def test_bf16_features_give_fp32_loss() -> None:
    image, text, scale = features()
    loss = ClipLoss()(image.detach().bfloat16(), text.detach().bfloat16(), scale.detach().float())
    assert loss.dtype == torch.float32


# ----------------------------------------------------------------------------- two ranks

class Towers(torch.nn.Module):
    """Two linear 'towers' so gradients reach parameters through the gathered features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(8, 16)
        self.text = torch.nn.Linear(8, 16)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.5))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1), self.logit_scale.exp()


def global_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11, 12, 13])[:n]
    return torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g), ids


def run_step(model: torch.nn.Module, loss_fn, x, y, ids) -> tuple[float, dict[str, torch.Tensor]]:
    image, text, scale = model(x, y)
    loss = loss_fn(image, text, scale, caption_ids=ids, logit_bias=torch.tensor(-1.0))
    loss.backward()
    inner = model.module if hasattr(model, "module") else model
    return loss.item(), {n: p.grad.clone() for n, p in inner.named_parameters()}


LOSSES = {"clip": lambda: ClipLoss(), "clip_positives": lambda: ClipLoss(caption_positives=True),
          "siglip": lambda: SigLipLoss()}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    x, y, ids = global_batch()
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    results = {}
    for name, make in LOSSES.items():
        model = torch.nn.parallel.DistributedDataParallel(Towers())
        loss, grads = run_step(model, make(), x[part], y[part], ids[part])
        mean_loss = torch.tensor(loss)
        torch.distributed.all_reduce(mean_loss)
        results[name] = (mean_loss.item() / world, grads)
    # open_clip's own distributed loss, same flags, on the same rank-local features
    image, text, scale = Towers()(x[part], y[part])
    ref = OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(image, text, scale)
    ours = ClipLoss()(image, text, scale)
    results["open_clip_rank_loss"] = (ref.item(), ours.item())
    torch.save(results, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_rank_with_double_batch(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, y, ids = global_batch()
    for name, make in LOSSES.items():
        loss, grads = run_step(Towers(), make(), x, y, ids)
        for rank in ranks:
            ddp_loss, ddp_grads = rank[name]
            assert ddp_loss == pytest.approx(loss, abs=1e-6), name
            for key in grads:
                torch.testing.assert_close(ddp_grads[key], grads[key], atol=1e-6, rtol=1e-5, msg=f"{name} {key}")
    for rank in ranks:
        ref, ours = rank["open_clip_rank_loss"]
        assert ours == pytest.approx(ref, abs=1e-6)


def test_bf16_mixed_training_keeps_logits_and_loss_fp32(monkeypatch) -> None:
    """A real bf16-mixed Lightning step on CPU: the towers run in bf16, the logits and the
    loss in fp32 (autocast would otherwise return the logit matmul in bf16). (Lightning turns
    16-mixed into bf16-mixed on CPU: fp16 autocast is a GPU test.)"""
    precision, half = "bf16-mixed", torch.bfloat16
    import lightning as L
    from tiny import SHAPES_CLIP

    from mmlightning.build import build_datamodule, build_task, build_trainer
    from mmlightning.config import load_recipe, resolve

    seen: dict[str, set] = {"logits": set(), "features": set(), "loss": set()}
    log_softmax = F.log_softmax

    def recording_log_softmax(logits, *args, **kwargs):
        seen["logits"].add(logits.dtype)
        return log_softmax(logits, *args, **kwargs)

    monkeypatch.setattr(F, "log_softmax", recording_log_softmax)  # clip-shapes: caption_positives path

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx):
            seen["loss"].add(outputs["loss"].dtype)

    cfg = resolve(load_recipe("clip-shapes", [*SHAPES_CLIP, f"trainer.precision={precision}", "trainer.max_steps=2",
                                              "logger.name=none"]))
    task = build_task(cfg)
    task.vision.register_forward_hook(lambda module, args, out: seen["features"].add(out.pooled.dtype))
    trainer = build_trainer(cfg, None, task=task)
    trainer.callbacks.append(Record())
    trainer.fit(task, datamodule=build_datamodule(cfg, task))
    assert seen == {"logits": {torch.float32}, "features": {half}, "loss": {torch.float32}}
