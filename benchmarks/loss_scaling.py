"""How the contrastive loss's cost grows with the batch and with the number of ranks, with
and without ``local_loss``.

    python benchmarks/loss_scaling.py
    python benchmarks/loss_scaling.py --batch-sizes 256 1024 4096 --world-sizes 1 2

Every rank holds B_local features and gathers B_global = world x B_local. With
``local_loss: true`` (the default) a rank scores only its own rows: a B_local x B_global logit
matrix. Without it, every rank scores the whole B_global x B_global matrix. The script times
forward + backward of ``mmlightning.losses.ClipLoss`` on random unit features (gloo ranks on
CPU, each in its own process) and reports each rank's peak memory added by the loss next to
the size of the logit matrix, so the B_local x B_global shape shows in the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from harness import machine_line, peak_rss_mib

from mmlightning.losses import ClipLoss

DIM = 512


def rank_main(rank: int, world: int, init_file: str, batch: int, local_loss: bool, steps: int, results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    loss_fn = ClipLoss(local_loss=local_loss)
    scale = torch.tensor(14.3)
    generator = torch.Generator().manual_seed(rank)
    image = torch.randn(batch, DIM, generator=generator)
    text = torch.randn(batch, DIM, generator=generator)
    before = peak_rss_mib()
    times = []
    for _ in range(steps):
        image_features = F.normalize(image.clone().requires_grad_(), dim=-1)
        text_features = F.normalize(text.clone().requires_grad_(), dim=-1)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        loss_fn(image_features, text_features, scale).backward()
        times.append(time.perf_counter() - start)
    results[rank] = (statistics.median(times[1:]), peak_rss_mib() - before)
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, batch: int, local_loss: bool, steps: int) -> tuple[float, float]:
    """Median step time (slowest rank) and peak memory the loss added (largest rank)."""
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(rank_main, args=(world, os.path.join(tmp, "init"), batch, local_loss, steps, results),
                           nprocs=world, start_method="spawn")
        return max(r[0] for r in results.values()), max(r[1] for r in results.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 2048, 4096], help="per rank")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(machine_line())
    print(f"ClipLoss forward + backward on {DIM}-d features, median of {args.steps - 1} steps after one warm-up; "
          f"gloo ranks on CPU, threads split between ranks; memory = peak RSS the loss added on the largest rank")
    print(f"{'world':>5} {'B_local':>8} {'B_global':>8} {'local_loss':>10} {'logits':>12} {'ms/step':>9} {'peak MiB':>9}")
    for world in args.world_sizes:
        for batch in args.batch_sizes:
            for local_loss in (True, False):
                if world == 1 and not local_loss:
                    continue  # one rank: local and global are the same matrix
                rows = batch if local_loss else batch * world
                step, memory = measure(world, batch, local_loss, args.steps)
                print(f"{world:>5} {batch:>8} {batch * world:>8} {str(local_loss):>10} "
                      f"{f'{rows}x{batch * world}':>12} {step * 1e3:>9.1f} {memory:>9.0f}")


if __name__ == "__main__":
    main()
