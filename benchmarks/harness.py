"""What every benchmark here shares: a fresh process per measurement, peak memory, the
machine line, and the step timer for Lightning runs.

Each measurement runs in its own spawned process so that one side's allocations, warm
caches or thread pools cannot bias the other, and so that the peak-memory high-water mark
belongs to that measurement alone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from types import SimpleNamespace
from typing import Any, Callable

import lightning as L
import torch


def _run_and_send(queue: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException:
        import traceback

        queue.put(("error", traceback.format_exc()))


def isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a freshly spawned Python process; returns its (picklable) result. Not
    a Pool worker: those are daemonic and may not start DataLoader workers of their own."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run_and_send, args=(queue, fn, args))
    process.start()
    while True:  # the child's result, or its death without one (killed, out of memory)
        try:
            status, result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty
            if not process.is_alive():
                raise RuntimeError(f"{fn.__name__} died with exit code {process.exitcode}") from None
    process.join()
    if status == "error":
        raise RuntimeError(f"{fn.__name__} failed in its process:\n{result}")
    return result


def interleaved(sides: dict[str, Callable[..., Any]], repeats: int, *args: Any) -> dict[str, list[Any]]:
    """Each side ``repeats`` times, each run in a fresh process, the sides taking turns in
    alternating order, so drift in the machine's load hits every side alike."""
    results: dict[str, list[Any]] = {name: [] for name in sides}
    for repeat in range(repeats):
        for name in (list(sides) if repeat % 2 == 0 else list(sides)[::-1]):
            results[name].append(isolated(sides[name], *args))
    return results


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mib(device: torch.device | str = "cpu") -> float:
    """Peak memory of a measured phase: CUDA's allocator peak on GPU, process RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def machine_line() -> str:
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def median_after(times: list[float], warmup: int) -> float:
    if len(times) <= warmup:
        raise ValueError(f"need more than {warmup} timed steps, got {len(times)}: raise --steps")
    return statistics.median(times[warmup:])


class StepTimer(L.Callback):
    """Start of one training batch to the start of the next: data, forward, backward,
    optimizer and logging all fall inside an interval."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.starts: list[float] = []
        self.device = device
        self.memory_before_first_step = 0.0  # peak memory (peak_memory_mib) before training began

    def on_train_batch_start(self, *args: Any) -> None:
        if not self.starts:
            self.memory_before_first_step = peak_memory_mib(self.device)
        self.starts.append(time.perf_counter())

    @property
    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


class TimedBatches:
    """The first ``num_batches`` batches as open_clip's data pipeline hands them over,
    (images, token ids), with the time each reaches the loop (as ``StepTimer`` takes it on
    the Lightning side)."""

    def __init__(self, batches: Any, num_batches: int, batch_size: int) -> None:
        self.batches, self.num_batches = batches, num_batches
        self.num_samples = num_batches * batch_size
        self.starts: list[float] = []

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i >= self.num_batches:
                return
            self.starts.append(time.perf_counter())
            yield batch["image"], batch["input_ids"]

    @property
    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


OPEN_CLIP_PRECISIONS = {"32-true": "fp32", "bf16-mixed": "amp_bf16"}  # Lightning name -> open_clip_train name


def open_clip_optimizer(model: torch.nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW as open_clip_train/main.py builds it from a recipe's ``optimizer:`` numbers: no
    weight decay on gains, biases and the temperature."""
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
                or "logit_scale" in n]
    decay = [p for n, p in model.named_parameters() if not any(p is q for q in no_decay)]
    return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                              {"params": decay, "weight_decay": spec["weight_decay"]}],
                             lr=spec["lr"], betas=tuple(spec.get("betas", (0.9, 0.999))), eps=spec.get("eps", 1e-8))


def open_clip_train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: TimedBatches,
                          cfg: dict[str, Any], device: str, precision: str, batch_size: int) -> None:
    """One epoch of ``batches`` through ``open_clip_train.train.train_one_epoch``, the loop
    open_clip's training script runs, with its cosine schedule and the recipe's warm-up."""
    import open_clip
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    scheduler = cosine_lr(optimizer, cfg["optimizer"]["lr"], cfg["scheduler"].get("warmup_steps", 0),
                          batches.num_batches)
    data = {"train": SimpleNamespace(dataloader=batches, set_epoch=lambda epoch: None)}
    args = SimpleNamespace(device=device, precision=OPEN_CLIP_PRECISIONS[precision], distill=False, accum_freq=1,
                           skip_scheduler=False, horovod=False, grad_clip_norm=None, batch_size=batch_size,
                           world_size=1, rank=0, local_rank=0, log_every_n_steps=cfg["trainer"]["log_every_n_steps"],
                           wandb=False)
    train_one_epoch(model, data, open_clip.ClipLoss(), 0, optimizer, None, scheduler, None, args)


def hand_written_step(task: Any, optimizer: torch.optim.Optimizer, schedule: Any, batch: dict[str, Any],
                      device: str, precision: str) -> None:
    """One CLIP step as a researcher writes it by hand: autocast as Lightning's precision
    plugin does, then backward, optimizer and schedule."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        image = task.encode_image(batch["image"])
        text = task.encode_text(batch["input_ids"], batch["attention_mask"])
        loss = task.loss_fn(image, text, task.temperature_scale(), caption_ids=batch["caption_id"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
