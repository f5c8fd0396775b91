"""Framework overhead: median training-step time of an mmlightning recipe run by Lightning's
Trainer vs. a hand-written PyTorch loop on the identical model, batches, precision and
optimizer, measured side by side in one process.

    python benchmarks/overhead.py                      # clip-shapes models
    python benchmarks/overhead.py --config vit         # a ViT-B/16-shaped CLIP shrunk for CPU
    python benchmarks/overhead.py --steps 60 --repeats 3

Each step interval (start of one batch to the start of the next) includes data loading,
logging and the optimizer step, so both sides pay for everything a real run pays for.
Every measurement runs in a fresh process (sides interleaved across repeats). Prints the
median over steps after warm-up, the median over repeats, the ratio, and peak memory: the
process's peak resident memory once training ran, and how much training added to what
building the model and data had already taken.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from harness import StepTimer, interleaved, machine_line, median_after, peak_rss_mib  # noqa: E402
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


def build(config: str, seed: int = 0, extra: tuple[str, ...] | list[str] = ()):
    cfg = resolve(load_recipe("clip-shapes", [*CONFIGS[config], "logger.name=none", "trainer.precision=32-true",
                                              *extra]))
    torch.manual_seed(seed)
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    datamodule.setup("fit")
    return cfg, task, datamodule


Measurement = tuple[float, float, float]  # median s/step, peak RSS MiB, MiB added by training


def lightning_step_times(config: str, steps: int, warmup: int) -> Measurement:
    """The Trainer `mml fit` builds (progress bar, RNG carry-over, non-finite guard, atomic
    checkpoint IO), without validation, logger or checkpoint files."""
    cfg, task, datamodule = build(config, extra=[f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
                                                 "trainer.accelerator=cpu", "trainer.devices=1"])
    timer = StepTimer()
    trainer = build_trainer(cfg, None, task=task)
    trainer.callbacks.append(timer)
    trainer.fit(task, datamodule=datamodule)
    peak = peak_rss_mib()
    return median_after(timer.intervals, warmup), peak, peak - timer.rss_before_first_step


def plain_step_times(config: str, steps: int, warmup: int) -> Measurement:
    """The loop a researcher writes by hand: same model, data, optimizer and schedule."""
    _, task, datamodule = build(config)
    optimizer = OPTIMIZERS.build(task.optimizer_spec, "optimizer", params=task.parameter_groups())
    schedule = SCHEDULERS.build(task.scheduler_spec, "scheduler", optimizer=optimizer, total_steps=steps)
    task.train()
    starts: list[float] = []
    step = 0
    rss_before_first_step = peak_rss_mib()
    while step < steps:
        for batch in datamodule.train_dataloader():
            starts.append(time.perf_counter())
            image = task.encode_image(batch["image"])
            text = task.encode_text(batch["input_ids"], batch["attention_mask"])
            loss = task.loss_fn(image, text, task.temperature_scale(), caption_ids=batch["caption_id"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step >= steps:
                break
    peak = peak_rss_mib()
    return median_after([b - a for a, b in zip(starts, starts[1:])], warmup), peak, peak - rss_before_first_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="shapes")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sides = {"hand-written loop": plain_step_times, "mmlightning": lightning_step_times}
    results: dict[str, list[Measurement]] = interleaved(sides, args.repeats, args.config, args.steps, args.warmup)
    print(machine_line())
    print(f"config: {args.config}, {args.steps} steps x {args.repeats} repeats, median after {args.warmup} warm-up "
          f"steps, fp32, one process per measurement")
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(r[0] for r in runs)
        peak, added = max(r[1] for r in runs), max(r[2] for r in runs)
        print(f"{name:<19} {medians[name] * 1e3:8.1f} ms/step   (repeats: {', '.join(f'{r[0] * 1e3:.1f}' for r in runs)})"
              f"   peak RSS {peak:7.0f} MiB, training added {added:6.0f} MiB")
    print(f"overhead ratio      {medians['mmlightning'] / medians['hand-written loop']:8.3f}")


if __name__ == "__main__":
    main()
