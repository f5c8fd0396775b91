"""One process on a global batch vs two gloo ranks on its halves: the same loss and, after
DDP's gradient average, the same gradients. A test writes a script that defines
``batch_and_task()`` (the task in eval mode and the global batch) and calls ``compare()``;
``run(tmp_path, script, port)`` runs it alone and under torchrun and returns both results."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _grads(task: Any, batch: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:
    loss = task.batch_loss(batch)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def compare(batch_and_task: Callable[[], tuple[Any, dict[str, Any]]]) -> None:
    """Inside the script: the whole batch in one process (one.pt), or this rank's rows (two.pt)."""
    import torch.distributed as dist

    if os.environ.get("RANK") is None:
        task, batch = batch_and_task()
        loss, g = _grads(task, batch)
        torch.save({"loss": loss, "grads": g}, "one.pt")
        return
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    task, batch = batch_and_task()
    rows = len(batch["input_ids"]) // world
    local = {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}
    width = int(local["attention_mask"].sum(1).max())  # a rank pads to its own longest caption
    local["input_ids"], local["attention_mask"] = local["input_ids"][:, :width], local["attention_mask"][:, :width]
    loss, g = _grads(task, local)
    for value in g.values():
        dist.all_reduce(value)
        value /= world  # what DDP does
    losses = [None] * world
    dist.all_gather_object(losses, loss)
    if rank == 0:
        torch.save({"loss": sum(losses) / world, "grads": g}, "two.pt")
    dist.destroy_process_group()


def run(tmp_path: Path, script: str, port: int, env: dict[str, str] | None = None) -> tuple[dict, dict]:
    """The script alone, then on two ranks: (one process's result, the two ranks')."""
    (tmp_path / "ddp.py").write_text(script)
    env = {**os.environ, "TESTS": str(Path(__file__).parent), **(env or {})}
    one = subprocess.run([sys.executable, "ddp.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}",
                          "ddp.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    return torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
