"""The GPU report: open_clip's CLIP architectures trained by mmlightning on one card, beside
open_clip's own training loop and a hand-written loop, in one command.

    python benchmarks/gpu_report.py                        # one H100/H200: ViT-B-32 and ViT-B-16, bf16 (~8 min)
    python benchmarks/gpu_report.py --archs ViT-B-16 --variants plain
    python benchmarks/gpu_report.py --tiny --device cpu --precision 32-true   # the test suite's check

For each architecture (open_clip's own model configs, fresh weights) and variant (``plain``,
``compile``: torch.compile, ``checkpointing``: gradient checkpointing in both towers) it prints
samples/s, MFU and peak memory for

- **mmlightning**: the Trainer ``mml fit`` builds (progress, RNG carry-over, non-finite guard,
  checkpoint IO) on the CLIP task with ``open_clip_vision:``/``open_clip_text:`` towers;
- **open_clip**: ``open_clip_train.train.train_one_epoch``, the loop its training script runs,
  on ``open_clip.create_model(arch)`` with its AdamW and cosine schedule;

both on the same in-memory batches (random images, random captions ending in the end-of-text
token), batch size, precision and learning rate. Then the overhead ratio of mmlightning
against a hand-written loop on the identical model and batches (fused AdamW, autocast), and
the host syncs torch reports in mmlightning's training steps that do not log
(``torch.cuda.set_sync_debug_mode("warn")``; CUDA only).

MFU = 3 x forward FLOPs per step (``torch.utils.flop_counter`` on one forward of both towers
and the loss) / step time / the card's dense bf16 peak (``--peak-tflops``; known cards are
looked up by name). Step times are host timestamps between batches, median after warm-up;
each measurement runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from harness import (  # noqa: E402
    OPEN_CLIP_PRECISIONS, StepTimer, TimedBatches, hand_written_step, isolated, machine_line, median_after,
    open_clip_optimizer, open_clip_train_epoch, peak_memory_mib)

from mmlightning.build import build_task, build_trainer  # noqa: E402
from mmlightning.config import load_recipe, resolve  # noqa: E402
from mmlightning.registry import OPTIMIZERS, SCHEDULERS  # noqa: E402

VARIANTS = ("plain", "compile", "checkpointing")
DENSE_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0,
                     "H100 PCIe": 756.0, "A100": 312.0, "L40S": 362.0}
EOT = 49407  # CLIP's BPE end-of-text token: open_clip's text tower pools there (the highest id)

# a CLIP small enough for a CPU, in open_clip's config format: the suite's check of this script
TINY_ARCH = "mml-tiny-clip"
TINY_CONFIG = {"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
_config_dir = Path(tempfile.mkdtemp(prefix="mml-gpu-report-"))
(_config_dir / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
open_clip.add_model_config(_config_dir)  # at import: every measurement process imports this module


class SyntheticBatches(torch.utils.data.Dataset):
    """``count`` fixed batches of random normalised images and random captions, built once
    on the CPU; both loops read the same ones in the same order."""

    def __init__(self, arch: str, batch_size: int, count: int) -> None:
        cfg = open_clip.get_model_config(arch)
        size, length = int(cfg["vision_cfg"]["image_size"]), int(cfg["text_cfg"]["context_length"])
        generator = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(count):
            ends = torch.randint(4, length, (batch_size,), generator=generator)
            ids = torch.randint(1, EOT, (batch_size, length), generator=generator)
            position = torch.arange(length)[None, :]
            ids = torch.where(position == ends[:, None], EOT, torch.where(position > ends[:, None], 0, ids))
            self.batches.append({"image": torch.randn(batch_size, 3, size, size, generator=generator),
                                 "input_ids": ids, "attention_mask": (position <= ends[:, None]).long(),
                                 "caption_id": torch.arange(batch_size)})

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index]


def loader(arch: str, batch_size: int, steps: int, device: str) -> torch.utils.data.DataLoader:
    data = SyntheticBatches(arch, batch_size, min(steps, 8))
    sampler = [i % len(data) for i in range(steps)]
    return torch.utils.data.DataLoader(data, batch_size=None, sampler=sampler, pin_memory=device == "cuda")


def recipe(arch: str, variant: str, device: str, precision: str, steps: int) -> dict[str, Any]:
    checkpointing = str(variant == "checkpointing").lower()
    return resolve(load_recipe("clip-shapes", [
        f"model.vision={{name: 'open_clip_vision:{arch}', grad_checkpointing: {checkpointing}}}",
        f"model.text={{name: 'open_clip_text:{arch}', grad_checkpointing: {checkpointing}}}",
        "model.embed_dim=null", "loss={name: clip}", f"compile={str(variant == 'compile').lower()}",
        "logger.name=none", f"trainer.precision={precision}", f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0", f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        "trainer.devices=1", f"trainer.log_every_n_steps={max(steps // 2, 1)}", "scheduler.warmup_steps=2",
    ]))


def forward_flops(task: Any, batch: dict[str, torch.Tensor], device: str, precision: str) -> float:
    """FLOPs of one forward of both towers and the loss on ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    task.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad(), \
            torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        image = task.encode_image(batch["image"])
        text = task.encode_text(batch["input_ids"], batch["attention_mask"])
        task.loss_fn(image, text, task.temperature_scale())
    return float(counter.get_total_flops())


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def mmlightning_run(arch: str, variant: str, batch_size: int, steps: int, warmup: int, device: str,
                    precision: str) -> dict[str, float]:
    cfg = recipe(arch, variant, device, precision, steps)
    torch.manual_seed(0)
    task = build_task(cfg)
    batches = loader(arch, batch_size, steps, device)
    flops = forward_flops(task, batches.dataset[0], device, precision)
    reset_peak(device)
    timer = StepTimer(device)
    trainer = build_trainer(cfg, None, task=task)
    trainer.callbacks.append(timer)
    trainer.fit(task, train_dataloaders=batches)
    return {"step": median_after(timer.intervals, warmup), "memory": peak_memory_mib(device), "flops": flops}


def open_clip_run(arch: str, variant: str, batch_size: int, steps: int, warmup: int, device: str,
                  precision: str) -> dict[str, float]:
    cfg = recipe(arch, "plain", device, precision, steps)
    torch.manual_seed(0)
    model = open_clip.create_model(arch, device=device, output_dict=True)
    if variant == "checkpointing":
        model.set_grad_checkpointing(True)
    optimizer = open_clip_optimizer(model, cfg["optimizer"])
    if variant == "compile":
        model = torch.compile(model)  # as open_clip_train/main.py does with --torchcompile
    batches = TimedBatches(loader(arch, batch_size, steps, device), steps, batch_size)
    reset_peak(device)
    open_clip_train_epoch(model, optimizer, batches, cfg, device, precision, batch_size)
    intervals = batches.intervals
    return {"step": median_after(intervals, warmup), "memory": peak_memory_mib(device)}


def hand_written_run(arch: str, batch_size: int, steps: int, warmup: int, device: str, precision: str) -> float:
    """The loop a researcher writes by hand on mmlightning's model: same batches, optimizer
    and schedule, autocast as Lightning's precision plugin does."""
    cfg = recipe(arch, "plain", device, precision, steps)
    torch.manual_seed(0)
    task = build_task(cfg).to(device)
    optimizer = OPTIMIZERS.build(task.optimizer_spec, "optimizer", params=task.parameter_groups())
    schedule = SCHEDULERS.build(task.scheduler_spec, "scheduler", optimizer=optimizer, total_steps=steps)
    task.train()
    starts = []
    for batch in loader(arch, batch_size, steps, device):
        starts.append(time.perf_counter())
        hand_written_step(task, optimizer, schedule, batch, device, precision)
    return median_after([b - a for a, b in zip(starts, starts[1:])], warmup)


class SyncDebug(L.Callback):
    """``torch.cuda.set_sync_debug_mode("warn")`` on the training steps that do not log, the
    warnings it raises counted by the Python line that made them."""

    def __init__(self) -> None:
        self.sites: Counter[str] = Counter()
        self._catcher: Any = None

    def on_train_start(self, *args: Any) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        logs = (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0
        torch.cuda.set_sync_debug_mode(0 if logs else "warn")

    def on_train_batch_end(self, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode(0)

    def on_train_end(self, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode(0)
        self._catcher.__exit__(None, None, None)
        for record in self._records:
            if "synchroniz" in str(record.message):
                self.sites[f"{record.filename}:{record.lineno}"] += 1


def sync_run(arch: str, batch_size: int, steps: int, device: str, precision: str) -> dict[str, int]:
    cfg = recipe(arch, "plain", device, precision, steps)
    cfg["trainer"]["log_every_n_steps"] = 5
    torch.manual_seed(0)
    task = build_task(cfg)
    recorder = SyncDebug()
    trainer = build_trainer(cfg, None, task=task)
    trainer.callbacks.append(recorder)
    trainer.fit(task, train_dataloaders=loader(arch, batch_size, steps, device))
    return dict(recorder.sites)


def peak_tflops(given: float | None, device: str) -> float | None:
    if given:
        return given
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"], help="open_clip architectures")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precision", choices=sorted(OPEN_CLIP_PRECISIONS), default="bf16-mixed")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: looked up by name)")
    parser.add_argument("--tiny", action="store_true", help=f"the CPU-sized {TINY_ARCH} only, few steps (tests)")
    args = parser.parse_args()
    if args.tiny:
        args.archs, args.batch_size = [TINY_ARCH], min(args.batch_size, 8)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --tiny for the CPU check)")
    peak = peak_tflops(args.peak_tflops, args.device) if args.device == "cuda" else args.peak_tflops
    common = (args.batch_size, args.steps, args.warmup, args.device, args.precision)

    print(machine_line())
    print(f"batch {args.batch_size}, {args.precision}, {args.steps} steps, median after {args.warmup} warm-up steps, "
          f"one process per measurement; MFU against {f'{peak:.0f} TFLOPS' if peak else 'no known peak (n/a)'}",
          flush=True)
    print(f"{'arch':<14} {'variant':<14} {'side':<12} {'samples/s':>10} {'ms/step':>9} {'MFU':>7} {'peak MiB':>9}",
          flush=True)
    plain_steps: dict[str, float] = {}
    for arch in args.archs:
        flops = None
        for variant in args.variants:
            for side, run in (("mmlightning", mmlightning_run), ("open_clip", open_clip_run)):
                result = isolated(run, arch, variant, *common)
                flops = result.get("flops", flops)
                if variant == "plain" and side == "mmlightning":
                    plain_steps[arch] = result["step"]
                mfu = f"{3 * flops / result['step'] / (peak * 1e12):7.1%}" if peak and flops else f"{'n/a':>7}"
                print(f"{arch:<14} {variant:<14} {side:<12} {args.batch_size / result['step']:10.1f} "
                      f"{result['step'] * 1e3:9.1f} {mfu} {result['memory']:9.0f}", flush=True)
        if flops:
            print(f"{arch:<14} forward {flops / args.batch_size / 1e9:.2f} GFLOPs per sample (images and captions)",
                  flush=True)

    arch = args.archs[-1]
    hand = isolated(hand_written_run, arch, *common)
    ours = plain_steps.get(arch) or isolated(mmlightning_run, arch, "plain", *common)["step"]
    print(f"overhead ratio (mmlightning / hand-written loop), {arch} plain: {ours / hand:.3f} "
          f"({ours * 1e3:.1f} vs {hand * 1e3:.1f} ms/step)", flush=True)

    if args.device != "cuda":
        print("host syncs on non-logging steps: torch.cuda.set_sync_debug_mode needs CUDA (skipped on cpu)")
        return
    sites = isolated(sync_run, arch, args.batch_size, min(args.steps, 20), args.device, args.precision)
    print(f"host syncs on non-logging steps (mmlightning, {arch}, set_sync_debug_mode('warn')): "
          f"{sum(sites.values())}")
    for site, count in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"  {count:5d}  {site}")


if __name__ == "__main__":
    main()
