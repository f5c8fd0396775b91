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
