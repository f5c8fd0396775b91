"""Framework overhead: median training-step time of an mmlightning recipe run by Lightning's
Trainer vs. a hand-written PyTorch loop on the identical model, batches, precision and
optimizer, measured side by side in one process.

    python benchmarks/overhead.py                      # clip-shapes models
    python benchmarks/overhead.py --config vit         # a ViT-B/16-shaped CLIP shrunk for CPU
    python benchmarks/overhead.py --steps 60 --repeats 3

Each step interval (start of one batch to the start of the next) includes data loading,
logging and the optimizer step, so both sides pay for everything a real run pays for.
Prints the median over steps after warm-up, the median over repeats, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from mmlightning.build import build_datamodule, build_task  # noqa: E402
from mmlightning.config import load_recipe, resolve  # noqa: E402
from mmlightning.registry import OPTIMIZERS, SCHEDULERS  # noqa: E402

CONFIGS = {
    "shapes": ["data.num_train=4096", "data.batch_size=256"],
    "vit": ["model.vision={name: 'timm:vit_base_patch16_224', img_size: 64, "
            "model_kwargs: {depth: 4, embed_dim: 192, num_heads: 3}}",
            "model.text={name: small_transformer, width: 192, layers: 4, heads: 3}",
            "data.num_train=2048", "data.batch_size=64"],
}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())


def build(config: str, seed: int = 0):
    cfg = resolve(load_recipe("clip-shapes", [*CONFIGS[config], "logger.name=none", "trainer.precision=32-true"]))
    torch.manual_seed(seed)
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    datamodule.setup("fit")
    return cfg, task, datamodule


def lightning_step_times(config: str, steps: int) -> list[float]:
    cfg, task, datamodule = build(config)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer], accelerator="cpu",
                        devices=1, precision="32-true", log_every_n_steps=cfg["trainer"]["log_every_n_steps"])
    trainer.fit(task, train_dataloaders=datamodule.train_dataloader())
    return [b - a for a, b in zip(timer.starts, timer.starts[1:])]


def plain_step_times(config: str, steps: int) -> list[float]:
    """The loop a researcher writes by hand: same model, data, optimizer and schedule."""
    _, task, datamodule = build(config)
    optimizer = OPTIMIZERS.build(task.optimizer_spec, "optimizer", params=task.parameter_groups())
    schedule = SCHEDULERS.build(task.scheduler_spec, "scheduler", optimizer=optimizer, total_steps=steps)
    task.train()
    starts: list[float] = []
    step = 0
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
    return [b - a for a, b in zip(starts, starts[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="shapes")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"plain": [], "mmlightning": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        results["plain"].append(statistics.median(plain_step_times(args.config, args.steps)[args.warmup:]))
        results["mmlightning"].append(statistics.median(lightning_step_times(args.config, args.steps)[args.warmup:]))
    plain, ours = statistics.median(results["plain"]), statistics.median(results["mmlightning"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"config: {args.config}, {args.steps} steps x {args.repeats} repeats, median after {args.warmup} warm-up steps")
    print(f"hand-written loop   {plain * 1e3:8.1f} ms/step   (repeats: {', '.join(f'{t * 1e3:.1f}' for t in results['plain'])})")
    print(f"mmlightning         {ours * 1e3:8.1f} ms/step   (repeats: {', '.join(f'{t * 1e3:.1f}' for t in results['mmlightning'])})")
    print(f"overhead ratio      {ours / plain:8.3f}")


if __name__ == "__main__":
    main()
