"""Framework overhead: median training-step time of an mmlightning recipe run by Lightning's
Trainer vs. a hand-written PyTorch loop on the identical model, batches, precision and
optimizer, measured side by side in one process.

    python benchmarks/overhead.py                      # clip-shapes models
    python benchmarks/overhead.py --config vit         # a ViT-B/16-shaped CLIP shrunk for CPU
    python benchmarks/overhead.py --steps 60 --repeats 3
    python benchmarks/overhead.py --config vit --device cuda --precision bf16-mixed

Each step interval (start of one batch to the start of the next) includes data loading,
logging and the optimizer step, so both sides pay for everything a real run pays for.
Every measurement runs in a fresh process (sides interleaved across repeats). Prints the
median over steps after warm-up, the median over repeats, the ratio, and peak memory: the
process's peak resident memory once training ran, and how much training added to what
building the model and data had already taken. On CUDA, memory is the allocator's peak
(``torch.cuda.max_memory_allocated``) and the hand-written loop uses ``torch.autocast`` for
bf16-mixed, as Lightning's precision plugin does. Neither side adds a sync of its own: step
intervals are host timestamps, so their median after warm-up is the steady-state rate once
the GPU's queue of launched kernels is full.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from harness import (  # noqa: E402
    StepTimer, hand_written_step, interleaved, machine_line, median_after, peak_memory_mib)

from mmlightning.build import build_datamodule, build_task, build_trainer  # noqa: E402
from mmlightning.config import load_recipe, resolve  # noqa: E402
from mmlightning.registry import OPTIMIZERS, SCHEDULERS  # noqa: E402

CONFIGS = {
    "shapes": ["data.num_train=4096", "data.batch_size=256"],
    "vit": ["model.vision={name: 'timm:vit_base_patch16_224', img_size: 64, "
            "model_kwargs: {depth: 4, embed_dim: 192, num_heads: 3}}",
            "model.text={name: small_transformer, width: 192, layers: 4, heads: 3}",
            "data.num_train=2048", "data.batch_size=64"],
}


def build(config: str, precision: str, seed: int = 0, extra: tuple[str, ...] | list[str] = ()):
    cfg = resolve(load_recipe("clip-shapes", [*CONFIGS[config], "logger.name=none", f"trainer.precision={precision}",
                                              *extra]))
    torch.manual_seed(seed)
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    datamodule.setup("fit")
    return cfg, task, datamodule


Measurement = tuple[float, float, float]  # median s/step, peak memory MiB, MiB added by training


def lightning_step_times(config: str, steps: int, warmup: int, device: str, precision: str) -> Measurement:
    """The Trainer `mml fit` builds (progress bar, RNG carry-over, non-finite guard, atomic
    checkpoint IO), without validation, logger or checkpoint files."""
    accelerator = "gpu" if device == "cuda" else "cpu"
    cfg, task, datamodule = build(config, precision, extra=[
        f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", f"trainer.accelerator={accelerator}",
        "trainer.devices=1"])
    timer = StepTimer(device)
    trainer = build_trainer(cfg, None, task=task)
    trainer.callbacks.append(timer)
    trainer.fit(task, datamodule=datamodule)
    peak = peak_memory_mib(device)
    return median_after(timer.intervals, warmup), peak, peak - timer.memory_before_first_step


def plain_step_times(config: str, steps: int, warmup: int, device: str, precision: str) -> Measurement:
    """The loop a researcher writes by hand: same model, data, optimizer and schedule."""
    _, task, datamodule = build(config, precision)
    task.to(device)
    optimizer = OPTIMIZERS.build(task.optimizer_spec, "optimizer", params=task.parameter_groups())
    schedule = SCHEDULERS.build(task.scheduler_spec, "scheduler", optimizer=optimizer, total_steps=steps)
    task.train()
    starts: list[float] = []
    step = 0
    before_first_step = peak_memory_mib(device)
    while step < steps:
        for batch in datamodule.train_dataloader():
            starts.append(time.perf_counter())
            hand_written_step(task, optimizer, schedule, batch, device, precision)
            step += 1
            if step >= steps:
                break
    peak = peak_memory_mib(device)
    return median_after([b - a for a, b in zip(starts, starts[1:])], warmup), peak, peak - before_first_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="shapes")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    args = parser.parse_args()
    sides = {"hand-written loop": plain_step_times, "mmlightning": lightning_step_times}
    results: dict[str, list[Measurement]] = interleaved(sides, args.repeats, args.config, args.steps, args.warmup,
                                                             args.device, args.precision)
    print(machine_line())
    print(f"config: {args.config}, {args.steps} steps x {args.repeats} repeats, median after {args.warmup} warm-up "
          f"steps, {args.device}, {args.precision}, one process per measurement")
    medians = {}
    memory = "CUDA memory" if args.device == "cuda" else "RSS"
    for name, runs in results.items():
        medians[name] = statistics.median(r[0] for r in runs)
        peak, added = max(r[1] for r in runs), max(r[2] for r in runs)
        repeats = ", ".join(f"{r[0] * 1e3:.1f}" for r in runs)
        print(f"{name:<19} {medians[name] * 1e3:8.1f} ms/step   (repeats: {repeats})"
              f"   peak {memory} {peak:7.0f} MiB, training added {added:6.0f} MiB")
    print(f"overhead ratio      {medians['mmlightning'] / medians['hand-written loop']:8.3f}")


if __name__ == "__main__":
    main()
